"""The toolchain's KD training loop vs a bare hand-written PyTorch KD loop, in one run.

    .venv/bin/python benchmarks/train_overhead.py                  # Fashion-MNIST, mobilenet_v2 <- resnet18
    .venv/bin/python benchmarks/train_overhead.py --images 2000 --rounds 2

Same student (mobilenet_v2, same initial weights), same teacher, same batches (the
toolchain's loader over the same images), same optimiser (SGD nesterov, OneCycle), same
channels-last layout, one validation pass per epoch in both. The bare loop is what a
practitioner would write in 20 lines; the toolchain's loop adds resumable state, per-term
loss logging, best-epoch selection and progress output. Runs alternate (bare, toolchain,
bare, toolchain...) so the machine's drift hits both; the ratio is of the medians.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolchain.data.loaders import build_data  # noqa: E402
from toolchain.models.registry import build_model  # noqa: E402
from toolchain.recipe import DataConfig, TrainConfig  # noqa: E402
from toolchain.train.loop import fit, memory_layout  # noqa: E402
from toolchain.train.tasks import make_task  # noqa: E402


def bare_kd_epoch(student, teacher, train, val, cfg) -> None:
    """One epoch of Hinton KD written by hand, plus a validation pass."""
    opt = torch.optim.SGD(
        student.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=len(train))
    T, alpha = cfg.temperature, cfg.alpha
    teacher.to(memory_format=torch.channels_last)  # as the toolchain's memory_layout does for both models
    student.train()
    train.set_epoch(0)
    for x, y in train:
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        soft = (
            F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean", log_target=True) * T * T
        )
        loss = alpha * soft + (1 - alpha) * F.cross_entropy(s, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    student.eval()
    with torch.no_grad():
        for x, _ in val:
            student(x.contiguous(memory_format=torch.channels_last))


def toolchain_epoch(student, teacher, data, cfg) -> None:
    """What the distill stage runs (stages/common.train without tracking and resume files)."""
    task = make_task(cfg, teacher)
    with memory_layout(student, task, cfg.channels_last):
        fit(student, task, data.train, data.val, cfg, stage="bench")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3000, help="training images per epoch (Fashion-MNIST subset)")
    p.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds (each: one bare epoch, one toolchain epoch)"
    )
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args(argv)

    data = build_data(
        DataConfig(subset=args.images, val_fraction=0.1, test_subset=100, batch_size=args.batch_size), seed=0
    )
    cfg = TrainConfig(epochs=1, lr=0.05, loss="kd", channels_last=True)
    torch.manual_seed(0)
    teacher = build_model("resnet18", 10).eval().to(memory_format=torch.channels_last)
    initial = build_model("mobilenet_v2", 10)
    n = data.train.num_samples
    bare, ours = [], []
    for r in range(args.rounds + 1):  # round 0 warms up (oneDNN kernels, allocator) and is not counted
        student = copy.deepcopy(initial).to(memory_format=torch.channels_last)
        b = n / timed(lambda student=student: bare_kd_epoch(student, teacher, data.train, data.val, cfg))
        student = copy.deepcopy(initial)
        o = n / timed(lambda student=student: toolchain_epoch(student, teacher, data, cfg))
        print(f"round {r}{' (warm-up)' if r == 0 else ''}: bare {b:.1f} img/s, toolchain {o:.1f} img/s", flush=True)
        if r:
            bare.append(b)
            ours.append(o)
    ratio = statistics.median(ours) / statistics.median(bare)
    print(f"\n| loop | images/s (median of {args.rounds}) | vs bare |\n|---|---|---|")
    print(f"| bare PyTorch KD loop | {statistics.median(bare):.1f} | 1.00x |")
    print(f"| toolchain fit() + DistillationTask | {statistics.median(ours):.1f} | {ratio:.3f}x |")
    print(
        f"\ngoal >= 0.95x: {'met' if ratio >= 0.95 else 'MISSED'} (torch threads {torch.get_num_threads()}, "
        f"{n} images/epoch, batch {args.batch_size}, student mobilenet_v2, teacher resnet18, 32x32)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
