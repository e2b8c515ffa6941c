"""Global average pooling as GlobalAveragePool (or Identity over a 1x1 map), not ReduceMean, in exported graphs.

torch's dynamo exporter writes adaptive_avg_pool2d(x, 1) and x.mean((2, 3), keepdim=True) as
ReduceMean over the two spatial axes. The result is the same, but onnxruntime treats the two
differently: its static quantizer has an INT8 GlobalAveragePool (QLinearGlobalAveragePool, NHWC) and
no INT8 ReduceMean, so a ReduceMean stays float behind a DequantizeLinear of the whole activation map,
and its NCHWc float path keeps GlobalAveragePool blocked where ReduceMean needs a reorder first.
Measured (one-off script, random-weight efficientnet_b0 at 224, whose 16 squeeze-excitation blocks
each pool; onnxruntime 1.32, 2-core Xeon; batch 1 / 8, speedup vs the ReduceMean float model): float
1.01x / 1.03x on 2 threads, 1.00x / 1.04x on 1; the quantize stage's dw_per_channel_gemm INT8 0.83x /
1.19x -> 1.07x / 1.46x on 2 threads and 1.03x / 1.45x -> 1.32x / 1.69x on 1 (docs/int8.md "INT8 that is
actually faster"). A mean over a statically 1x1 map (the demo's 32x32 input ends on one) is the
identity and becomes Identity instead: onnxruntime's INT8 pool runs channel by channel, and at batch
32 that one node took 420 us of the 1.9 ms that a per-node profile (2 threads) summed for the demo's
INT8 model. With Identity, `make demo`'s quantize stage measured its
candidates at 1.38-1.48x of float at batch 1 and 0.93-1.49x at 32, against 1.30-1.35x and 0.93-1.39x
with ReduceMean the same morning. The export applies both to every model; the parity gate checks the
result.
Torch-free: onnx, imported when called (the stage registry imports this module for REVISION).
"""

from __future__ import annotations

from typing import Dict, List, Optional

from .graph import input_uses, int_attr

# Bump when the rewritten graph changes: the export stage's cache key holds it
REVISION = 2


def simplify_global_pools(proto) -> int:
    """Rewrite `proto` in place: every ReduceMean with keepdims=1 over exactly the last two axes of
    a 4-d tensor becomes a GlobalAveragePool (same output shape and values). Axes given as a
    constant input (opset >= 18) or as an attribute both count. A spatial mean over a map of
    statically 1x1 pixels (a ReduceMean as above or a GlobalAveragePool) is the identity and becomes
    Identity (see the module docstring). Returns the number of nodes rewritten."""
    from onnx import helper

    graph = proto.graph
    shapes = _shapes(proto)
    constants = _constants(graph)
    rewritten, axes_inputs = 0, set()
    for i, node in enumerate(list(graph.node)):
        shape = shapes.get(node.input[0]) if node.input else None
        if shape is None or len(shape) != 4 or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "ReduceMean":
            axes = _axes(node, constants)
            if int_attr(node, "keepdims", 1) != 1 or axes is None or sorted(a % 4 for a in axes) != [2, 3]:
                continue
        elif node.op_type != "GlobalAveragePool" or shape[2:] != [1, 1]:
            continue
        op = "Identity" if shape[2:] == [1, 1] else "GlobalAveragePool"
        axes_inputs.update(node.input[1:2])
        graph.node.remove(node)
        graph.node.insert(i, helper.make_node(op, [node.input[0]], list(node.output), name=node.name))
        rewritten += 1
    _drop_unused(graph, axes_inputs)
    return rewritten


def _shapes(proto) -> Dict[str, List[Optional[int]]]:
    """Tensor name -> dims from onnx shape inference (None where a dim is symbolic or unknown)."""
    import onnx

    g = onnx.shape_inference.infer_shapes(proto).graph
    return {
        v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        for v in (*g.input, *g.value_info, *g.output)
        if v.type.tensor_type.HasField("shape")
    }


def _constants(graph) -> Dict[str, object]:
    """Tensors a node input may name: initializers and Constant nodes (TensorProtos, not converted)."""
    found = {i.name: i for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            found[n.output[0]] = n.attribute[0].t
    return found


def _axes(node, constants: Dict[str, object]) -> Optional[List[int]]:
    from onnx import numpy_helper

    for a in node.attribute:
        if a.name == "axes":
            return list(a.ints)
    tensor = constants.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    if tensor is None:
        return None  # all axes (or none, with noop_with_empty_axes), or axes computed at run time
    values = numpy_helper.to_array(tensor)
    return [int(a) for a in values.reshape(-1)] if values.dtype.kind == "i" else None


def _drop_unused(graph, names) -> None:
    """The rewritten nodes' axes tensors that nothing reads any more (graph inputs and outputs count)."""
    uses = input_uses(graph)
    uses.update(v.name for v in (*graph.input, *graph.output))
    unused = {name for name in names if uses[name] == 0}
    for init in [i for i in graph.initializer if i.name in unused]:
        graph.initializer.remove(init)
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] in unused]:
        graph.node.remove(node)
