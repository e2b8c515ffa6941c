"""Fold a batch into one tall image where only pointwise work is done, so onnxruntime's INT8
convolutions can use every thread at batch > 1.

onnxruntime 1.32's QLinearConv runs the images of a batch one after the other and splits only
the pixels of one image over threads; on small maps (the last stages of a 32x32 network: 4x4 to
1x1 pixels) a second thread has nothing to do, while float's NCHWc conv splits the batch
(benchmarks/int8_explore.py). A 1x1 convolution with stride 1 treats every pixel alike, so a
batch of N images of HxW is exactly one image of (N*H)xW for it; the same holds for activations,
for per-channel or elementwise arithmetic, and for any conv whose windows tile the image without
overlap or padding (kernel == stride). A conv with a 1x1 output map (a 3x3 depthwise conv on the
last 1x1 or 2x2 maps) is rewritten into that form first: its kernel shrinks to the taps that touch
real pixels. This module finds connected *regions* of such operations (each holding at least
one conv) on maps of at most `max_pixels` pixels and runs them on the folded layout: NCHW ->
NHWC -> reshape [1, N*H, W, C] -> NCHW on the way in, the reverse on the way out. After
quantization onnxruntime's layout optimizer cancels those transposes against its own NHWC ones,
leaving one Reshape (no copy, ~0.5 us of dispatch) at each region boundary.

Measured (onnxruntime 1.32, 2-core AVX-512 VNNI, benchmarks/quantize.py; docs/int8.md "INT8 that is actually
faster"): the demo's INT8 model at batch 1 / 32 runs 1.38x / 1.50x of float with 2 threads (unfolded 1.42x /
1.17x), 1.51x / 1.81x with 1 thread. Shrinking the one-pixel-output convs (8 fewer Reshapes, the last four
depthwise convs batched) took the align-8 demo model's fold from 1.40x / 1.19x to 1.45x / 1.26x on 2 threads
(both versions in one interleaved run). Folding large maps loses: mobilenet_v2 at 224,
batch 8, every region folded 1.76x vs 2.03x unfolded, maps up to 196 pixels 2.02x (int8_explore.py's
fold notes). The quantize stage measures a folded candidate against the others; nothing here
assumes it wins. Torch-free: onnx + numpy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Set, Tuple

import numpy as np

from .graph import input_uses

# Bump when the rewritten graph changes: the quantize stage's cache key holds it
REVISION = 2

# Ops that treat every pixel alike (given the input checks in _eligible)
UNARY = frozenset({"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Identity"})
BINARY = frozenset({"Add", "Mul", "Sub", "Div"})


def fold_batch(src: Path, dst: Path, max_pixels: int, keep: Iterable[str] = ()) -> int:
    """Write src with every foldable region on maps of at most max_pixels (H*W) pixels folded
    into dst; returns the number of regions folded (0: dst is src unchanged). Nodes named in
    `keep` (those quantization leaves float) stay out: a float conv keeps onnxruntime's NCHWc
    layout, so the transposes around it would not cancel."""
    import onnx
    from onnx import shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(src)))
    graph = model.graph
    shapes, inits, keep = _chw_shapes(graph), {i.name: i for i in graph.initializer}, set(keep)
    _tile_single_pixel_convs(graph, inits, shapes, max_pixels, keep)
    region = _regions(graph, inits, shapes, max_pixels, keep)
    if region:
        _rewrite(graph, shapes, region)
    del graph.value_info[:]  # stale for the rewritten tensors; onnxruntime re-infers
    onnx.save(model, str(dst))
    return len(set(region.values()))


def _chw_shapes(graph) -> Dict[str, Tuple[int, int, int]]:
    """Tensor name -> (C, H, W) for 4-D tensors whose C, H and W are known. A batch of static size 1
    leaves a tensor out: folding gains nothing at batch 1, and a [1, C, H, W] tensor that broadcasts
    over the batch of another would not broadcast over N*H."""
    out = {}
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim]
        if len(dims) == 4 and all(dims[1:]) and dims[0] != 1:
            out[vi.name] = (dims[1], dims[2], dims[3])
    return out


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _per_channel_constant(dims: List[int]) -> bool:
    """A constant that broadcasts the same way over (N, C, H, W) and (1, C, N*H, W): no H or batch extent."""
    return len(dims) <= 1 or (dims[-2] == 1 and (len(dims) < 4 or dims[0] == 1))


def _tile_single_pixel_convs(graph, inits, shapes, max_pixels: int, keep: Set[str]) -> None:
    """Rewrite each conv with a 1x1 output from an HxW input (at most max_pixels) into the same conv with an
    HxW kernel, stride HxW and no padding: the window of the one output pixel covers input row r with kernel
    row r + pad_top, so those taps are all that ever touch data (the rest multiply padding). Exact, and the
    result tiles the image, so it folds; a 1x1 input gives a 1x1 pointwise conv."""
    from onnx import helper, numpy_helper

    uses = input_uses(graph)
    for node in graph.node:
        if node.op_type != "Conv" or node.name in keep or node.input[0] not in shapes:
            continue
        weight, attrs, out = inits.get(node.input[1]), _attrs(node), shapes.get(node.output[0])
        _, h, w = shapes[node.input[0]]
        if (
            weight is None
            or len(weight.dims) != 4
            or uses[node.input[1]] != 1
            or out is None
            or out[1:] != (1, 1)
            or h * w > max_pixels
            or any(d != 1 for d in attrs.get("dilations", [1, 1]))
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
        ):
            continue
        top, left = attrs.get("pads", [0, 0, 0, 0])[:2]
        kernel = numpy_helper.to_array(weight)
        tiled = np.zeros(kernel.shape[:2] + (h, w), dtype=kernel.dtype)
        r0, r1, c0, c1 = max(0, -top), min(h, kernel.shape[2] - top), max(0, -left), min(w, kernel.shape[3] - left)
        tiled[:, :, r0:r1, c0:c1] = kernel[:, :, r0 + top : r1 + top, c0 + left : c1 + left]
        weight.CopyFrom(numpy_helper.from_array(tiled, weight.name))
        kept = [a for a in node.attribute if a.name not in ("kernel_shape", "strides", "pads", "dilations", "auto_pad")]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.extend(
            helper.make_attribute(k, v)
            for k, v in (("kernel_shape", [h, w]), ("strides", [h, w]), ("pads", [0, 0, 0, 0]))
        )


def _eligible(node, inits, shapes) -> bool:
    if not node.output or node.output[0] not in shapes:
        return False
    if node.op_type == "Conv":  # windows that tile each image (kernel == stride, no padding) never cross images
        weight, attrs = inits.get(node.input[1]), _attrs(node)
        if weight is None or node.input[0] not in shapes:
            return False
        kernel, (_, h, w) = list(weight.dims[2:]), shapes[node.input[0]]
        return (
            list(attrs.get("strides", [1, 1])) == kernel
            and not any(attrs.get("pads", [0]))
            and all(d == 1 for d in attrs.get("dilations", [1, 1]))
            and h % kernel[0] == 0
            and w % kernel[1] == 0
        )
    if node.op_type in UNARY:  # Clip's min / max: constants
        return node.input[0] in shapes and all(i in inits for i in node.input[1:] if i)
    if node.op_type in BINARY:  # same-shape tensors, or one tensor and a per-channel constant
        dynamic = [i for i in node.input if i in shapes]
        constant = [i for i in node.input if i not in shapes]
        return (
            bool(dynamic)
            and all(shapes[i] == shapes[node.output[0]] for i in dynamic)
            and all(i in inits and _per_channel_constant(list(inits[i].dims)) for i in constant)
        )
    return False


def _regions(graph, inits, shapes, max_pixels: int, keep: Set[str]) -> Dict[int, int]:
    """Node index -> region id, for regions that hold at least one conv."""
    producer = {o: k for k, n in enumerate(graph.node) for o in n.output}
    members: Set[int] = set()
    for k, node in enumerate(graph.node):  # graph order is topological
        if node.name in keep or not _eligible(node, inits, shapes):
            continue
        _, h, w = shapes[node.output[0]]
        if h * w > max_pixels:
            continue
        if node.op_type in UNARY and producer.get(node.input[0]) not in members:
            continue  # an activation stays with its producer: a Clip after a 3x3 conv folds into that conv's range
        members.add(k)
    parent = {k: k for k in members}

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for k in members:
        for name in graph.node[k].input:
            p = producer.get(name)
            if p in members:
                parent[root(p)] = root(k)
    with_conv = {root(k) for k in members if graph.node[k].op_type == "Conv"}
    return {k: root(k) for k in members if root(k) in with_conv}


def _rewrite(graph, shapes, region: Dict[int, int]) -> None:
    """Insert fold chains before region inputs and unfold chains after region outputs."""
    from onnx import helper, numpy_helper

    inits = {i.name for i in graph.initializer}
    producer = {o: k for k, n in enumerate(graph.node) for o in n.output}
    consumers: Dict[str, List[int]] = {}
    for k, n in enumerate(graph.node):
        for name in n.input:
            consumers.setdefault(name, []).append(k)
    graph_outputs = {o.name for o in graph.output}

    def chain(src: str, dst: str, shape: List[int], tag: str) -> list:
        graph.initializer.append(numpy_helper.from_array(np.array(shape, dtype=np.int64), tag + "_shape"))
        return [
            helper.make_node("Transpose", [src], [tag + "_nhwc"], perm=[0, 2, 3, 1], name=tag + "_nhwc"),
            helper.make_node("Reshape", [tag + "_nhwc", tag + "_shape"], [tag + "_r"], name=tag + "_reshape"),
            helper.make_node("Transpose", [tag + "_r"], [dst], perm=[0, 3, 1, 2], name=tag + "_nchw"),
        ]

    nodes, folded = [], {}  # tensor -> its folded name, per region
    for k, node in enumerate(graph.node):
        rid = region.get(k)
        if rid is None:
            nodes.append(node)
            continue
        for j, name in enumerate(node.input):
            if not name or name in inits or region.get(producer.get(name, -1)) == rid:
                continue
            key = (name, rid)
            if key not in folded:
                c, h, w = shapes[name]
                folded[key] = f"{name}__fold{rid}"
                nodes += chain(name, folded[key], [1, -1, w, c], folded[key])
            node.input[j] = folded[key]
        nodes.append(node)
        for j, name in enumerate(node.output):
            users = consumers.get(name, [])
            if all(region.get(u) == rid for u in users) and name not in graph_outputs:
                continue
            inner = f"{name}__folded"
            for u in users:
                if region.get(u) == rid:
                    graph.node[u].input[:] = [inner if i == name else i for i in graph.node[u].input]
            node.output[j] = inner
            producer[inner] = k
            c, h, w = shapes[name]
            nodes += chain(inner, name, [-1, h, w, c], f"{name}__unfold")
    del graph.node[:]
    graph.node.extend(nodes)
