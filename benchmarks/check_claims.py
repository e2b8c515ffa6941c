"""Re-measure every speedup a run claims, with a harness that shares no code with the toolchain.

    .venv/bin/python benchmarks/check_claims.py                     # export/mobilenet-fmnist (after `make demo`)
    .venv/bin/python benchmarks/check_claims.py export/RUN --processes 5

The claims: model_card.json's INT8 speedups over float (quantize stage) and bench.json's ratio
columns (bench stage), each a median with a 95% interval. This script imports only numpy and
onnxruntime: each of `--processes` fresh Python processes creates its own two sessions, runs
`--rounds` rounds alternating A/B (0.25 s a side, order flipped each round), and reports the
median over rounds of the per-round ratio of medians (the harness of issue 29). Across processes
it takes the median and a bootstrap 95% interval. A claim holds when this interval reaches its
interval or lies above it (found faster is no refutation); it FAILS when it lies wholly below.
An INT8 file also shipped on a decision: its interval's lower end cleared `quantize.min_speedup`
(the card's int8.min_speedup). That decision is reproduced when the re-measured lower end clears
the gate too, marginal when only the median does, NOT reproduced when the median falls below it,
and refuted when the whole re-measured interval does. Overlapping intervals alone do not say a
second measurement would have shipped the file, so the decision has its own column.
Exit code 1 if any claim fails or any decision is refuted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
THREADS_DEFAULT = 0


def one_process(a: str, b: str, batch: int, rounds: int, side_s: float, threads: int) -> float:
    import onnxruntime as ort

    def session(path):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    sessions = [session(a), session(b)]
    inp = sessions[0].get_inputs()[0]
    shape = [batch] + [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    ratios = []
    for r in range(rounds):
        med = [0.0, 0.0]
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            for _ in range(3):
                sessions[i].run(None, feeds[i])
            times, end = [], time.perf_counter() + side_s
            while time.perf_counter() < end or len(times) < 3:
                t = time.perf_counter()
                sessions[i].run(None, feeds[i])
                times.append(time.perf_counter() - t)
            med[i] = float(np.median(times))
        ratios.append(med[0] / med[1])
    return float(np.median(ratios))


def measure(a: Path, b: Path, batch: int, processes: int, rounds: int, threads: int) -> tuple:
    out = []
    for _ in range(processes):
        proc = subprocess.run(
            [sys.executable, __file__, "--one", str(a), str(b), str(batch), str(rounds), str(threads)],
            capture_output=True,
            text=True,
            check=True,
        )
        out.append(float(proc.stdout.strip()))
    boot = np.random.default_rng(0).choice(out, size=(2000, len(out)))
    low, high = np.percentile(np.median(boot, axis=1), [2.5, 97.5])
    return float(np.median(out)), float(low), float(high), out


def verdicts(low: float, med: float, lo: float, hi: float, gate) -> tuple:
    """(claim verdict, decision verdict, failed) for a claim whose interval starts at `low`, re-measured
    as med [lo, hi]; gate: the min_speedup the shipping decision cleared, None for a plain claim."""
    claim = "holds" if hi >= low else "FAILS (re-measured below the claimed interval)"
    if gate is None:
        return claim, "", hi < low
    if lo >= gate:
        decision = f"reproduced (lower end >= {gate:.2f}x)"
    elif med >= gate:
        decision = f"marginal (median >= {gate:.2f}x, lower end below)"
    elif hi >= gate:
        decision = f"NOT reproduced (median below the {gate:.2f}x gate)"
    else:
        decision = f"REFUTED (whole interval below the {gate:.2f}x gate)"
    return claim, decision, hi < low or hi < gate


def claims(run_dir: Path) -> list:
    """(label, baseline file, candidate file, batch, claimed ratio, low, high, gate or None)."""
    card = json.loads((run_dir / "model_card.json").read_text())
    found = []
    int8 = card.get("int8", {})
    if int8.get("shipped"):
        for bs, s in int8["speedup_vs_float"].items():
            found.append(
                (
                    "INT8 vs float (quantize stage)",
                    run_dir / "model.onnx",
                    run_dir / "model_int8.onnx",
                    int(bs),
                    s["ratio"],
                    s["low"],
                    s["high"],
                    int8.get("min_speedup"),  # None on a card written before it was recorded
                )
            )
    bench = json.loads((run_dir / "bench.json").read_text())
    paths = {role: Path(r["model"]) for role, r in bench["onnxruntime"].items()}
    for row in bench.get("comparisons", {}).get("cpu", {}).get("ratios", []):
        found.append(
            (
                f"{row['candidate']} vs {row['baseline']} (bench stage)",
                paths[row["baseline"]],
                paths[row["candidate"]],
                row["batch_size"],
                row["ratio"],
                row["low"],
                row["high"],
                None,
            )
        )
    return found


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        a, b, batch, rounds, threads = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
        print(one_process(a, b, batch, rounds, 0.25, threads))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", nargs="?", type=Path, default=ROOT / "export" / "mobilenet-fmnist")
    p.add_argument("--processes", type=int, default=5)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=THREADS_DEFAULT, help="intra-op threads (0: onnxruntime's default)")
    args = p.parse_args()
    failed = 0
    print(
        "| claim | batch | claimed | re-measured (median of processes, bootstrap 95%) | per process | verdict "
        "| shipping decision |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, a, b, bs, ratio, low, high, gate in claims(args.run_dir):
        med, lo, hi, per = measure(a, b, bs, args.processes, args.rounds, args.threads)
        claim, decision, bad = verdicts(low, med, lo, hi, gate)
        failed += bad
        print(
            f"| {label} | {bs} | {ratio:.2f}x [{low:.2f}, {high:.2f}] | {med:.2f}x [{lo:.2f}, {hi:.2f}] | "
            f"{', '.join(f'{x:.2f}' for x in per)} | {claim} | {decision} |",
            flush=True,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
