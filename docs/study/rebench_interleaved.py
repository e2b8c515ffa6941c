"""Re-measure the study's ONNX files interleaved, to separate latency from machine noise.

The bench stage measures each run's final model, then its teacher, then its student,
one after the other; on a CPU shared with other jobs a burst of load during one of
them skews the ratio. Here every file (8 finals, 4 KD students, 1 teacher) gets one
onnxruntime session (1 intra-op thread, like the study recipe) and is timed in
round-robin: ROUNDS rounds x CALLS calls at batch 1; its latency is the median of all
its calls. A weight-pruned model and its dense student have the same graph, so their
ratio (expected 1.00x) shows what noise is left.

    python docs/study/rebench_interleaved.py [--export export] [--prefix study-fmnist-] [--rounds 30]

Writes docs/study/latency_interleaved.{md,csv}. PE(latency) is recomputed with these
latencies and the runs' own test accuracies (summary.json), same formula as the pipeline.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from toolchain.bench.ort import create_session, make_input, model_input
from toolchain.metrics import performance_efficiency


def load_runs(export: Path, prefix: str):
    runs = {}
    for summary_path in sorted(export.glob(f"{prefix}*/summary.json")):
        s = json.loads(summary_path.read_text())
        if s.get("status") != "FINISHED" or "bench" not in s.get("stages", {}):
            continue
        stages = s["stages"]
        runs[s["run_name"]] = {
            "final": Path(stages["export"]["paths"]["onnx"]),
            "teacher": Path(stages["export"]["paths"]["reference_teacher"]),
            "student": Path(stages["export"]["paths"]["reference_student"]),
            "acc": stages["finetune"]["metrics"]["test_accuracy"],
            "acc_teacher": stages["teacher"]["metrics"]["test_accuracy"],
            "acc_student": stages["distill"]["metrics"]["test_accuracy"],
            "student_model": json.loads((summary_path.parent / "model_card.json").read_text())["model"],
            "recorded_p50": stages["bench"]["metrics"]["latency_p50_ms.cpu.bs1"],
        }
    return runs


def interleaved(files, rounds: int, calls: int, warmup: int = 20):
    sessions = {}
    for key, path in files.items():
        session = create_session(path, "cpu", intra_op_threads=1, inter_op_threads=1, graph_optimization="all")
        inp = model_input(session)
        x = make_input((1, *[int(d) for d in inp["shape"][1:]]), inp["dtype"])
        sessions[key] = (session, {inp["name"]: x})
        for _ in range(warmup):
            session.run(None, sessions[key][1])
    times = {key: [] for key in files}
    for _ in range(rounds):
        for key, (session, feed) in sessions.items():
            for _ in range(calls):
                t0 = time.perf_counter()
                session.run(None, feed)
                times[key].append(time.perf_counter() - t0)
    return {key: float(np.median(v) * 1e3) for key, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", default="export")
    parser.add_argument("--prefix", default="study-fmnist-")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out", default="docs/study")
    args = parser.parse_args()

    runs = load_runs(Path(args.export), args.prefix)
    files = {}
    for name, r in runs.items():  # the references are exported once per run: time one copy of each
        files[name] = r["final"]
        files.setdefault(f"student:{r['student_model']}", r["student"])
        files.setdefault("teacher", r["teacher"])
    p50 = interleaved(files, args.rounds, args.calls)

    rows = []
    for name, r in runs.items():
        lat, lat_s, lat_t = p50[name], p50[f"student:{r['student_model']}"], p50["teacher"]
        pe_t = performance_efficiency(r["acc"], r["acc_teacher"], 1, 1, latency=lat, latency_ref=lat_t)
        pe_s = performance_efficiency(r["acc"], r["acc_student"], 1, 1, latency=lat, latency_ref=lat_s)
        rows.append({"run_name": name, "p50_ms": lat, "student_p50_ms": lat_s, "teacher_p50_ms": lat_t,
                     "speedup_vs_student": lat_s / lat, "recorded_p50_ms": r["recorded_p50"],
                     "vs_teacher.pe_latency": pe_t["pe_latency"], "vs_student.pe_latency": pe_s["pe_latency"]})
    out = Path(args.out)
    with open(out / "latency_interleaved.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| run | p50 ms | KD student p50 ms | teacher p50 ms | speedup vs student | p50 ms in the sweep's bench | PE(latency) vs teacher | PE(latency) vs student |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run_name']} | {r['p50_ms']:.3f} | {r['student_p50_ms']:.3f} | {r['teacher_p50_ms']:.3f} | "
                     f"{r['speedup_vs_student']:.2f}x | {r['recorded_p50_ms']:.3f} | {r['vs_teacher.pe_latency']:.3f} | {r['vs_student.pe_latency']:.3f} |")
    (out / "latency_interleaved.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
