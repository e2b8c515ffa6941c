"""The torchrun process group: who this process is (rank, world size), opening and closing the
group, and the two collectives the engine's protocol needs (share, agree). A leaf module: it imports
torch.distributed and nothing of the toolchain but its errors, so the engine (engine/distributed.py)
and training (train/ddp.py) both build on it. Without torchrun every function is a cheap
single-process no-op.

`torchrun --nproc_per_node=N -m toolchain compress RECIPE` starts N copies of the CLI; how they
share the work is docs/scale_out.md (the user's view) and engine/distributed.py (the protocol).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Dict

import torch
import torch.distributed as dist

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
    from .errors import ToolchainError

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
    from .errors import ToolchainError

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


@contextmanager
def solo(data=None):
    """Rank 0 works alone (pruning, iterative pruning's fine-tuning steps): no DDP, and the
    whole training split instead of its shard. The other ranks wait in engine/distributed.py (Coordinator.follow)."""
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
