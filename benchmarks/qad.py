"""Issue 33's benchmark: quantization-aware distillation (quantize.qat) against post-training INT8 on the demo.

    python benchmarks/qad.py --output-dir export --epochs 1,2,4 --candidate qdq_u8s8_per_tensor [--scales learned,frozen]

Runs recipes/mobilenet.yaml (or --recipe) once per (epochs, scales) with `quantize.qat` set to
`when: always`, bench and package off, in --output-dir: the teacher, KD student, pruned model, export and
the post-training quantize stage come from that folder's stage cache after the first run (qat is not part
of the quantize stage's key), so each row costs its QAD epochs and its latency comparison only.

Printed per row, from the run's summary.json: the float model's validation / test accuracy; the
post-training file that shipped (if any) with its accuracy and speedup interval; the QAD candidate's
accuracy before training (post-training INT8 of the same layout) and after; QAD's speedup over float and
over the shipped post-training file (95% intervals, paired blocks over fresh-process replicates); the
fake-quant vs onnxruntime top-1 agreement and largest logit difference; whether it shipped and why;
the QAD stage's seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _recipe(base: dict, output_dir: Path, epochs: int, scales: str, candidate: str, lr: float) -> dict:
    r = {**base, "bench": None, "package": None}
    r["name"] = f"qad-{candidate}-{scales}-e{epochs}"
    r["output_dir"] = str(output_dir)
    r["tracking"] = {"uri": f"sqlite:///{output_dir.parent}/qad-mlflow.db", "experiment": "qad-benchmark"}
    r["quantize"] = {
        **(base.get("quantize") or {}),
        "qat": {"when": "always", "epochs": epochs, "scales": scales, "candidate": candidate, "lr": lr},
    }
    return r


def _interval(m: dict, prefix: str, b: int) -> str:
    if f"{prefix}.bs{b}" not in m:
        return "-"
    return f"{m[f'{prefix}.bs{b}']:.2f}x [{m[f'{prefix}.bs{b}_lo']:.2f}, {m[f'{prefix}.bs{b}_hi']:.2f}]"


def _row(summary: dict, epochs: int, scales: str, seconds: float, batches) -> str:
    q, qad = summary["stages"]["quantize"], summary["stages"]["qad"]
    qm, m, info = q["metrics"], qad["metrics"], qad["info"]
    ptq = q["info"]["chosen"] or "float"
    ptq_acc = f"{qm['int8.test_accuracy']:.4f}" if qm.get("int8.shipped") else "-"
    cols = [
        f"{epochs}",
        scales,
        f"{qm['float_val_accuracy']:.4f}",
        f"{ptq} {ptq_acc}",
        " / ".join(_interval(qm, "int8.speedup", b) for b in batches),
        f"{m['qad.start_val_accuracy']:.4f}",
        f"{m['qad.val_accuracy']:.4f} / {m['qad.test_accuracy']:.4f}",
        " / ".join(_interval(m, "qad.speedup_vs_float", b) for b in batches),
        " / ".join(_interval(m, "qad.speedup_vs_ptq", b) for b in batches),
        f"{m['qad.parity.top1_agreement']:.4f} / {m['qad.parity.max_abs_logit_diff']:.3g} (step {info['parity']['output_step']:.3g})",
        "yes" if m.get("qad.shipped") else "no",
        f"{m.get('stage_seconds', 0):.0f} s ({seconds:.0f} s run)",
    ]
    return "| " + " | ".join(cols) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "mobilenet.yaml"))
    ap.add_argument("--output-dir", default=str(ROOT / "export"), help="where the stage cache is (and stays)")
    ap.add_argument("--epochs", default="1,2,4")
    ap.add_argument("--scales", default="learned")
    ap.add_argument("--candidate", default="qdq_u8s8_per_tensor")
    ap.add_argument("--lr", type=float, default=0.005)
    args = ap.parse_args()
    base = yaml.safe_load(Path(args.recipe).read_text())
    batches = (base.get("quantize") or {}).get("batch_sizes", [1, 32])
    output_dir = Path(args.output_dir).resolve()
    header = (
        "| QAD epochs | scales | float val acc | PTQ shipped, test acc | PTQ speedup vs float (batch "
        + " / ".join(map(str, batches))
        + ") | QAD start (PTQ) val acc | QAD val / test acc | QAD speedup vs float | QAD speedup vs PTQ file "
        "| fake-quant vs ORT: top-1 / max logit diff | ships | QAD stage |"
    )
    rows = []
    for scales in args.scales.split(","):
        for epochs in map(int, args.epochs.split(",")):
            recipe = _recipe(base, output_dir, epochs, scales, args.candidate, args.lr)
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
                yaml.safe_dump(recipe, f)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "toolchain", "compress", f.name], cwd=ROOT)
            if proc.returncode != 0:
                sys.exit(f"run {recipe['name']} failed ({proc.returncode})")
            summary = json.loads((output_dir / recipe["name"] / "summary.json").read_text())
            rows.append(_row(summary, epochs, scales, time.perf_counter() - t0, batches))
            print("\n".join([header, header_rule(header), *rows]), flush=True)
            print(f"why ({recipe['name']}): {summary['stages']['qad']['info']['reason']}", flush=True)
            if "qad.speedup_vs_float.bs1" not in summary["stages"]["qad"]["metrics"]:
                print(
                    f"outside the accuracy gate, so the stage did not time it: {untimed(summary, batches)}", flush=True
                )


def untimed(summary: dict, batches) -> str:
    """The QAD file against float, timed here as the stage would (its latency settings, fresh processes):
    a file outside the accuracy gate is not timed by the stage, but its speed is the layout's."""
    from toolchain.bench.compare import Plan, Settings, compare

    stages = summary["stages"]
    float_file = Path(summary["files"]["model.onnx"])
    qad_file = float_file.parent.parent / ".cache" / f"qad-{stages['qad']['key']}" / "qad.onnx"
    if not qad_file.is_file():
        return "no qad.onnx found"
    c = compare({"float": float_file, "qad": qad_file}, [("float", "qad")], batches, Settings(), Plan())
    return (
        " / ".join(f"{c.ratio('float', 'qad', b).text()} at batch {b}" for b in batches) + f" ({c.replicates_text()})"
    )


def header_rule(header: str) -> str:
    return "|" + "---|" * (header.count("|") - 1)


if __name__ == "__main__":
    main()
