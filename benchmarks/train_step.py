"""Training-step cost of two runs' fine-tuned models, timed back to back (alternating rounds).

    .venv/bin/python benchmarks/train_step.py mobilenet-fmnist mobilenet-fmnist-a8

Reads each run's export/<run>/summary.json for its fine-tune stage's cached model, rebuilds it
at its pruned shapes and times SGD steps (forward, cross-entropy, backward, update; channels-last,
batch 128 at the data's input size, 2 torch threads) plus the teacher's forward that a KD step adds.
Why: an epoch time read from two runs made hours apart measures the machine as much as the model;
this one measures both models in the same minute. Prints the per-step medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolchain.models import resolve  # noqa: E402
from toolchain.models.checkpoint import load_weights  # noqa: E402


def finetuned(run: str, size: int) -> torch.nn.Module:
    summary = json.loads((ROOT / "export" / run / "summary.json").read_text())
    stage_dir = ROOT / "export" / ".cache" / f"finetune-{summary['stages']['finetune']['key']}"
    art = json.loads((stage_dir / "result.json").read_text())["artifacts"]["model"]
    model = resolve.build(art["arch"], art["num_classes"], art["cifar_stem"], art["kwargs"])
    load_weights(
        model, stage_dir / art["checkpoint"], art["arch"], resize=True, example_input=torch.zeros(2, 3, size, size)
    )
    return model.train().to(memory_format=torch.channels_last)


def per_step_ms(fn, steps: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps * 1000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs=2, help="two run names under export/ (each with a finished fine-tune stage)")
    p.add_argument("--size", type=int, default=32, help="input height and width")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=5, help="timed steps per model and round")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    models = {run: finetuned(run, args.size) for run in args.runs}
    optims = {run: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for run, m in models.items()}
    teacher = resolve.build("resnet18", 10, False, {}).eval().to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, args.size, args.size).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))

    def step(run: str) -> None:
        loss = F.cross_entropy(models[run](x), y)
        optims[run].zero_grad()
        loss.backward()
        optims[run].step()

    def teacher_forward() -> None:
        with torch.no_grad():
            teacher(x)

    times = {run: [] for run in args.runs}
    times["teacher forward"] = []
    for r in range(args.rounds):
        for run in args.runs if r % 2 == 0 else args.runs[::-1]:
            times[run].append(per_step_ms(lambda run=run: step(run), args.steps))
        times["teacher forward"].append(per_step_ms(teacher_forward, args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:30s} {v:8.1f} ms per step of {args.batch}")
    a, b = args.runs
    print(
        f"{a} / {b}: {med[a] / med[b]:.3f} (student step), "
        f"{(med[a] + med['teacher forward']) / (med[b] + med['teacher forward']):.3f} (with the KD teacher forward)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
