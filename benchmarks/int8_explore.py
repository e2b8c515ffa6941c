r"""INT8 format / option exploration: which quantize_static settings make INT8 faster than float here.

    .venv/bin/python benchmarks/int8_explore.py --sizes "" --threads 2,1 --time 3 --rounds 5   # demo model (make demo first)
    .venv/bin/python benchmarks/int8_explore.py --skip-demo --models mobilenet_v2,resnet18,efficientnet_b0 --sizes 224 \
        --threads 2,1 --time 2       (one command)
    .venv/bin/python benchmarks/int8_explore.py --variants all                 # every variant below (long)
    ... --profile 2      # also: per-node onnxruntime profile at batch 1, float vs INT8 per conv kind

For each model: quant_pre_process, then every variant below built with onnxruntime's quantize_static
(format, activation / weight types, per-channel, extra_options, op_types_to_quantize), each timed
interleaved with the float model in the same run (p50, onnxruntime CPU, graph optimisation ALL,
`--rounds` rotated rounds of `--time`/rounds seconds per model and batch size), for each intra-op
thread count in --threads. Printed per variant: p50 at each batch size, speedup vs float (same run,
same thread count), node-type counts of onnxruntime's optimised graph (session option
optimized_model_filepath: shows whether convs became (Nhwc)QLinearConv or stayed as
DequantizeLinear -> Conv -> QuantizeLinear), and test accuracy where data exists (the demo's
Fashion-MNIST model; random-weight models have none). Variants with a name from the stage's
registry (toolchain/onnx/quantize.py CANDIDATES) are built through it, so the numbers are the stage's.

What it showed (onnxruntime 1.32, Xeon with AVX-512 VNNI + AMX, 2 cores; issue 14):
- u8 activations (QDQ or QOperator, same optimised graph): every Conv becomes an NHWC QLinearConv, one
  Transpose pair for the whole net, the ReLU6 Clips folded into the conv output ranges. s8 symmetric activations
  (onnxruntime's default) keep 35 Clips, 15 float convs and 32 Transposes: 0.2-0.5x of float.
- u8 weights (u8u8) and op_types_to_quantize=Conv/Gemm only are slower; QDQKeepRemovableActivations changes nothing.
- Per-tensor weights collapse the demo model (0.08 accuracy) because of the depthwise convs; per-channel depthwise
  + per-tensor pointwise keeps float accuracy and is faster than all-per-channel.
- MLAS's int8 depthwise and 3-input-channel stem kernels are slower than float's NCHWc ones on narrow layers:
  keeping the first 3 convs float (the stem block) is the largest single gain on mobilenet_v2.
- QLinearConv loops over the images of a batch and parallelises only inside one image, so on 1x1..4x4 maps
  (32x32 inputs) a second intra-op thread does little for INT8 at batch 32 while float's NCHWc conv scales:
  the bs32 speedup with 2 threads is ~1.0x for every format; with 1 thread it is 1.4x. Keeping the last 8-24
  convs float instead (keep_last) adds Q/DQ at every residual Add and is slower; no session option
  (allow_spinning, dynamic_block_base) changed it, nor splitting the batch over two 1-thread runs (1.15x).
- What did help there: a 1x1 conv treats every pixel alike, so folding the batch into one tall image (NHWC
  [N,H,W,C] -> [1,N*H,W,C], exact) for regions of 1x1 convs, activations and residual Adds on small maps
  (toolchain/onnx/fold.py, candidate qdq_u8s8_dw_per_channel_keep_stem_fold) gives QLinearConv N times more
  pixels to split. Demo at batch 32: 1.19x vs 1.03x of float with 2 threads, 1.72x vs 1.41x with 1 thread; batch 1
  pays for 33 Reshape nodes (1.37x vs 1.55x, 1.71x vs 1.78x). Rules that mattered: an activation stays with its
  producer (a Clip pulled away from a 3x3 conv leaves 18 Q/DQ pairs: 0.97x), convs kept float stay out (their
  NCHWc layout does not cancel the transposes), and only small maps fold (mobilenet_v2 at 224, batch 8: every
  region folded 1.76x vs 2.03x unfolded; maps <= 196 pixels 2.02x).
- Also seen, not acted on: onnxruntime 1.32's uint8 Transpose is 5x slower with 2 intra-op threads than with 1
  (8 vs 40-47 us for [32,8,16,16], a standalone one-node model), which costs the demo's INT8 graph ~65 us at batch
  32; MLAS's fast symmetric depthwise kernel needs channel counts that are multiples of 16 on x86 (8 on ARM;
  MLAS convsym.cpp), so
  `prune.align: 16` suits INT8 on AVX-512 (72-channel depthwise convs of the align-8 demo model take the
  generic path); at 224 the int8 depthwise convs of mobilenet_v2 run at 0.9-1.2x of float's while the 1x1 convs
  run at 2-3x (per-node onnxruntime profile, batch 1, 2 threads), which bounds the whole model near 1.7x there.
- Follow-ups (issue 14, later session; one-off scripts except where a flag is named): `--profile 2` on
  mobilenet_v2 @224, batch 1 (us, float / INT8): stem 145 / 303 INT8 or 145 / 147 kept float, depthwise
  877 / 816-882, 1x1 convs 2745 / 1212-1221, other nodes (Q, DQ, Transpose, QLinearAdd, ReorderOutput)
  62 / 312-366. Keeping more of the first blocks float (keep_first_convs 6 / 9) is slower (1.50x / 1.38x vs
  1.64x). Removing the demo's one uint8 Transpose (float Transpose fused into the stem's ReorderOutput, a
  Reshape + Max(x, -3e38) to stop onnxruntime moving it back) changed nothing measurable (1.25x / 1.16x vs
  1.30x / 1.17x): its 2-thread cost in the profile is thread wake-up that moves to the next op. Folding 16x16
  maps too (max_pixels 256 / 1024) did not help (1.20x / 1.22x at batch 32 vs 1.22x). What did: convs with a
  one-pixel output shrink to the taps that touch data and fold (fold.py; align-8 demo model 1.40x / 1.19x ->
  1.45x / 1.26x on 2 threads), and align 16 (align-16 demo model 1.40x / 1.40x; its float model is faster too).
- Later still: QLinearConv takes MLAS's symmetric conv kernels only when the int8 weight zero point is 0; any
  other zero point takes the general u8s8 QGEMM (AMX here). `WeightSymmetric: False` does not get there (random
  and trained weights calibrate to zero point ~0) and u8 weights take the slow u8u8 path (0.77x); shifting
  the int8 weights of wide convs by -1 with zero point -1 does, exactly (toolchain/onnx/gemm_route.py,
  benchmarks/gemm_route.py per conv shape): mobilenet_v2 @224 fold 1.66x / 2.11x -> 1.76x / 2.23x with
  convs of >= 512 weights per output channel moved (1.69x / 2.27x at >= 384, 1.74x / 2.19x at >= 256: noise
  apart, one-off script), resnet18 @224 2.62x / 2.95x -> 3.17x / 4.49x (>= 512). Moving the stem conv too:
  1.73x vs 1.72x. Thresholds 128 / 192 / 320 on keep_stem_fold (19 / 14 / 11 convs moved), mobilenet_v2 @224,
  batch 1 / 8: 1 thread 1.99x / 2.25x, 1.97x / 2.30x, 1.96x / 2.32x (unmoved 1.88x / 2.12x); 2 threads 1.71x /
  2.14x, 1.73x / 2.15x, 1.73x / 2.11x (unmoved 1.66x / 2.06x): below 320 the threshold hardly matters.
- `--profile` prints, per variant, float's total over the INT8 convs alone (as if every other node were free).
  mobilenet_v2 @224 batch 1, dw_per_channel / dw_per_channel_gemm / keep_stem_fold_gemm, after the export's
  GlobalAveragePool rewrite: 1.56x / 1.53x / 1.64x on 2 threads, 1.74x / 1.83x / 1.91x on 1, while the same
  runs measured 1.58x / 1.69x / 1.74x and 1.75x / 1.88x / 1.98x whole-model without the profiler: profiling
  inflates the many small INT8 kernels, so it is where the time goes, not a hard bound. What it does show:
  the depthwise convs run at 0.96-1.15x of float (866 / 849 us on 2 threads), so for 2x at batch 1 the
  rest of the INT8 graph would have to run 2.8x faster than float's, against 2.1-2.2x for its 1x1 convs.
- Measured, not built: leaving 3x3 convs on maps over 1024 pixels on the symmetric kernel (resnet18's four
  64-channel layer1 convs, 0.71x on the general one in gemm_route.py), one-off script, resnet18 @224 batch 1 / 8:
  2 threads 3.15x / 4.44x -> 3.53x / 4.33x, 1 thread 4.74x / 4.68x -> 4.71x / 4.46x. It helps batch 1 on 2
  threads and costs batch 8 on 1, so it would be one more candidate for the stage to measure, not a rule.
  onnxruntime-openvino 1.24.1's OpenVINO EP on the same QDQ files (mobilenet_v2 @224, 2 threads): float 4.39 ms,
  INT8 3.08 ms (1.43x), slower than onnxruntime 1.32's CPU EP for both, so it is no way past the bound either.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> quantize_static settings (quant_format, activation/weight type, per_channel, op_types, extra_options)
CONV_GEMM = ["Conv", "Gemm", "MatMul"]
VARIANTS: Dict[str, Dict[str, Any]] = {
    # onnxruntime's default: QDQ s8s8 symmetric activations per-channel; ReLU6 Clips stay (symmetric activations)
    "qdq_s8s8_pc": dict(fmt="qdq", act="int8", wt="int8", pc=True, extra={"ActivationSymmetric": True}),
    # s8 activations but asymmetric: the Clips are folded into the conv's output range, yet onnxruntime 1.32 still
    # leaves 15 convs float with 32 Transposes around them (s8 activations: no NHWC QLinearConv for them here)
    "qdq_s8s8asym_pc": dict(fmt="qdq", act="int8", wt="int8", pc=True, extra={"ActivationSymmetric": False}),
    "qdq_u8s8_pc": dict(fmt="qdq", act="uint8", wt="int8", pc=True),
    "qdq_u8s8_pt": dict(fmt="qdq", act="uint8", wt="int8", pc=False),
    "qop_u8s8_pc": dict(fmt="qoperator", act="uint8", wt="int8", pc=True),
    "qop_u8s8_pt": dict(fmt="qoperator", act="uint8", wt="int8", pc=False),
    "qop_s8s8asym_pc": dict(fmt="qoperator", act="int8", wt="int8", pc=True),
    # only Conv/Gemm quantized: Add, Clip, pooling stay float between DQ/Q pairs
    "qdq_u8s8_pc_convonly": dict(fmt="qdq", act="uint8", wt="int8", pc=True, ops=CONV_GEMM),
    "qop_u8s8_pc_convonly": dict(fmt="qoperator", act="uint8", wt="int8", pc=True, ops=CONV_GEMM),
    # keep Clip as its own quantized op (no folding): shows what folding is worth
    "qdq_u8s8_pc_keepclip": dict(
        fmt="qdq", act="uint8", wt="int8", pc=True, extra={"QDQKeepRemovableActivations": True}
    ),
    # u8 weights too (u8u8 kernels)
    "qop_u8u8_pc": dict(fmt="qoperator", act="uint8", wt="uint8", pc=True),
    "qdq_u8u8_pc": dict(fmt="qdq", act="uint8", wt="uint8", pc=True),
    # per-channel weights only for depthwise convs (TensorQuantOverrides axis 0), per-tensor elsewhere
    "qdq_u8s8_pc_dw_only": dict(fmt="qdq", act="uint8", wt="int8", pc="depthwise"),
    # first conv (3 input channels) and classifier kept float
    "qdq_u8s8_pc_keep_first": dict(fmt="qdq", act="uint8", wt="int8", pc=True, exclude=("first_conv",)),
    "qdq_u8s8_pc_dw_only_keep_first": dict(fmt="qdq", act="uint8", wt="int8", pc="depthwise", exclude=("first_conv",)),
    # the first n convs (largest spatial size, fewest channels: where MLAS's int8 kernels are weakest) kept float
    "qdq_u8s8_pc_keep_first2": dict(fmt="qdq", act="uint8", wt="int8", pc=True, keep_first=2),
    "qdq_u8s8_pc_keep_first3": dict(fmt="qdq", act="uint8", wt="int8", pc=True, keep_first=3),
    "qdq_u8s8_pc_keep_first4": dict(fmt="qdq", act="uint8", wt="int8", pc=True, keep_first=4),
    "qdq_u8s8_pc_keep_first5": dict(fmt="qdq", act="uint8", wt="int8", pc=True, keep_first=5),
    "qdq_u8s8_pc_dw_only_keep_first3": dict(fmt="qdq", act="uint8", wt="int8", pc="depthwise", keep_first=3),
    "qdq_u8s8_pc_dw_only_keep_first3_cls": dict(
        fmt="qdq", act="uint8", wt="int8", pc="depthwise", keep_first=3, exclude=("classifier",)
    ),
    "qdq_u8s8_pc_dw_only_keep_first2": dict(fmt="qdq", act="uint8", wt="int8", pc="depthwise", keep_first=2),
    # ... and the last n convs too (1x1 / 2x2 maps at 32x32 input, where QLinearConv's per-image loop cannot use
    # a second thread at batch 32 while float's NCHWc conv can)
    "qdq_u8s8_dw_pc_keep_first3_last8": dict(
        fmt="qdq", act="uint8", wt="int8", pc="depthwise", keep_first=3, keep_last=8
    ),
    "qdq_u8s8_dw_pc_keep_first3_last16": dict(
        fmt="qdq", act="uint8", wt="int8", pc="depthwise", keep_first=3, keep_last=16
    ),
    "qdq_u8s8_dw_pc_keep_first3_last24": dict(
        fmt="qdq", act="uint8", wt="int8", pc="depthwise", keep_first=3, keep_last=24
    ),
    "qdq_u8s8_pc_dw_only_keep_ends": dict(
        fmt="qdq", act="uint8", wt="int8", pc="depthwise", exclude=("first_conv", "classifier")
    ),
}

# the stage's registry names worth comparing (ORT's default, the old and the new defaults) + informative variants
DEFAULT_VARIANTS = (
    "float,qdq_s8s8_per_channel,qdq_u8s8_per_channel,qdq_u8s8_per_tensor,qdq_u8s8_dw_per_channel,"
    "qdq_u8s8_per_channel_keep_stem,qdq_u8s8_dw_per_channel_keep_stem,qdq_u8s8_dw_per_channel_keep_stem_fold,qop_u8u8_pc,"
    "qdq_u8s8_pc_convonly"
)


def build(pre: Path, out: Path, spec: Dict[str, Any], calib, input_name: str, images: int) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from toolchain.onnx.quantize import CalibrationReader, excluded_nodes

    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    extra = {"ActivationSymmetric": False, **spec.get("extra", {})}
    if spec["pc"] == "depthwise":
        extra["TensorQuantOverrides"] = {w: [{"axis": 0}] for w in depthwise_weights(pre)}
    quantize_static(
        str(pre),
        str(out),
        CalibrationReader(calib, input_name, images),
        quant_format=QuantFormat.QDQ if spec["fmt"] == "qdq" else QuantFormat.QOperator,
        per_channel=spec["pc"] is True,
        activation_type=types[spec["act"]],
        weight_type=types[spec["wt"]],
        op_types_to_quantize=spec.get("ops"),
        extra_options=extra,
        nodes_to_exclude=excluded_nodes(pre, spec.get("exclude", ()))
        + first_convs(pre, spec.get("keep_first", 0))
        + last_convs(pre, spec.get("keep_last", 0)),
    )


def depthwise_weights(model_path: Path) -> List[str]:
    import onnx

    from toolchain.onnx.quantize import _is_depthwise

    graph = onnx.load(str(model_path)).graph
    inits = {i.name: i for i in graph.initializer}
    return [n.input[1] for n in graph.node if n.op_type == "Conv" and _is_depthwise(n, inits)]


def first_convs(model_path: Path, n: int) -> List[str]:
    import onnx

    return [node.name for node in onnx.load(str(model_path)).graph.node if node.op_type == "Conv"][:n]


def last_convs(model_path: Path, n: int) -> List[str]:
    import onnx

    convs = [node.name for node in onnx.load(str(model_path)).graph.node if node.op_type == "Conv"]
    return convs[len(convs) - n :] if n > 0 else []


def session(
    path: Path,
    threads: int,
    optimized: Optional[Path] = None,
    spinning: Optional[bool] = None,
    profile_prefix: Optional[str] = None,
):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    if profile_prefix is not None:
        opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
    if spinning is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def node_counts(path: Path, work: Path) -> Dict[str, int]:
    import onnx

    opt = work / (path.stem + ".opt.onnx")
    session(path, 1, optimized=opt)
    return dict(collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node).most_common())


def interleaved_p50(
    files: Dict[str, Path],
    batch_sizes: List[int],
    size: int,
    threads: int,
    seconds: float,
    rounds: int,
    spinning: Optional[bool] = None,
) -> Dict[str, Dict[int, float]]:
    """Per model and batch size: median over rounds of each round's p50 (rounds in rotated order)."""
    names = list(files)
    sessions = {n: session(p, threads, spinning=spinning) for n, p in files.items()}
    inputs = {b: np.random.default_rng(0).standard_normal((b, 3, size, size)).astype(np.float32) for b in batch_sizes}
    per_round: Dict[str, Dict[int, List[float]]] = {n: {b: [] for b in batch_sizes} for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            s = sessions[n]
            feed_name = s.get_inputs()[0].name
            for b in batch_sizes:
                feed = {feed_name: inputs[b]}
                for _ in range(3):
                    s.run(None, feed)
                times, end = [], time.perf_counter() + seconds / rounds
                while time.perf_counter() < end or len(times) < 3:
                    t = time.perf_counter()
                    s.run(None, feed)
                    times.append(time.perf_counter() - t)
                per_round[n][b].append(float(np.median(times)) * 1000)
    return {n: {b: statistics.median(v) for b, v in per_b.items()} for n, per_b in per_round.items()}


def conv_times(path: Path, work: Path, size: int, threads: int, runs: int = 200) -> tuple:
    """onnxruntime's per-node profile at batch 1: (median us of each Conv / QLinearConv in the optimised
    graph's order, median us of every other node summed)."""
    import json
    import os

    import onnx

    optimized = work / (path.stem + ".prof.opt.onnx")
    sess = session(path, threads, optimized=optimized, profile_prefix=str(work / "prof"))
    feed = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)}
    for _ in range(runs):
        sess.run(None, feed)
    trace = sess.end_profiling()
    per_node: Dict[str, List[float]] = collections.defaultdict(list)
    for e in json.load(open(trace)):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[e["name"][: -len("_kernel_time")]].append(e["dur"])
    os.remove(trace)
    median = {n: float(np.median(v)) for n, v in per_node.items()}
    convs = [n.name for n in onnx.load(str(optimized)).graph.node if n.op_type in ("Conv", "QLinearConv")]
    return [median.get(n, 0.0) for n in convs], sum(v for n, v in median.items() if n not in convs)


def conv_kinds(path: Path) -> List[str]:
    """stem (the first conv), depthwise, pointwise (1x1) or spatial, per Conv of the model in graph order."""
    import onnx

    graph = onnx.load(str(path)).graph
    dims = {i.name: list(i.dims) for i in graph.initializer}
    kinds = []
    for n in (n for n in graph.node if n.op_type == "Conv"):
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        kinds.append(
            "stem"
            if not kinds
            else "depthwise"
            if group > 1
            else "pointwise"
            if dims.get(n.input[1], [0, 0, 0])[2:] == [1, 1]
            else "spatial"
        )
    return kinds


def profile(float_path: Path, files: Dict[str, Path], work: Path, size: int, threads: int) -> None:
    """Where INT8 wins and loses: per conv kind, float vs each variant at batch 1 (profiling adds overhead)."""
    kinds = conv_kinds(float_path)
    base, base_other = conv_times(float_path, work, size, threads)
    print(f"\nper-node profile, batch 1, intra_op_threads={threads} (us; float / INT8 = speedup of that part)")
    for name, path in files.items():
        if name == "float":
            continue
        times, other = conv_times(path, work, size, threads)
        if len(times) != len(kinds) or len(base) != len(kinds):
            print(f"  {name}: conv count differs ({len(times)} vs {len(kinds)}), skipped")
            continue
        parts = []
        for kind in ("stem", "depthwise", "pointwise", "spatial"):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            if idx:
                f, q = sum(base[i] for i in idx), sum(times[i] for i in idx)
                parts.append(f"{kind} {f:.0f} / {q:.0f} = {f / max(q, 1):.2f}x")
        total_f, total_q = sum(base) + base_other, sum(times) + other
        parts.append(
            f"other nodes {base_other:.0f} / {other:.0f}; total {total_f:.0f} / {total_q:.0f} "
            f"= {total_f / max(total_q, 1):.2f}x"
        )
        # The most this variant's conv kernels allow: float's whole time over the INT8 convs alone,
        # as if every Quantize / Transpose / Add node were free.
        parts.append(f"bound with free non-conv nodes {total_f / max(sum(times), 1):.2f}x")
        print(f"  {name}: " + "; ".join(parts), flush=True)


def demo_data():
    import dataclasses

    from toolchain.data.loaders import build_data
    from toolchain.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "mobilenet.yaml")
    data = build_data(recipe.data, recipe.seed)
    calib = dataclasses.replace(data.train, augment=False, shuffle=False)
    return calib, data.val, data.test


def explore(
    label: str,
    float_path: Path,
    work: Path,
    size: int,
    batch_sizes: List[int],
    variants: List[str],
    calib,
    images: int,
    threads: List[int],
    seconds: float,
    rounds: int,
    spinning: Optional[bool],
    test=None,
    profile_threads: int = 0,
) -> None:
    from toolchain.onnx.export import onnx_accuracy
    from toolchain.onnx.quantize import CANDIDATES, CalibrationReader, preprocess, quantize

    pre = work / f"{float_path.stem}.pre.onnx"
    preprocess(float_path, pre)
    input_name = session(float_path, 1).get_inputs()[0].name
    files = {"float": float_path}
    for v in variants:
        if v == "float":
            continue
        out = work / f"{float_path.stem}.{v}.onnx"
        t = time.perf_counter()
        try:
            if v in VARIANTS:
                build(pre, out, VARIANTS[v], calib, input_name, images)
            else:  # a registry candidate, built exactly as the stage builds it
                quantize(pre, out, CANDIDATES.get(v), CalibrationReader(calib, input_name, images))
        except Exception as exc:  # report and go on: one failing format must not end the exploration
            print(f"  {v}: build failed: {str(exc).splitlines()[0][:200]}", flush=True)
            continue
        files[v] = out
        print(f"  built {v} in {time.perf_counter() - t:.1f} s", flush=True)
    counts = {n: node_counts(p, work) for n, p in files.items()}
    acc = {n: onnx_accuracy(p, test) for n, p in files.items()} if test is not None else {}
    for th in threads:
        p50 = interleaved_p50(files, batch_sizes, size, th, seconds, rounds, spinning)
        print(f"\n### {label} @{size}, intra_op_threads={th}" + ("" if spinning is None else f", spinning={spinning}"))
        batches = " / ".join(f"bs{b}" for b in batch_sizes)
        print(f"| variant | test acc | p50 ms ({batches}) | speedup vs float | optimised graph |")
        print("|---|---|---|---|---|")
        for n in files:
            a = f"{acc[n]:.4f}" if n in acc else "-"
            ms = " / ".join(f"{p50[n][b]:.3f}" for b in batch_sizes)
            sp = " / ".join(f"{p50['float'][b] / p50[n][b]:.2f}x" for b in batch_sizes)
            graph = " ".join(f"{k}:{c}" for k, c in counts[n].items())
            print(f"| {n} | {a} | {ms} | {sp} | {graph} |", flush=True)
    if profile_threads:
        profile(float_path, files, work, size, profile_threads)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="mobilenet_v2", help="random-weight models (toolchain model registry)")
    p.add_argument("--sizes", default="32")
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help="names from VARIANTS here or from the stage's candidate registry (all: every VARIANTS entry)",
    )
    p.add_argument("--threads", default="2", help="intra-op thread counts, comma separated (2: this machine's cores)")
    p.add_argument(
        "--spinning", choices=["default", "on", "off"], default="default", help="session.intra_op.allow_spinning"
    )
    p.add_argument("--time", type=float, default=1.5, help="timed seconds per model and batch size (all rounds)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-accuracy", action="store_true", help="skip the demo model's test accuracy")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="THREADS",
        help="also profile every node at batch 1 with this many threads: float vs INT8 per conv kind",
    )
    args = p.parse_args(argv)
    variants = ["float", *VARIANTS] if args.variants == "all" else [v for v in args.variants.split(",") if v]
    threads = [int(t) for t in args.threads.split(",")]
    spinning = {"default": None, "on": True, "off": False}[args.spinning]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        demo = ROOT / "export" / "mobilenet-fmnist" / "model.onnx"
        if not args.skip_demo and demo.is_file():
            calib, _, test = demo_data()
            explore(
                "demo pruned mobilenet_v2 (trained)",
                demo,
                work,
                32,
                [1, 32],
                variants,
                calib,
                512,
                threads,
                args.time,
                args.rounds,
                spinning,
                None if args.no_accuracy else test,
                args.profile,
            )
        sizes = [int(s) for s in args.sizes.split(",") if s]
        models = [m for m in args.models.split(",") if m]
        if sizes and models:
            import torch

            sys.path.insert(0, str(ROOT / "benchmarks"))
            from quantize import export_random, random_batches

            torch.set_num_threads(2)
            for size in sizes:
                batch_sizes = [1, 32] if size <= 64 else [1, 8]
                for name in models:
                    path = export_random(name, size, work / f"{name}-{size}.onnx")
                    explore(
                        f"{name} (random weights)",
                        path,
                        work,
                        size,
                        batch_sizes,
                        variants,
                        random_batches(size, 64),
                        64,
                        threads,
                        args.time,
                        args.rounds,
                        spinning,
                        profile_threads=args.profile,
                    )
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
