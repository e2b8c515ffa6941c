"""How the layer table's sum misses a thinner network's latency: the cost model's constant remainder
against a proportional one, each checked against a measured speedup.

    .venv/bin/python benchmarks/table_remainder.py                          # mobilenet_v2, 32x32, batch 32, 1 thread
    .venv/bin/python benchmarks/table_remainder.py --size 224 --batch 1 --widths 0.5

prune/costmodel.py predicts a pruned model as `constant + sum of its layers' isolated times`, with
`constant = measured full model - sum of the full model's layers` (issue 31's table-only prediction).
That constant holds whatever the sum of single-layer models misses, and it does not shrink with the
widths. This script takes torchvision's mobilenet_v2 at width_mult 1.0 (the "student") and at thinner
widths (every layer thinner, as a uniform pruning would make it), times each one's convolutions as the
latency table does (bench/latency_table.py: one single-layer ONNX model per distinct shape), measures
each thin model against the full one with the paired comparison (bench/compare.py: fresh-process
replicates, 95% interval), and prints the speedup each remainder model predicts:
- constant:      full / (sum_thin + (full - sum_full))     what costmodel.py does today;
- proportional:  sum_full / sum_thin                        the remainder scales with the layers.
The measured interval says which one a cost model should lean to; random weights (latency only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolchain.bench.compare import Plan, Settings, compare  # noqa: E402
from toolchain.bench.latency_table import lookup, measure_table  # noqa: E402
from toolchain.onnx.export import INPUT_NAME, export_onnx  # noqa: E402
from toolchain.recipe import ExportConfig  # noqa: E402


def export(width: float, size: int, classes: int, path: Path) -> bytes:
    """mobilenet_v2 at `width`, random weights, exported as the export stage does (torchscript, opset 17:
    the table's single layers are plain Conv/Gemm either way); returns the file's bytes."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=classes, width_mult=width).eval()
    export_onnx(model, path, torch.randn(2, 3, size, size), ExportConfig(exporter="torchscript", opset=17), {})
    return path.read_bytes()


def layer_shapes(model_bytes: bytes, size: int) -> List[Dict]:
    """Every Conv and Gemm of the exported file, in the latency table's spec form."""
    import onnx

    proto = onnx.shape_inference.infer_shapes(onnx.load_from_string(model_bytes))
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.value_info}
    dims[INPUT_NAME] = [0, 3, size, size]
    weights = {i.name: list(i.dims) for i in proto.graph.initializer}
    layers = []
    for node in proto.graph.node:
        if node.op_type == "Gemm":
            cout, cin = weights[node.input[1]]
            layers.append({"name": node.name, "op": "linear", "cin": cin, "cout": cout})
        if node.op_type != "Conv":
            continue
        attrs = {a.name: (list(a.ints) if a.ints else a.i) for a in node.attribute}
        w, x = weights[node.input[1]], dims[node.input[0]]
        layers.append(
            {
                "name": node.name,
                "op": "conv",
                "cin": x[1],
                "cout": w[0],
                "height": x[2],
                "width": x[3],
                "kernel": w[2:],
                "stride": list(attrs.get("strides", [1, 1])),
                "padding": list(attrs.get("pads", [0, 0, 0, 0])[:2]),
                "dilation": list(attrs.get("dilations", [1, 1])),
                "groups": attrs.get("group", 1),
            }
        )
    return layers


def layers_ms(model_bytes: bytes, size: int, batch: int, threads: int) -> float:
    layers = layer_shapes(model_bytes, size)
    table = measure_table({"version": 1, "batch_size": batch, "threads": threads, "layers": layers})
    return sum(lookup(table, layer) for layer in layers)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--widths", default="0.75,0.5", help="width_mult of the thin models, comma-separated")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of the paired comparison")
    args = parser.parse_args(argv)
    widths = [float(w) for w in args.widths.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        files, sums = {}, {}
        for width in [1.0, *widths]:
            name = f"w{width:g}"
            files[name] = Path(tmp) / f"{name}.onnx"
            sums[name] = layers_ms(
                export(width, args.size, args.classes, files[name]), args.size, args.batch, args.threads
            )
            print(f"{name}: sum of its single-layer times at batch {args.batch}: {sums[name]:.3f} ms", flush=True)
        pairs = [("w1", f"w{w:g}") for w in widths]
        result = compare(
            {k: str(v) for k, v in files.items()},
            pairs,
            [args.batch],
            Settings(intra_op_threads=args.threads),
            Plan(budget_s=args.budget),
            input_shape=[3, args.size, args.size],
        )
        full = statistics.median(r["medians_ms"][f"w1@{args.batch}"] for r in result.replicates)
        print(
            f"\nmobilenet_v2 at {args.size}x{args.size}, batch {args.batch}, {args.threads} thread(s); "
            f"full model p50 {full:.3f} ms, sum of its layers {sums['w1']:.3f} ms ({result.stopped})"
        )
        print(f"{'width':>6} {'measured speedup':>22} {'constant':>16} {'proportional':>16}")
        for base, thin in pairs:
            measured = result.ratio(base, thin, args.batch)
            constant = full / (sums[thin] + full - sums[base])
            proportional = sums[base] / sums[thin]

            cells = [f"{p:.2f}x ({100 * (p / measured.ratio - 1):+.1f}%)" for p in (constant, proportional)]
            print(f"{thin[1:]:>6} {measured.text():>22} {cells[0]:>16} {cells[1]:>16}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
