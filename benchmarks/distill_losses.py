"""Which distillation loss trains the best student at the demo's budget? KD vs DKD vs KD + a feature term.

    nice -n 10 python benchmarks/distill_losses.py                       # 4 variants x seeds 0, 1, 2
    nice -n 10 python benchmarks/distill_losses.py --jobs 3 threads=1    # the seeds side by side, 1 thread each
    python benchmarks/distill_losses.py --seeds 0 data.subset=2000       # a quick look (extra overrides)

Runs only the teacher and distill stages of recipes/mobilenet.yaml (prune, finetune, export,
bench, quantize and package set to null; tracking off) through the CLI, one run per variant
and seed, in --out (default /tmp/distill_losses): each seed's teacher is trained once and
reused by its variants (the stage cache); --jobs runs that many seeds at once. The recipe
file itself is not changed. Prints a
markdown table of the distilled student's test accuracy: per seed, mean and standard
deviation (sample, n-1), and the difference of each mean to KD's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
DISTILL_ONLY = [
    "prune=null",
    "finetune=null",
    "export=null",
    "bench=null",
    "quantize=null",
    "package=null",
    "tracking.enabled=false",
]
VARIANTS: Dict[str, List[str]] = {
    "kd": [],  # the recipe's own distill section: Hinton KD, T=4, alpha=0.9
    # DKD as in mdistiller's CIFAR setting (alpha 1, beta 8, T 4); dkd-b2: a weaker non-target term
    "dkd": ["distill.loss=dkd", "distill.dkd.alpha=1.0", "distill.dkd.beta=8.0", "distill.dkd.warmup_epochs=0"],
    "dkd-b2": ["distill.loss=dkd", "distill.dkd.alpha=1.0", "distill.dkd.beta=2.0", "distill.dkd.warmup_epochs=0"],
    "kd+feat": ["distill.features=[{student: features.6, teacher: layer2, loss: mse, weight: 1.0}]"],
}


def run_one(recipe: str, variant: str, seed: int, out: Path, extra: List[str]) -> Dict[str, float]:
    name = f"{variant.replace('+', '-')}-s{seed}"
    overrides = [f"name={name}", f"seed={seed}", f"output_dir={out}", *DISTILL_ONLY, *VARIANTS[variant], *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "toolchain", "compress", recipe, *overrides], cwd=REPO, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"{variant} seed {seed} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    summary = json.loads((out / name / "summary.json").read_text())
    metrics = summary["stages"]["distill"]["metrics"]
    return {
        "test": metrics["test_accuracy"],
        "val": metrics["val_accuracy"],
        "teacher": summary["stages"]["teacher"]["metrics"]["test_accuracy"],
        "seconds": time.perf_counter() - t0,
    }


def table(results: Dict[str, Dict[int, Dict[str, float]]], seeds: List[int]) -> str:
    lines = [
        f"| loss | {' | '.join(f'seed {s}' for s in seeds)} | mean | std | vs kd (points) |",
        "|---|" + "---|" * (len(seeds) + 3),
    ]
    base = statistics.mean(r["test"] for r in results["kd"].values()) if "kd" in results else None
    for variant, by_seed in results.items():
        accs = [by_seed[s]["test"] for s in seeds]
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        delta = "" if base is None else f"{100 * (mean - base):+.2f}"
        lines.append(f"| {variant} | {' | '.join(f'{a:.4f}' for a in accs)} | {mean:.4f} | {std:.4f} | {delta} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides for every run")
    parser.add_argument("--recipe", default="recipes/mobilenet.yaml")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="/tmp/distill_losses")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at the same time (separate processes)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    results: Dict[str, Dict[int, Dict[str, float]]] = {v: {} for v in variants}

    def one_seed(seed: int) -> None:  # variants in turn: the seed's teacher trains once, the others reuse it
        for variant in variants:
            r = results[variant][seed] = run_one(args.recipe, variant, seed, Path(args.out), args.overrides)
            print(
                f"{variant} seed {seed}: test {r['test']:.4f}  val {r['val']:.4f}  teacher {r['teacher']:.4f}  "
                f"({r['seconds']:.0f}s)",
                flush=True,
            )

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one_seed, seeds))  # list(): a failed run raises here
    print(table(results, seeds))


if __name__ == "__main__":
    main()
