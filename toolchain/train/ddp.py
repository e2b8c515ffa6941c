"""torchrun / DDP helpers. Without torchrun every function is a cheap single-process no-op.

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
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist

DEBUG_DIR_ENV = "TOOLCHAIN_DIST_DEBUG_DIR"  # tests: each rank records its shard and weights per stage
TIMEOUT_ENV = "TOOLCHAIN_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 3 * 3600  # followers wait for rank 0's pruning/export; gloo's 30 min default is too short

_solo = False  # True while rank 0 computes a stage alone: no DDP wrapping, no collectives in training


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def training_is_distributed() -> bool:
    """Whether training here is DDP (false in single-process runs and while rank 0 works alone)."""
    return is_distributed() and not _solo


# ---------------------------------------------------------------- process group


def backend_for(device: str) -> str:
    """nccl when the recipe's device resolves to CUDA, else gloo (CPU)."""
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    return "nccl" if cuda else "gloo"


@contextmanager
def session(device: str = "auto"):
    """Under torchrun: init the process group from torchrun's env (MASTER_ADDR/PORT, RANK,
    WORLD_SIZE), and destroy it on the way out. Anything else: nothing."""
    if not launched_by_torchrun() or is_distributed():
        yield
        return
    backend = backend_for(device)
    if backend == "nccl":
        _bind_local_gpu()
    dist.init_process_group(backend, timeout=timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))))
    finished = False
    try:
        yield
        finished = True
    finally:
        if finished:
            barrier()  # rank 0 writes the summary last; nobody tears down the group under it
        dist.destroy_process_group()


def _bind_local_gpu() -> None:
    from ..errors import ToolchainError

    local_rank, count = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
    if local_rank >= count:
        raise ToolchainError(
            f"torchrun started local rank {local_rank} but this node has {count} CUDA device(s); "
            f"use --nproc_per_node={count} (one process per GPU)"
        )
    torch.cuda.set_device(local_rank)


def describe(batch_size: int) -> Dict[str, Any]:
    """World size, backend and effective batch (per-process batch x world size) for tags and the summary."""
    return {
        "world_size": world_size(),
        "backend": dist.get_backend() if is_distributed() else "none",
        "effective_batch_size": batch_size * world_size(),
    }


# ---------------------------------------------------------------- collectives


def share(obj: Any = None) -> Any:
    """Rank 0's `obj` on every rank (pickled over the process group); identity without torchrun."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(fn: Callable[[], Any]) -> Any:
    """Run fn on every rank; if any rank raises a ToolchainError (e.g. rank 0 cannot reach the
    tracking server), every rank raises it, so none waits forever at the next collective."""
    from ..errors import ToolchainError

    try:
        value, error = fn(), None
    except ToolchainError as exc:
        if not is_distributed():
            raise
        value, error = None, exc
    if is_distributed():
        errors = [None] * world_size()
        dist.all_gather_object(errors, None if error is None else (type(error), str(error)))
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first[0](first[1])
    return value


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


@contextmanager
def solo(data=None):
    """Rank 0 works alone (pruning, iterative pruning's fine-tuning steps): no DDP, and the
    whole training split instead of its shard. The other ranks wait in `follow_stage`."""
    global _solo
    import dataclasses

    saved, previous = (data.train if data is not None else None), _solo
    if data is not None and data.train.num_replicas > 1:
        data.train = dataclasses.replace(data.train, num_replicas=1, rank=0)
    _solo = True
    try:
        yield
    finally:
        _solo = previous
        if data is not None:
            data.train = saved


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
