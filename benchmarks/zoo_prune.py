"""50% channel pruning + speedup + ONNX export with parity, over torchvision's classification zoo.

    nice -n 10 .venv/bin/python benchmarks/zoo_prune.py                       # every model, both engines
    nice -n 10 .venv/bin/python benchmarks/zoo_prune.py --models resnet18 shufflenet_v2_x0_5 --engines nni

Each (model, engine) runs in its own process with a time limit (a hung tracer or an
out-of-memory model fails that row only): random weights (what can be pruned does not depend
on the values), 224x224 (inception_v3 299x299), prune.sparsity 0.5 with the recipe defaults,
then the dynamo ONNX export and the parity gate on a batch of 2. Writes docs/zoo.md: ok/fail,
the MACs ratio after/before, and the failure's first line per model, with totals.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENGINES = ("nni", "torch_pruning")


def image_size(name: str) -> int:
    return 299 if name == "inception_v3" else 224


def one(name: str, engine: str) -> Dict[str, Any]:
    """Prune, export and check one model; the row of the table (failures: the stage and one line)."""
    import torch

    from toolchain.errors import first_line
    from toolchain.models.refs import build
    from toolchain.onnx.export import check_parity, export_onnx
    from toolchain.prune import prune_model
    from toolchain.recipe import ExportConfig, PruneConfig

    torch.manual_seed(0)
    x = torch.randn(2, 3, image_size(name), image_size(name))
    stage = "build"
    try:
        model = build(f"torchvision/{name}", 1000).eval()
        stage = "prune"
        result = prune_model(model, PruneConfig(method="channel", sparsity=0.5, engine=engine), x)
        row = {"macs_ratio": result.report["macs_after"] / result.report["macs_before"]}
        stage = "export"
        cfg = ExportConfig(dynamic_batch=False)
        with tempfile.TemporaryDirectory() as tmp:
            export_onnx(result.model, Path(tmp) / "m.onnx", x, cfg, {})
            stage = "parity"
            check_parity(result.model, Path(tmp) / "m.onnx", x, cfg.parity_atol, cfg.parity_min_agreement, cfg.parity_rtol)
        return {**row, "status": "ok"}
    except Exception as exc:  # noqa: BLE001  (the table records every failure, whatever its type)
        return {"status": "fail", "stage": stage, "error": f"{type(exc).__name__}: {first_line(exc, 200)}"}


def run_isolated(name: str, engine: str, timeout: float) -> Dict[str, Any]:
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, "--one", name, engine], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        row = json.loads(lines[-1]) if lines else {
            "status": "fail", "stage": "process", "error": f"exit {done.returncode}: {(done.stderr.strip().splitlines() or ['?'])[-1][:200]}"}
    except subprocess.TimeoutExpired:
        row = {"status": "fail", "stage": "timeout", "error": f"no result within {timeout:.0f} s"}
    return {**row, "seconds": round(time.perf_counter() - started, 1)}


def markdown(rows: Dict[str, Dict[str, Dict[str, Any]]], engines: List[str], command: str) -> str:
    lines = ["# Channel pruning across torchvision's classification zoo", "",
             f"`{command}` (benchmarks/zoo_prune.py): 50% channel pruning with the recipe defaults, speedup, "
             "dynamo ONNX export and the parity gate, random weights, 224x224 (inception_v3 299x299). "
             "MACs: after / before pruning.", "",
             "| model | " + " | ".join(engines) + " |", "|---|" + "---|" * len(engines)]
    for name, by_engine in rows.items():
        cells = [_cell(by_engine[e]) for e in engines]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Totals: " + "; ".join(
        f"{e}: {sum(r[e]['status'] == 'ok' for r in rows.values())}/{len(rows)} ok" for e in engines), ""]
    return "\n".join(lines)


def _cell(row: Dict[str, Any]) -> str:
    if row["status"] == "ok":
        return f"ok, MACs x{row['macs_ratio']:.2f} ({row['seconds']} s)"
    return f"fail at {row['stage']}: {row['error'].replace('|', '/')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="torchvision model names (default: all classification models)")
    parser.add_argument("--engines", nargs="*", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per model and engine")
    parser.add_argument("--out", default=str(ROOT / "docs" / "zoo.md"))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "ENGINE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    if not args.models:
        from toolchain.models.refs import library_models

        args.models = sorted(library_models("torchvision"))
    rows: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for name in args.models:
        rows[name] = {engine: run_isolated(name, engine, args.timeout) for engine in args.engines}
        print(name, {e: _cell(r) for e, r in rows[name].items()}, flush=True)
        Path(args.out).write_text(markdown(rows, args.engines, " ".join(["benchmarks/zoo_prune.py", *sys.argv[1:]])))


if __name__ == "__main__":
    main()
