"""Send wide INT8 convolutions to onnxruntime's general QGEMM instead of its symmetric conv kernels.

onnxruntime 1.32's QLinearConv picks its kernel from the weight zero point: int8 weights whose zero
point is 0 (what symmetric quantization writes) take MLAS's symmetric convolution kernels (AVX-512
VNNI); any other zero point takes MLAS's general u8s8 QGEMM, which runs on AMX tiles where the CPU
has them (MLAS platform.cpp, qgemm_kernel_amx.cpp). Which is faster depends on the conv's width K
(weights per output channel), measured with benchmarks/gemm_route.py (one NHWC QLinearConv, batch 1,
2-core Xeon with AVX-512 VNNI + AMX; us symmetric / general on 2 threads): K = 16 (16 -> 96 at
112x112): 125 / 414; K = 96: 41 / 50; K = 128-256: 0.88-1.16x; K = 320: 26 / 24 and 69 / 49 (-> 1280);
K = 576 (1x1 at 14x14): 34 / 25; K = 960: 33 / 24; 3x3 convs with 128-512 channels 1.13-1.84x, but
64 channels at 56x56 (K = 576, im2col on a large map) 214 / 322. On 1 thread the general kernel wins
from K = 192. So a conv with at least `min_weights` weights per output channel (320 in the registered
`*_gemm` candidates: where the 2-thread crossover lies) gets its int8
weights shifted by -1 and a zero point of -1: w_q - zp is unchanged, so the model computes exactly
the same function, but onnxruntime runs it on the general kernel. Symmetric int8 weights lie in
[-127, 127], so the shift never overflows; a weight tensor holding -128 is left alone.

Whole models (benchmarks/quantize.py, docs/int8.md "INT8 that is actually faster"; 2 threads, batch 1 / 8):
resnet18 at 224 2.74x / 2.81x of float -> 3.21x / 4.28x, mobilenet_v2 at 224 1.51x / 2.13x -> 1.67x /
2.23x; at 32x32 the route loses on 2 threads (small maps), and the demo's pruned model has 3 convs
that wide (no measurable change).
The quantize stage measures candidates with and without this rewrite and ships the faster one, so
a CPU without AMX, where the general kernel may lose, keeps the symmetric kernels. Torch-free: onnx
+ numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .graph import input_uses, int_attr

# Bump when the rewritten graph changes: the quantize stage's cache key holds it
REVISION = 1


def route_wide_convs_to_gemm(path: Path, min_weights: int) -> int:
    """Rewrite the QDQ model at `path` in place: every group-1 Conv with at least `min_weights`
    weights per output channel whose int8 weight is dequantized with zero point 0 gets weights - 1
    and zero point -1. Returns the number of convs rewritten."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    uses = input_uses(graph)
    rewritten, replaced = 0, set()
    for conv in (n for n in graph.node if n.op_type == "Conv" and int_attr(n, "group", 1) == 1):
        dq = producer.get(conv.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
            continue
        weight, zero = inits.get(dq.input[0]), inits.get(dq.input[2])
        if weight is None or zero is None or uses[weight.name] != 1:
            continue
        w, zp = numpy_helper.to_array(weight), numpy_helper.to_array(zero)
        if w.dtype != np.int8 or w.ndim < 3 or int(np.prod(w.shape[1:])) < min_weights or zp.any() or w.min() < -127:
            continue
        weight.CopyFrom(numpy_helper.from_array((w.astype(np.int16) - 1).astype(np.int8), weight.name))
        shifted = numpy_helper.from_array(np.full(zp.shape, -1, np.int8), f"{weight.name}_zero_point_gemm")
        graph.initializer.append(shifted)
        uses[zero.name] -= 1
        replaced.add(zero.name)
        dq.input[2] = shifted.name
        rewritten += 1
    for name in (n for n in replaced if uses[n] == 0):  # zero points no DequantizeLinear reads any more
        graph.initializer.remove(inits[name])
    if rewritten:
        onnx.save(model, str(path))
    return rewritten
