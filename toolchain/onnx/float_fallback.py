"""Blocks a QDQ candidate keeps in float run in float: each gets a DequantizeLinear of its own, per axis.

    changed = run_in_float(model)     the ModelProto, changed in place; returns the node names it changed
    undo(model)                       back to the shared DequantizeLinear (what onnxruntime re-quantizes;
                                      benchmarks/float_fallback.py and the tests compare the two)

A Conv / Gemm the quantizer left float (keep_stem, the classifier rule, `auto`'s fallbacks) but whose
input is an INT8 activation is re-quantized by onnxruntime at session start (graph.runtime_int8:
WeightBiasQuantization, per-tensor weights with a zero point): the candidate would not be what it
says, and neither accuracy nor latency of "this block in float" would ever be measured. That
optimizer takes only a per-tensor DequantizeLinear as the node's input, so the node gets its own
DequantizeLinear of the same INT8 tensor with the scale and zero point repeated once per channel
(axis 1: the channels of NCHW, the features of a Gemm input). The values are the same, the other
consumers keep the shared per-tensor DequantizeLinear (their INT8 kernels still fuse), and the block
runs its float kernel on exactly what it was calibrated on. A node with a single input channel has
nothing to spread a scale over and stays as it was (graph.runtime_int8 still lists it).

Checked on this repo's tiny model (tests/test_quantize.py): after the rewrite onnxruntime's optimized
graph (level basic) keeps the node's float weight initializer.
"""

from __future__ import annotations

from typing import List

import numpy as np

from .graph import int_attr, runtime_int8

REVISION = 1  # in the quantize stage key: candidates with a float block after an INT8 activation change
SUFFIX = "_per_axis"  # the repeated scale / zero point: <per-tensor name>_per_axis<channels>


def run_in_float(model) -> List[str]:
    """Give every node graph.runtime_int8 finds a per-axis DequantizeLinear of its own (module doc)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    changed: List[str] = []
    for node in runtime_int8(graph):
        channels = _input_channels(node, inits)
        if channels < 2:
            continue
        dq = producers[node.input[0]]
        if any(n not in inits for n in dq.input[1:3] if n):  # a computed zero point: nothing to repeat
            continue
        inputs = [dq.input[0]]
        for name in [n for n in dq.input[1:3] if n]:  # scale, and the zero point where the file has one
            wide = f"{name}{SUFFIX}{channels}"
            if wide not in inits:
                value = numpy_helper.to_array(inits[name])
                inits[wide] = numpy_helper.from_array(np.full(channels, value.reshape(()), value.dtype), wide)
                graph.initializer.append(inits[wide])
            inputs.append(wide)
        out = f"{node.input[0]}{SUFFIX}_{node.name}"
        axis = 0 if node.op_type == "Gemm" and int_attr(node, "transA", 0) else 1
        at = list(graph.node).index(node)  # just before its one consumer: the graph stays topologically sorted
        graph.node.insert(at, helper.make_node("DequantizeLinear", inputs, [out], name=f"{out}_dq", axis=axis))
        node.input[0] = out
        changed.append(node.name)
    return changed


def _input_channels(node, inits) -> int:
    """The node's input channels from its weight: Conv [out, in / group, kh, kw]; Gemm [K, N], or [N, K] with transB."""
    dims = list(inits[node.input[1]].dims)
    if node.op_type == "Conv":
        return dims[1] * int_attr(node, "group", 1)
    return dims[1] if int_attr(node, "transB", 0) else dims[0]


def undo(model) -> None:
    """Remove every DequantizeLinear run_in_float added (and its now unused initializers): each node
    reads the shared per-tensor DequantizeLinear again, as before the rewrite."""
    graph = model.graph
    own = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear" and SUFFIX in n.input[1]}
    shared = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] not in own}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in own:
                node.input[i] = shared[own[name].input[0]]
    for node in own.values():
        graph.node.remove(node)
    for init in [i for i in graph.initializer if SUFFIX in i.name]:
        graph.initializer.remove(init)
