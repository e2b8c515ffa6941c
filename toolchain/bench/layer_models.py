"""One-layer ONNX models (a Conv or a Gemm), serialised by hand: the latency table (latency_table.py)
times single layers on the deployment device, which has numpy and onnxruntime but not the onnx package.

Standard library + numpy only. The bytes are an ONNX ModelProto (ir_version 8, opset 17, default
domain) in the protobuf wire format; the field numbers are onnx.proto's (onnx 1.x), named where used.

    conv_model(batch, cin, cout, height, width, kernel, stride, padding, dilation, groups, seed=0) -> bytes
        x float32 [batch, cin, height, width] -> Conv(W [cout, cin/groups, kh, kw], B [cout]) -> y
    linear_model(batch, cin, cout, seed=0) -> bytes
        x float32 [batch, cin] -> Gemm(transB=1, W [cout, cin], B [cout]) -> y [batch, cout]
    conv_output_size(size, kernel, stride, padding, dilation) -> int   (ONNX/PyTorch floor rule)

Weights and biases are seeded normal * 0.05 (timing does not depend on the values; the tests
compare the outputs against a reference computed from the same weights).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

IR_VERSION = 8
OPSET = 17
PRODUCER = "toolchain.bench.layer_models"

_VARINT, _LEN = 0, 2  # protobuf wire types
_FLOAT = 1  # TensorProto.DataType.FLOAT (also TypeProto.Tensor.elem_type)
_ATTR_INT, _ATTR_INTS = 2, 7  # AttributeProto.AttributeType


# ---------------------------------------------------------------- wire format


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # a negative int64 is its 64-bit two's complement (ten bytes), as protobuf writes it
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3 | _VARINT) + _varint(int(value))


def _bytes(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | _LEN) + _varint(len(data)) + data


def _str(field: int, text: str) -> bytes:
    return _bytes(field, text.encode("utf-8"))


# ---------------------------------------------------------------- ONNX messages


def _tensor(name: str, array: np.ndarray) -> bytes:
    """TensorProto: dims=1 (repeated, unpacked as proto2 writes it), data_type=2, name=8, raw_data=9."""
    data = np.ascontiguousarray(array, dtype="<f4")  # raw_data is little-endian by the spec
    return b"".join(_int(1, d) for d in data.shape) + _int(2, _FLOAT) + _str(8, name) + _bytes(9, data.tobytes())


def _value_info(name: str, shape: Sequence[int]) -> bytes:
    """ValueInfoProto name=1, type=2 -> TypeProto tensor_type=1 -> Tensor elem_type=1, shape=2
    -> TensorShapeProto dim=1 -> Dimension dim_value=1."""
    dims = b"".join(_bytes(1, _int(1, d)) for d in shape)
    tensor_type = _int(1, _FLOAT) + _bytes(2, dims)
    return _str(1, name) + _bytes(2, _bytes(1, tensor_type))


def _attr_int(name: str, value: int) -> bytes:
    """AttributeProto name=1, i=3, type=20."""
    return _str(1, name) + _int(3, value) + _int(20, _ATTR_INT)


def _attr_ints(name: str, values: Sequence[int]) -> bytes:
    """AttributeProto name=1, ints=8 (repeated), type=20."""
    return _str(1, name) + b"".join(_int(8, v) for v in values) + _int(20, _ATTR_INTS)


def _node(op_type: str, inputs: Sequence[str], attributes: Sequence[bytes]) -> bytes:
    """NodeProto input=1, output=2, name=3, op_type=4, attribute=5; the output is always "y"."""
    body = b"".join(_str(1, i) for i in inputs) + _str(2, "y") + _str(3, op_type.lower()) + _str(4, op_type)
    return body + b"".join(_bytes(5, a) for a in attributes)


def _model(node: bytes, weights: np.ndarray, bias: np.ndarray, x_shape, y_shape) -> bytes:
    """GraphProto node=1, name=2, initializer=5, input=11, output=12; ModelProto ir_version=1,
    producer_name=2, graph=7, opset_import=8 -> OperatorSetIdProto version=2 (domain omitted: default)."""
    graph = (
        _bytes(1, node)
        + _str(2, "layer")
        + _bytes(5, _tensor("W", weights))
        + _bytes(5, _tensor("B", bias))
        + _bytes(11, _value_info("x", x_shape))
        + _bytes(12, _value_info("y", y_shape))
    )
    return _int(1, IR_VERSION) + _str(2, PRODUCER) + _bytes(7, graph) + _bytes(8, _int(2, OPSET))


def _weights(seed: int, w_shape: Sequence[int], cout: int) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal(tuple(w_shape), dtype=np.float32) * np.float32(0.05)
    bias = rng.standard_normal(cout, dtype=np.float32) * np.float32(0.05)
    return weights, bias


# ---------------------------------------------------------------- layers


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """One spatial output dim of a Conv with symmetric padding (floor, as ONNX and PyTorch)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _pair(name: str, value: Sequence[int]) -> List[int]:
    pair = [int(v) for v in value]
    if len(pair) != 2:
        raise ValueError(f"{name} must be two integers (height, width), got {list(value)}")
    return pair


def conv_model(
    batch: int,
    cin: int,
    cout: int,
    height: int,
    width: int,
    kernel: Sequence[int] = (3, 3),
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
    seed: int = 0,
) -> bytes:
    """A one-Conv ONNX model (see the module docstring); ValueError for a shape that cannot exist."""
    (kh, kw), (sh, sw) = _pair("kernel", kernel), _pair("stride", stride)
    (ph, pw), (dh, dw) = _pair("padding", padding), _pair("dilation", dilation)
    if cin % groups or cout % groups:
        raise ValueError(f"groups {groups} must divide cin {cin} and cout {cout}")
    h_out, w_out = conv_output_size(height, kh, sh, ph, dh), conv_output_size(width, kw, sw, pw, dw)
    if h_out < 1 or w_out < 1:
        raise ValueError(f"kernel {kh}x{kw} (dilation {dh}x{dw}) does not fit the padded input {height}x{width}")
    weights, bias = _weights(seed, (cout, cin // groups, kh, kw), cout)
    attributes = [
        _attr_ints("dilations", (dh, dw)),
        _attr_int("group", groups),
        _attr_ints("kernel_shape", (kh, kw)),
        _attr_ints("pads", (ph, pw, ph, pw)),  # ONNX order: begins (h, w), then ends (h, w)
        _attr_ints("strides", (sh, sw)),
    ]
    node = _node("Conv", ("x", "W", "B"), attributes)
    return _model(node, weights, bias, (batch, cin, height, width), (batch, cout, h_out, w_out))


def linear_model(batch: int, cin: int, cout: int, seed: int = 0) -> bytes:
    """A one-Gemm ONNX model, y = x @ W.T + B (PyTorch's Linear layout, hence transB=1)."""
    weights, bias = _weights(seed, (cout, cin), cout)
    node = _node("Gemm", ("x", "W", "B"), [_attr_int("transB", 1)])
    return _model(node, weights, bias, (batch, cin), (batch, cout))
