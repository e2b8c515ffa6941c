"""Small ONNX graph queries the rewrites share (fold.py, gemm_route.py, pooling.py, quantize.py, qat.py).
No onnx import: they read protobuf fields only, so importing this costs nothing."""

from __future__ import annotations

import collections
import math

FLOAT = 1  # onnx.TensorProto.FLOAT


def int_attr(node, name: str, default: int) -> int:
    """An integer attribute of a node, or `default` where the node does not set it."""
    return next((a.i for a in node.attribute if a.name == name), default)


def input_uses(graph) -> collections.Counter:
    """Tensor name -> how many node inputs read it."""
    return collections.Counter(name for node in graph.node for name in node.input)


def runtime_int8(graph) -> list:
    """The Conv / Gemm nodes a QDQ graph keeps float that onnxruntime runs in INT8 all the same.

    onnxruntime's WeightBiasQuantization (graph optimization level basic and above: on by default)
    gives every Conv or Gemm whose input comes from a per-tensor DequantizeLinear per-tensor int8
    weights (with a zero point, over [min(w, 0), max(w, 0)]) and an int32 bias at input scale x
    weight scale, when its weight is a float initializer (and its bias, if any, a 1-D initializer)
    and its output leads, without branching, through Relu / Clip only, to a QuantizeLinear. So a
    block "kept float" between INT8 activations is not float at run time unless its input is
    dequantized per axis (float_fallback.py, docs/int8.md); a classifier whose logits are the graph's
    output is left float."""
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    found = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
            continue
        dq, weight = producers.get(node.input[0]), inits.get(node.input[1])
        scale = inits.get(dq.input[1]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if scale is None or math.prod(scale.dims) != 1 or weight is None or weight.data_type != FLOAT:
            continue
        bias = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and (bias is None or len(bias.dims) != 1):
            continue
        if _leads_to_quantize(node, consumers):
            found.append(node)
    return found


def _leads_to_quantize(node, consumers) -> bool:
    """onnxruntime's IsNoBranchPathToQuantizeLinear: one consuming node at each step, Relu / Clip
    allowed, ending at a QuantizeLinear."""
    while len(node.output) == 1 and len(consumers[node.output[0]]) == 1:
        node = consumers[node.output[0]][0]
        if node.op_type == "QuantizeLinear":
            return True
        if node.op_type not in ("Relu", "Clip"):
            return False
    return False
