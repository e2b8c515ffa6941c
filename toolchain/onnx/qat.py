"""A QDQ ONNX file as a trainable PyTorch module, and the trained weights written back into it.

Quantization-aware distillation (stages/qad.py) trains the very graph onnxruntime will run: the
candidate's QDQ file, with its layout (which tensors are INT8, per-channel or per-tensor weights,
the blocks kept in float, BatchNorm already folded, Clip/Relu absorbed into quantization ranges)
and its calibrated scales and zero points as the start. Nothing is re-derived from PyTorch modules,
so the fake-quantized forward and the exported file cannot disagree on layout.

    QdqModule(qdq_proto, float_proto, scales)   the graph node by node in torch:
        QuantizeLinear      fake quantization: x / scale rounded half to even (torch.round, as
                            onnxruntime), + zero point, saturated to the type's range; the rounding
                            passes gradients straight through
        DequantizeLinear    of an activation: identity (its QuantizeLinear already dequantized);
                            of a weight: the float weight fake-quantized symmetrically with a scale
                            from its current range (max |w| / qmax, per output channel where the file
                            has an axis), as onnxruntime quantizes weights;
                            of a bias: rounded to int32 at input scale x weight scale
        other ops           their float definition (ONNX_OPS)
      scales: "learned" (each activation scale a parameter, trained in log space so it stays
      positive; zero points fixed) or "frozen" (the calibration's scales).
    write_qdq(module, qdq_proto, path)          the same graph with the trained weights quantized
                                                with the current scales (int8 weights, int32 biases)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

from ..errors import ToolchainError
from ..fsutil import atomic_path
from .graph import runtime_int8

QUANTIZED_SUFFIX = "_quantized"  # onnxruntime's name for a quantized initializer: <float name>_quantized
_RANGES = {onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT8: (-128, 127)}


class QatError(ToolchainError):
    """The QDQ graph holds something the trainable module cannot run."""


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward, identity backward (straight-through)."""
    return x + (torch.round(x) - x).detach()


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int):
    """QuantizeLinear then DequantizeLinear, with straight-through rounding (scale gets LSQ gradients)."""
    q = torch.clamp(_round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def _attrs(node) -> Dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _axis_shape(scale: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    if scale.dim() == 0:
        return scale
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


class _Weight:
    """A weight DequantizeLinear: float parameter `param`, symmetric int8 at qmax, per channel along axis."""

    def __init__(self, param: str, axis: Optional[int], qmax: int, scale_name: str):
        self.param, self.axis, self.qmax, self.scale_name = param, axis, qmax, scale_name

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        w = w.detach()
        if self.axis is None:
            absmax = w.abs().max()
        else:
            absmax = w.abs().transpose(0, self.axis).reshape(w.shape[self.axis], -1).max(dim=1).values
        # onnxruntime: scale = max|w| / qmax, and 1 where a tensor (channel) is all zeros
        return torch.where(absmax > 0, absmax / self.qmax, torch.ones_like(absmax))

    def forward(self, w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        s = self.scale(w)
        zero = torch.zeros((), dtype=w.dtype, device=w.device)
        return fake_quantize(w, _axis_shape(s, self.axis or 0, w.dim()), zero, -self.qmax, self.qmax), s


class QdqModule(nn.Module):
    def __init__(self, qdq: onnx.ModelProto, float_model: Optional[onnx.ModelProto] = None, scales: str = "learned"):
        super().__init__()
        if scales not in ("learned", "frozen"):
            raise ValueError(f"scales must be learned or frozen, not {scales!r}")
        graph = qdq.graph
        self.nodes = list(graph.node)
        self._node_attrs = [_attrs(n) for n in self.nodes]
        self._ranges = {i.name: _RANGES[i.data_type] for i in graph.initializer if i.data_type in _RANGES}
        self.input_name = graph.input[0].name
        self.output_name = graph.output[0].name
        self.learned = scales == "learned"
        inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        floats = {i.name: numpy_helper.to_array(i) for i in float_model.graph.initializer} if float_model else {}
        self._names: Dict[str, str] = {}  # initializer name -> parameter / buffer attribute
        self.params = nn.ParameterDict()
        self.log_scales = nn.ParameterDict()
        self.weights: Dict[str, _Weight] = {}  # weight DQ output -> how it is fake-quantized
        self.biases: Dict[str, Tuple[str, str]] = {}  # bias DQ output -> (param, its scale initializer)
        self.act_scales: Dict[str, str] = {}  # activation scale initializer -> attribute
        consumers = self._consumers()
        trained = self._trained_inputs()
        for node in self.nodes:
            if node.op_type == "DequantizeLinear" and node.input[0] in inits:
                self._quantized_initializer(node, inits, floats, consumers)
        for name, value in inits.items():
            if name in trained and value.dtype == np.float32 and name not in self._names:
                self._add_param(name, value)  # float weights of blocks kept in float train too
        for node in self.nodes:
            if node.op_type == "QuantizeLinear":
                self._activation_scale(node.input[1], inits)
        producers = {o: n for n in self.nodes for o in n.output}
        for node in self.nodes:  # a float block's own per-axis DequantizeLinear (float_fallback.py): its Q's scale
            q = producers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear" and node.input[1] not in self.act_scales:
                self.act_scales[node.input[1]] = self.act_scales[q.input[1]]
        for name, value in inits.items():  # everything else: constants (shapes, clip bounds, zero points)
            if name not in self._names and name not in self.act_scales:
                self._buffer(name, torch.from_numpy(np.array(value)))
        # float blocks onnxruntime runs in INT8 anyway: mirrored, or QAD trains another model than the one
        # onnxruntime runs (efficientnet_b0's keep_stem: top-1 agreement 0.77 without it, docs/int8.md)
        self.runtime_int8 = {n.output[0] for n in runtime_int8(graph)}
        unknown = sorted({n.op_type for n in self.nodes} - set(ONNX_OPS) - {"QuantizeLinear", "DequantizeLinear"})
        if unknown:
            raise QatError(
                f"quantization-aware training runs Conv, Gemm and {len(ONNX_OPS) - 2} other ONNX ops; this graph "
                f"also has {', '.join(unknown)}: choose another quantize.qat.candidate or leave qat off"
            )

    # ------------------------------------------------------------ building

    def _consumers(self) -> Dict[str, List]:
        out: Dict[str, List] = {}
        for node in self.nodes:
            for name in node.input:
                out.setdefault(name, []).append(node)
        return out

    def _trained_inputs(self) -> set:
        """Initializers that are Conv / Gemm / MatMul weights or biases (quantized or float)."""
        return {
            n.input[i]
            for n in self.nodes
            if n.op_type in ("Conv", "Gemm", "MatMul")
            for i in (1, 2)
            if i < len(n.input)
        }

    def _add_param(self, name: str, value: np.ndarray) -> str:
        key = f"p{len(self.params)}"
        self.params[key] = nn.Parameter(torch.from_numpy(np.array(value, dtype=np.float32)))
        self._names[name] = key
        return key

    def _buffer(self, name: str, value: torch.Tensor) -> str:
        # recorded in _names here, not by the callers: attributes are numbered by len(_names), and a buffer
        # left out of it gave the next one its name (frozen activation scales were overwritten so)
        attr = self._names[name] = f"c{len(self._names)}"
        self.register_buffer(attr, value, persistent=True)
        return attr

    def _quantized_initializer(self, node, inits, floats, consumers) -> None:
        qname, scale_name = node.input[0], node.input[1]
        q, scale = inits[qname], inits[scale_name].astype(np.float32)
        zp = inits[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros((), q.dtype)
        axis = _attrs(node).get("axis", 1) if scale.ndim == 1 and scale.size > 1 else None
        base = qname[: -len(QUANTIZED_SUFFIX)] if qname.endswith(QUANTIZED_SUFFIX) else None
        deq = (q.astype(np.float32) - _axis_np(zp, axis, q.ndim)) * _axis_np(scale, axis, q.ndim)
        value = floats[base] if base in floats and floats[base].shape == q.shape else deq
        users = consumers.get(node.output[0], [])
        is_bias = q.dtype == np.int32 and any(
            u.op_type in ("Conv", "Gemm") and list(u.input)[2:3] == [node.output[0]] for u in users
        )
        key = self._add_param(qname, value)
        if is_bias:
            self.biases[node.output[0]] = (key, scale_name)
            return
        if q.dtype != np.int8 or np.any(zp != 0):
            raise QatError(f"{qname}: weights are trained as symmetric int8; this file has {q.dtype} with zero points")
        qmax = int(np.abs(q).max()) or 127  # 127, or 64 where onnxruntime reduced the range
        self.weights[node.output[0]] = _Weight(key, axis, qmax, scale_name)

    def _activation_scale(self, scale_name: str, inits) -> None:
        if scale_name in self.act_scales:
            return
        value = torch.from_numpy(np.array(inits[scale_name], dtype=np.float32))
        if self.learned:
            key = f"s{len(self.log_scales)}"
            self.log_scales[key] = nn.Parameter(value.log())
        else:
            key = self._buffer(scale_name, value)
        self.act_scales[scale_name] = key

    # ------------------------------------------------------------ running

    def constant(self, name: str) -> torch.Tensor:
        key = self._names[name]
        return self.params[key] if key in self.params else getattr(self, key)

    def activation_scale(self, name: str) -> torch.Tensor:
        key = self.act_scales[name]
        return self.log_scales[key].exp() if self.learned else getattr(self, key)

    def output_step(self) -> float:
        """The quantization step of the output (its DequantizeLinear's scale); 0 when it is float."""
        last = next((n for n in self.nodes if n.output[0] == self.output_name), None)
        if last is None or last.op_type != "DequantizeLinear" or last.input[1] not in self.act_scales:
            return 0.0
        return float(self.activation_scale(last.input[1]).detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: Dict[str, torch.Tensor] = {self.input_name: x}
        weight_scales: Dict[str, torch.Tensor] = {}  # weight DQ output -> scale this forward
        in_scales: Dict[str, torch.Tensor] = {}  # activation DQ output -> its scale
        for node, attrs in zip(self.nodes, self._node_attrs):
            op, ins, out = node.op_type, list(node.input), node.output[0]
            if op == "DequantizeLinear":
                if out in self.weights:
                    spec = self.weights[out]
                    env[out], weight_scales[out] = spec.forward(self.params[spec.param])
                elif out not in self.biases:
                    env[out], in_scales[out] = env[ins[0]], self.activation_scale(ins[1])
                continue
            if op == "QuantizeLinear":
                qmin, qmax = self._ranges[ins[2]]
                zp = self.constant(ins[2]).to(env[ins[0]].dtype)
                env[out] = fake_quantize(env[ins[0]], self.activation_scale(ins[1]), zp, qmin, qmax)
                continue
            args = [self._value(name, env, weight_scales, in_scales, node) if name else None for name in ins]
            if out in self.runtime_int8:
                args = _as_onnxruntime_runs_it(args, in_scales[ins[0]])
            env[out] = ONNX_OPS[op](args, attrs)
        return env[self.output_name]

    def _value(self, name, env, weight_scales, in_scales, node) -> torch.Tensor:
        if name in env:
            return env[name]
        if name in self.biases:  # int32 at (input scale x weight scale), as onnxruntime computes it
            key, _ = self.biases[name]
            scale = in_scales[node.input[0]] * weight_scales[node.input[1]]
            zero = torch.zeros((), device=scale.device)
            return fake_quantize(self.params[key], scale, zero, -(2**31), 2**31 - 1)
        return self.constant(name)


def _as_onnxruntime_runs_it(args: List[torch.Tensor], in_scale: torch.Tensor) -> List[torch.Tensor]:
    """A float Conv / Gemm's weight and bias as onnxruntime's WeightBiasQuantization quantizes them
    (graph.runtime_int8): the weight per tensor over [min(w, 0), max(w, 0)] in 255 steps with its zero
    point (GetQuantizationParameter), the bias to int32 at input scale x weight scale."""
    w = args[1]
    low, high = torch.clamp(w.detach().min(), max=0), torch.clamp(w.detach().max(), min=0)
    scale = (high - low) / 255 if bool(high > low) else torch.ones((), dtype=w.dtype, device=w.device)
    zero = torch.round(torch.clamp(-128 - low / scale, -128, 127))
    out = list(args)
    out[1] = fake_quantize(w, scale, zero, -128, 127)
    if len(args) > 2 and args[2] is not None:
        bias_scale = in_scale * scale
        out[2] = _round_ste(args[2] / bias_scale) * bias_scale
    return out


def load_qdq(qdq_path: Path, float_path: Optional[Path], scales: str) -> QdqModule:
    """The trainable module of a QDQ file (float_path: the float graph it was quantized from, whose
    unrounded weights start the training; without it the dequantized INT8 weights do)."""
    qdq = onnx.load(str(qdq_path))
    floats = onnx.load(str(float_path)) if float_path else None
    return QdqModule(qdq, floats, scales)


def _axis_np(a: np.ndarray, axis: Optional[int], ndim: int) -> np.ndarray:
    if axis is None or np.ndim(a) == 0:
        return a
    shape = [1] * ndim
    shape[axis] = -1
    return np.reshape(a, shape)


# ---------------------------------------------------------------- write back


@torch.no_grad()
def write_qdq(module: QdqModule, qdq_path: Path, out_path: Path) -> Dict[str, int]:
    """qdq_path's graph with module's weights quantized at its current scales, atomically to out_path.
    Returns how many initializers of each kind were rewritten."""
    proto = onnx.load(str(qdq_path))
    module = module.cpu()
    new: Dict[str, np.ndarray] = {}
    weight_scales = {}
    for out, spec in module.weights.items():
        w = module.params[spec.param]
        s = spec.scale(w)
        q = torch.clamp(torch.round(w / _axis_shape(s, spec.axis or 0, w.dim())), -spec.qmax, spec.qmax)
        node_input = _dq_input(module, out)
        new[node_input] = q.numpy().astype(np.int8)
        new[spec.scale_name] = s.numpy().astype(np.float32)
        weight_scales[out] = s
    dims = {init.name: tuple(init.dims) for init in proto.graph.initializer}
    for scale_name in module.act_scales:  # a per-axis copy (float_fallback.py) repeats its Q's scale
        scale = module.activation_scale(scale_name).numpy().astype(np.float32)
        new[scale_name] = np.broadcast_to(scale, dims[scale_name]).copy()
    for out, (key, scale_name) in module.biases.items():
        conv = next(n for n in module.nodes if n.op_type in ("Conv", "Gemm") and list(n.input)[2:3] == [out])
        in_scale = module.activation_scale(_dq_node(module, conv.input[0]).input[1])
        s = (in_scale * weight_scales[conv.input[1]]).numpy().astype(np.float32)
        b = module.params[key].numpy()
        new[_dq_input(module, out)] = np.clip(np.round(b / s), -(2**31), 2**31 - 1).astype(np.int32)
        new[scale_name] = s
    for name, key in module._names.items():
        if key in module.params and name not in new:  # float weights of blocks kept in float
            new[name] = module.params[key].numpy().astype(np.float32)
    for init in proto.graph.initializer:
        if init.name in new:
            init.CopyFrom(numpy_helper.from_array(new[init.name].reshape(tuple(init.dims)), init.name))
    with atomic_path(out_path) as tmp:
        onnx.save_model(proto, str(tmp))
    return {"weights": len(module.weights), "biases": len(module.biases), "activation_scales": len(module.act_scales)}


def _dq_node(module: QdqModule, output: str):
    return next(n for n in module.nodes if n.op_type == "DequantizeLinear" and n.output[0] == output)


def _dq_input(module: QdqModule, output: str) -> str:
    return _dq_node(module, output).input[0]


# ---------------------------------------------------------------- ops


def _conv(a, at):
    x, w, b = a[0], a[1], a[2] if len(a) > 2 else None
    pads = list(at.get("pads", [0] * (2 * (w.dim() - 2))))
    half = len(pads) // 2
    if pads[:half] != pads[half:]:
        x = F.pad(x, [p for i in reversed(range(half)) for p in (pads[i], pads[i + half])])
        pads = [0] * len(pads)
    if at.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise QatError("Conv with auto_pad is not supported by quantization-aware training")
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.dim()]
    return conv(x, w, b, at.get("strides", 1), pads[:half], at.get("dilations", 1), at.get("group", 1))


def _gemm(a, at):
    x, w = a[0], a[1]
    x = x.t() if at.get("transA", 0) else x
    w = w.t() if at.get("transB", 0) else w
    y = at.get("alpha", 1.0) * (x @ w)
    if len(a) > 2 and a[2] is not None:
        y = y + at.get("beta", 1.0) * a[2]
    return y


def _reshape(a, at):
    shape = [int(s) for s in a[1].tolist()]
    if not at.get("allowzero", 0):
        shape = [a[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return a[0].reshape(shape)


def _clip(a, at):
    low = a[1] if len(a) > 1 and a[1] is not None else None
    high = a[2] if len(a) > 2 and a[2] is not None else None
    return torch.clamp(a[0], low, high)


def _pool(kind: str) -> Callable:
    def run(a, at):
        k, s = at["kernel_shape"], at.get("strides", at["kernel_shape"])
        pads = list(at.get("pads", [0] * (2 * len(k))))
        if kind == "max":
            return F.max_pool2d(a[0], k, s, pads[: len(k)], ceil_mode=bool(at.get("ceil_mode", 0)))
        return F.avg_pool2d(
            a[0],
            k,
            s,
            pads[: len(k)],
            ceil_mode=bool(at.get("ceil_mode", 0)),
            count_include_pad=bool(at.get("count_include_pad", 0)),
        )

    return run


def _reduce_mean(a, at):
    axes = at.get("axes") or (a[1].tolist() if len(a) > 1 and a[1] is not None else None)
    return a[0].mean(dim=axes, keepdim=bool(at.get("keepdims", 1))) if axes else a[0].mean()


ONNX_OPS: Dict[str, Callable] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda a, at: a[0] @ a[1],
    "Add": lambda a, at: a[0] + a[1],
    "Sub": lambda a, at: a[0] - a[1],
    "Mul": lambda a, at: a[0] * a[1],
    "Div": lambda a, at: a[0] / a[1],
    "Relu": lambda a, at: F.relu(a[0]),
    "Clip": _clip,
    "Sigmoid": lambda a, at: torch.sigmoid(a[0]),
    "HardSigmoid": lambda a, at: torch.clamp(at.get("alpha", 0.2) * a[0] + at.get("beta", 0.5), 0, 1),
    "HardSwish": lambda a, at: F.hardswish(a[0]),
    "Reshape": _reshape,
    "Flatten": lambda a, at: torch.flatten(a[0], at.get("axis", 1)),
    "Transpose": lambda a, at: a[0].permute(*at["perm"]),
    "GlobalAveragePool": lambda a, at: a[0].mean(dim=tuple(range(2, a[0].dim())), keepdim=True),
    "AveragePool": _pool("avg"),
    "MaxPool": _pool("max"),
    "ReduceMean": _reduce_mean,
    "Concat": lambda a, at: torch.cat(a, dim=at["axis"]),
    "Identity": lambda a, at: a[0],
}
