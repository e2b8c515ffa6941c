"""How noisy is a latency ratio on this machine, and does a second measurement agree with the first?

    .venv/bin/python benchmarks/latency_noise.py                       # the demo's files (after `make demo`)
    .venv/bin/python benchmarks/latency_noise.py --float A.onnx --int8 B.onnx --invocations 5

Runs bench/compare.py `--invocations` times (each one a full comparison: paired blocks, fresh-process
replicates, 95% interval, its own stopping rule) for two comparisons at batch 1 and 32:
  A vs A      the float model against itself: the interval must contain 1.00; its width is the noise floor
  float/INT8  the float model against its INT8 file: the speedup a quantize decision rests on
and prints, per invocation, the interval and the per-replicate spread, then whether each invocation's
interval overlaps the previous one's (a claim a second measurement refutes would not).
Table + command go to docs/latency.md.
"""

from __future__ import annotations

import argparse
import glob
import sys
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolchain.bench.compare import Plan, Settings, compare  # noqa: E402

DEMO = ROOT / "export" / "mobilenet-fmnist"


def demo_files() -> tuple:
    """The demo's float model and its INT8 file: the shipped one, else the stage's best cached candidate."""
    float_path = DEMO / "model.onnx"
    int8 = DEMO / "model_int8.onnx"
    if not int8.is_file():
        found = sorted(
            glob.glob(str(ROOT / "export" / ".cache" / "quantize-*" / "candidates" / "*keep_stem_fold.onnx"))
        )
        int8 = Path(found[-1]) if found else int8
    for p in (float_path, int8):
        if not p.is_file():
            sys.exit(f"latency_noise: {p} not found; run `make demo` first or pass --float and --int8")
    return float_path, int8


def overlaps(a, b) -> bool:
    return a.low <= b.high and b.low <= a.high


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--float", dest="float_path", type=Path, default=None)
    p.add_argument("--int8", type=Path, default=None)
    p.add_argument("--invocations", type=int, default=5)
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: one per physical core)")
    p.add_argument("--budget", type=float, default=60.0, help="seconds per comparison (its stopping rule's budget)")
    args = p.parse_args(argv)
    float_path, int8 = (args.float_path, args.int8) if args.float_path and args.int8 else demo_files()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    settings, plan = Settings(intra_op_threads=args.threads), Plan(budget_s=args.budget)
    print(f"float {float_path}\nINT8  {int8}\nthreads {args.threads or 'default'}, plan {plan}\n")
    print(
        "| comparison | batch | invocation | ratio [95% interval] | replicates | stopped | replicate spread | overlaps previous |"
    )
    print("|---|---|---|---|---|---|---|---|")
    files = {"float": float_path, "float_again": float_path, "int8": int8}
    pairs = {"A vs A": ("float", "float_again"), "float / INT8": ("float", "int8")}
    previous, t0 = {}, time.perf_counter()
    for inv in range(1, args.invocations + 1):
        c = compare(files, list(pairs.values()), batches, settings, plan)
        for label, pair in pairs.items():
            for bs in batches:
                iv = c.ratio(*pair, bs)
                prev = previous.get((label, bs))
                print(
                    f"| {label} | {bs} | {inv} | {iv.text()} | {iv.replicates} | {c.stopped} | "
                    f"{iv.spread[0]:.2f}-{iv.spread[1]:.2f} | {'-' if prev is None else ('yes' if overlaps(prev, iv) else 'NO')} |",
                    flush=True,
                )
                previous[(label, bs)] = iv
    print(f"\n{args.invocations} invocations in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
