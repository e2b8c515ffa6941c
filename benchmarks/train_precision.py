"""What the demo's training steps cost in fp32 and in bf16 autocast, and with a fused optimizer step.

    .venv/bin/python benchmarks/train_precision.py                 # the demo's models at 32x32, batch 128
    .venv/bin/python benchmarks/train_precision.py --rounds 6 --size 64

Times, in alternating rounds (so the machine's drift hits every variant alike), the calls the demo's
training stages make: a resnet18 training step (the teacher stage), a resnet18 forward without
gradients (the teacher inside distillation and fine-tuning), a mobilenet_v2 training step (the student),
each in fp32 and in bf16 autocast (channels-last, 2 torch threads), and one SGD step (nesterov, weight
decay) over resnet18's parameters with PyTorch's default foreach implementation and with fused=True.
Prints the median per call and the ratio against fp32 / foreach measured in the same run; the
toolchain's `precision: auto` is the decision these ratios support; the fused step was measured and not
adopted (docs/distillation.md says why).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolchain.train.precision import forward_call, train_step  # noqa: E402  (the calls `auto` times)


def optimizer_step(fused: bool) -> Callable[[], None]:
    model = torchvision.models.resnet18(num_classes=10)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    kwargs = {"fused": True} if fused else {}
    opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9, nesterov=True, weight_decay=5e-4, **kwargs)
    return opt.step


def calls(size: int, batch: int) -> Dict[str, Callable[[], None]]:
    cl = torch.channels_last
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=cl)
    y = torch.randint(0, 10, (batch,))
    out = {}
    for tag in ("fp32", "bf16"):
        r18 = torchvision.models.resnet18(num_classes=10).to(memory_format=cl).train()
        out[f"resnet18 train step, {tag}"] = train_step(r18, x, y)(tag)
        teacher = torchvision.models.resnet18(num_classes=10).to(memory_format=cl).eval()
        out[f"resnet18 forward (teacher), {tag}"] = forward_call(teacher, x)(tag)
        mbv2 = torchvision.models.mobilenet_v2(num_classes=10).to(memory_format=cl).train()
        out[f"mobilenet_v2 train step, {tag}"] = train_step(mbv2, x, y)(tag)
    out["SGD step over resnet18, foreach"] = optimizer_step(False)
    out["SGD step over resnet18, fused"] = optimizer_step(True)
    return out


def median_ms(fn: Callable[[], None], n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=32, help="input height and width")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--calls", type=int, default=5, help="timed calls per variant and round")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    variants = calls(args.size, args.batch)
    for fn in variants.values():
        fn()
        fn()  # oneDNN builds its kernels on the first calls
    samples: Dict[str, list] = {k: [] for k in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            samples[name].append(median_ms(variants[name], args.calls))
    print(
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.size}x{args.size}, "
        f"{args.rounds} alternating rounds x {args.calls} calls; oneDNN bf16 path: "
        f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}"
    )
    print(f"{'call':40s} {'median ms':>10s} {'vs baseline':>12s}")
    for name, values in samples.items():
        ms = statistics.median(values)
        base_name = name.replace("bf16", "fp32").replace("fused", "foreach")
        base = statistics.median(samples[base_name])
        ratio = "" if base_name == name else f"{base / ms:.2f}x faster" if ms < base else f"{ms / base:.2f}x slower"
        print(f"{name:40s} {ms:10.1f} {ratio:>12s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
