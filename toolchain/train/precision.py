"""Training precision: fp32, or bf16 autocast where this CPU runs it faster, decided by measurement.

    precision = choose(setting, model, teacher, x, y, on_cpu=True)    # setting: "fp32" | "bf16" | "auto"
    with autocast(precision.student): logits = model(x)

bf16 is not a speed-up by itself: on an AMD EPYC with AVX-512 BF16 (2 threads, batch 128, 32x32,
channels-last; benchmarks/train_precision.py, docs/distillation.md) a resnet18 training step ran
1.34x faster in bf16 and its forward 1.73x, while a mobilenet_v2 training step ran 2.27x slower
(oneDNN's bf16 depthwise backward). So `auto` times both on the run's own first batch, for the
student's training step and for the teacher's forward separately, and keeps bf16 only where it is
at least MARGIN faster. Evaluation and everything exported stay fp32; autocast keeps BatchNorm, softmax and the losses in fp32.
"""

from __future__ import annotations

import copy
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

MARGIN = 1.10  # bf16 must be this much faster (median step) to be chosen: below it, the noise decides
ROUNDS = 3  # alternating fp32 / bf16 rounds
STEPS = 2  # timed calls per side and round, after one untimed call


@dataclass(frozen=True)
class Precision:
    student: str = "fp32"  # the training step's forward (and so its backward)
    teacher: str = "fp32"  # the frozen teacher's forward in distillation
    measured_ms: Dict[str, float] = field(default_factory=dict)  # what `auto` timed (median ms per call)

    def text(self) -> str:
        timed = ", ".join(f"{k} {v:.0f} ms" for k, v in self.measured_ms.items())
        return f"student {self.student}, teacher {self.teacher}" + (f" (measured: {timed})" if timed else "")


def bf16_native() -> bool:
    """oneDNN has a bf16 path on this CPU (AVX-512 and newer); without one, bf16 is emulated slowly
    and `auto` keeps fp32 without timing."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(precision: str):
    """The context a forward runs in: bf16 autocast on CPU, or nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def choose(
    setting: str, model: nn.Module, teacher: Optional[nn.Module], x: torch.Tensor, y: torch.Tensor, on_cpu: bool
) -> Precision:
    """fp32 / bf16 as set; `auto` measures on (x, y) where bf16 can pay (CPU with native bf16)."""
    if setting == "fp32" or (setting == "auto" and not (on_cpu and bf16_native())):
        return Precision()
    if setting == "bf16":
        return Precision("bf16", "bf16" if teacher is not None else "fp32")
    timed: Dict[str, float] = {}
    student = _pick(train_step(model, x, y), "student_step", timed)
    teacher_p = _pick(forward_call(teacher, x), "teacher_forward", timed) if teacher is not None else "fp32"
    return Precision(student, teacher_p, timed)


def _pick(make: Callable[[str], Callable[[], None]], name: str, timed: Dict[str, float]) -> str:
    calls = {p: make(p) for p in ("fp32", "bf16")}
    for call in calls.values():
        call()  # warm-up: oneDNN builds its kernels for the shapes on the first call
    samples: Dict[str, list] = {"fp32": [], "bf16": []}
    for r in range(ROUNDS):
        for p in ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32"):
            for _ in range(STEPS):
                start = time.perf_counter()
                calls[p]()
                samples[p].append((time.perf_counter() - start) * 1000)
    medians = {p: statistics.median(s) for p, s in samples.items()}
    timed.update({f"{name}_{p}": m for p, m in medians.items()})
    return "bf16" if medians["bf16"] * MARGIN <= medians["fp32"] else "fp32"


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[str], Callable[[], None]]:
    """A training step on a copy of the model (the run's weights and optimizer are not touched)."""

    def make(precision: str) -> Callable[[], None]:
        clone = copy.deepcopy(model).train()
        opt = torch.optim.SGD(clone.parameters(), lr=1e-6, momentum=0.9)

        def step() -> None:
            with autocast(precision):
                logits = clone(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    return make


def forward_call(module: nn.Module, x: torch.Tensor) -> Callable[[str], Callable[[], None]]:
    def make(precision: str) -> Callable[[], None]:
        @torch.no_grad()
        def forward() -> None:
            with autocast(precision):
                module(x)

        return forward

    return make
