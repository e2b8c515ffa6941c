"""DDP for the training loop: wrapping, buffer and gradient sync beside the DDP model, and the
per-rank debug record the torchrun tests read. The process group itself (rank, session, share,
agree, solo) is toolchain/procgroup.py, re-exported here for the training code. Without torchrun
every function is a cheap single-process no-op.

`torchrun --nproc_per_node=N -m toolchain compress RECIPE` starts N copies of the CLI.
How they share the work (docs/scale_out.md has the user's view):

- `session` opens the process group (gloo on CPU, nccl on CUDA) and closes it at the end.
- Rank 0 owns MLflow and every file under output_dir (cache, checkpoints, summary,
  ONNX). The other ranks ("followers") get a NullTracker and write nothing there.
- Each stage says what followers do (its `followers` role: train, load or wait); the
  runner's side of that protocol is toolchain/engine/distributed.py.
- After every model stage, all ranks continue from rank 0's saved checkpoint, sent over
  the process group (no shared filesystem needed) and loaded with checkpoint.load_weights,
  which resizes layers to the stored shapes: a channel-pruned model arrives physically
  smaller, and the next training stage wraps that new module in a fresh DDP (a wrapper
  made before speedup would hold the old, larger parameters).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..procgroup import (  # noqa: F401  (re-exported: the training code reads rank, share... from here)
    agree,
    barrier,
    describe,
    is_distributed,
    is_main,
    rank,
    session,
    share,
    solo,
    training_is_distributed,
    world_size,
)

DEBUG_DIR_ENV = "TOOLCHAIN_DIST_DEBUG_DIR"  # tests: each rank records its shard and weights per stage


def wrap_for_training(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP-wrap under torchrun (gradients all-reduced); the plain model otherwise.

    Called afresh by every training stage, so it wraps the model as it is now (after speedup)."""
    if not training_is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside a DDP wrapper (state_dicts, export and pruning use this)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def sync_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running stats drift apart on different
    shards), so each rank's full-validation-set evaluation and best-epoch choice agree."""
    if not training_is_distributed():
        return
    for buffer in unwrap(model).buffers():
        dist.broadcast(buffer.data, src=0)


def share_module(module: Optional[torch.nn.Module]) -> None:
    """Give every rank rank 0's parameters and buffers of a module trained beside the DDP model
    (feature-distillation adapters), as DDP does for the model when it wraps it."""
    if module is None or not training_is_distributed():
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def average_gradients(module: Optional[torch.nn.Module]) -> None:
    """All-reduce (mean) the gradients of a module outside the DDP wrapper, so its copies stay equal."""
    if module is None or not training_is_distributed():
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size()


# ---------------------------------------------------------------- debugging / tests


def debug_record(stage: str, batches, model: torch.nn.Module, beside: Optional[torch.nn.Module] = None) -> None:
    """With $TOOLCHAIN_DIST_DEBUG_DIR set, append what this rank trained on (its shard of the
    last epoch) and a weight checksum to <dir>/rank<r>.json; tests use it to check sharding
    and gradient synchronisation."""
    directory = os.environ.get(DEBUG_DIR_ENV)
    if not directory:
        return
    path = Path(directory) / f"rank{rank()}.json"
    records = json.loads(path.read_text()) if path.is_file() else []
    records.append(
        {
            "stage": stage,
            "rank": rank(),
            "world_size": world_size(),
            "ddp": training_is_distributed(),
            "num_samples": getattr(batches, "num_samples", None),
            "num_batches": len(batches),
            "indices": [int(i) for i in getattr(batches, "sampler", [])],
            "param_checksum": _checksum(unwrap(model)),
            "beside_checksum": None if beside is None else _checksum(beside),  # feature-distillation adapters
        }
    )
    Path(directory).mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))


def _checksum(module: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in module.parameters()))
