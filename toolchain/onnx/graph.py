"""Small ONNX graph queries the rewrites share (fold.py, gemm_route.py, pooling.py, quantize.py).
No onnx import: they read protobuf fields only, so importing this costs nothing."""

from __future__ import annotations

import collections


def int_attr(node, name: str, default: int) -> int:
    """An integer attribute of a node, or `default` where the node does not set it."""
    return next((a.i for a in node.attribute if a.name == name), default)


def input_uses(graph) -> collections.Counter:
    """Tensor name -> how many node inputs read it."""
    return collections.Counter(name for node in graph.node for name in node.input)
