"""What a truly float fallback costs: a candidate's float blocks run in float, or onnxruntime re-quantizes them.

    .venv/bin/python benchmarks/float_fallback.py                                   # efficientnet_b0 at 224
    .venv/bin/python benchmarks/float_fallback.py --model efficientnet_b0 --size 224 --candidate qdq_u8s8_dw_per_channel_keep_stem

onnxruntime's WeightBiasQuantization gives a Conv / Gemm that a QDQ file keeps float INT8 weights
when its input is an INT8 activation; toolchain/onnx/float_fallback.py gives such a node its own
per-axis DequantizeLinear so it stays float (docs/int8.md). This builds the candidate once (random
weights: latency does not depend on the values), derives the same file without those
DequantizeLinear nodes (what onnxruntime re-quantizes), lists which kept-float nodes keep float
weights in onnxruntime's optimized graph for each, and times float, the candidate as the quantize
stage writes it ("own DQ") and without the rewrite ("requantized") in one paired comparison
(bench/compare.py: fresh-process replicates, 95% intervals).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quantize import export_random, random_batches  # noqa: E402
from toolchain.bench.compare import Plan, Settings, compare  # noqa: E402
from toolchain.bench.device import cpu_features, needs_reduce_range  # noqa: E402
from toolchain.onnx.float_fallback import undo  # noqa: E402
from toolchain.onnx.quantize import CANDIDATES, CalibrationReader, preprocess, quantize  # noqa: E402


def float_weights(path: Path, names: List[str], work: Path) -> List[str]:
    """Of `names`, the Conv / Gemm nodes whose weight is still a float initializer after onnxruntime's
    basic graph optimizations (WeightBiasQuantization runs there)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(work / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(work / "optimized.onnx")).graph
    producers = {o for n in graph.node for o in n.output}
    return [n.name for n in graph.node if n.name in names and n.input[1] not in producers]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_b0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--candidate", default="qdq_u8s8_dw_per_channel_keep_stem")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: physical cores)")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds for the paired comparison")
    args = parser.parse_args(argv)
    import onnx

    batches = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pre = work / "pre.onnx"
        preprocess(export_random(args.model, args.size, work / "float.onnx"), pre)
        reader = CalibrationReader(random_batches(args.size, 16), "input", 16)
        own = work / "own_dq.onnx"
        info = quantize(pre, own, CANDIDATES.get(args.candidate), reader, needs_reduce_range(cpu_features()))
        requantized = work / "requantized.onnx"
        model = onnx.load(str(own))
        undo(model)
        onnx.save(model, str(requantized))
        changed = info["float_nodes_own_dequantize"]
        print(f"{args.model} at {args.size}, {args.candidate}: kept float {len(info['excluded_nodes'])} nodes")
        print(f"  fed by an INT8 activation (given their own DequantizeLinear): {changed or 'none'}")
        print(f"  float weights in onnxruntime, own DQ: {float_weights(own, changed, work) or 'none'}")
        print(f"  float weights in onnxruntime, requantized: {float_weights(requantized, changed, work) or 'none'}")
        files = {"float": str(pre), "own_dq": str(own), "requantized": str(requantized)}
        pairs = [("float", "own_dq"), ("float", "requantized"), ("requantized", "own_dq")]
        result = compare(
            files,
            pairs,
            batches,
            Settings(intra_op_threads=args.threads, block_s=0.25),
            Plan(budget_s=args.budget),
            progress=lambda line: print(f"  {line}", flush=True),
        )
        for base, cand in pairs:
            cells = ", ".join(f"batch {b}: {result.ratio(base, cand, b).text()}" for b in batches)
            print(f"  {base} / {cand}: {cells}")
        print(
            f"  [{len(result.replicates)} replicates, stopped: {result.stopped}; other_cpu_load "
            f"{result.environment.get('other_cpu_load')}]"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
