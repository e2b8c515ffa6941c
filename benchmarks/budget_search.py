"""One prune.budget search as the prune stage runs it, on a registry model with random weights
(structure and latency do not depend on the values), printing the decision and every probed point.

    python benchmarks/budget_search.py macs 0.3                      # mobilenet_v2, 32x32, align 16, NNI
    python benchmarks/budget_search.py speedup 2 --batch-size 32 --threads 1
    python benchmarks/budget_search.py latency_ms 1.5 --model resnet18 --engine torch_pruning

Not issue 31's benchmarks/budget.py (uniform vs latency_aware, accuracy over seeds): this times the
search alone (docs/pruning.md "Compress to a budget" has its numbers).
"""

from __future__ import annotations

import argparse
import time

import torch

from toolchain.models.resolve import architecture
from toolchain.prune import budget as B
from toolchain.prune import prune_model
from toolchain.recipe import validate_dict


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=["speedup", "latency_ms", "macs", "params", "file_bytes"])
    p.add_argument("value", type=float)
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--align", type=int, default=16)
    p.add_argument("--engine", default="nni", choices=["nni", "torch_pruning"])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    a = p.parse_args()
    torch.set_num_threads(1)
    budget = {a.kind: int(a.value) if a.kind == "file_bytes" else a.value}
    if a.kind in B.LATENCY_KINDS:
        budget.update(batch_size=a.batch_size, threads=a.threads)
    r = validate_dict(
        {
            "name": "budget",
            "student": {"model": a.model},
            "distill": {"loss": "ce"},
            "prune": {"method": "channel", "align": a.align, "engine": a.engine, "budget": budget},
            "export": {"exporter": a.exporter, "opset": 18 if a.exporter == "dynamo" else 17},
        }
    )
    torch.manual_seed(0)
    model = architecture(r.student, 10).eval()
    x = torch.randn(2, 3, a.size, a.size)
    meter = B.make_meter(r.prune.budget, x, progress=lambda line: print("   ", line, flush=True))
    started = time.perf_counter()
    try:
        _, d = B.choose(model, r.prune, meter, lambda m, c: prune_model(m, c, x))
    finally:
        meter.close()
    print(f"{d.line()} ({time.perf_counter() - started:.0f} s, {d.grid_points} grid points)")
    for h in d.history:
        print(
            f"  {h['stage']:<6} sparsity {h['sparsity']:.4f}: {h['value']:.4g} [{h['low']:.4g}, {h['high']:.4g}] "
            f"{'met' if h['met'] else 'missed'}"
        )


if __name__ == "__main__":
    main()
