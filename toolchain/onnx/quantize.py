"""Static INT8 quantization with onnxruntime, as candidates to be measured, not assumed.

onnxruntime's first-choice recipe (QDQ, signed int8 activations and weights, per-channel)
made the demo's pruned mobilenet_v2 slower on this CPU (0.52x at batch 1), while other
formats were faster (../shared/DESIGN.md). So each candidate is a named format choice
(CANDIDATES registry); the quantize stage builds several and ships the one its measurements
pick. Torch-free: numpy, onnx, onnxruntime.

    preprocess(float_path, out_path)                   quant_pre_process (shape inference, fusions)
    CalibrationReader(batches, input_name, limit)      the first `limit` images, the same for every candidate
    quantize(pre_path, out_path, candidate, reader, reduce_range)
                                                       (fold_max_pixels: onnx/fold.py rewrites the input first;
                                                        gemm_min_weights: onnx/gemm_route.py the output after)
    excluded_nodes(model_path, groups, first_convs)    node names for first_conv / classifier / depthwise / first N convs
    quantize_options(pre_path, candidate)              the quantize_static keyword arguments a candidate means
    cpu_features(), needs_reduce_range()               ISA flags that decide which int8 kernels are fast
                                                       (defined in bench/device.py, shared with the device bench)
"""

from __future__ import annotations

import collections.abc
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..bench.compare import Interval, gate
from ..bench.device import cpu_features, needs_reduce_range  # noqa: F401  (importable from here, as before)
from ..errors import ToolchainError, first_line
from ..fsutil import atomic_path
from ..registry import Registry
from .float_fallback import run_in_float
from .fold import fold_batch
from .gemm_route import route_wide_convs_to_gemm
from .graph import int_attr, runtime_int8

EXCLUDE_GROUPS = ("first_conv", "classifier", "depthwise")


class QuantizeError(ToolchainError):
    """INT8 quantization cannot run as asked, or no candidate met the gate with on_miss: error."""


@dataclass(frozen=True)
class Candidate:
    """One way to quantize: format, activation / weight types, granularity, calibration."""

    name: str
    format: str = "qdq"  # qdq (QuantizeLinear/DequantizeLinear pairs) or qoperator (QLinearConv...)
    activations: str = "uint8"
    weights: str = "int8"
    per_channel: bool = False
    calibration: str = "minmax"  # minmax | entropy | percentile
    exclude: Tuple[str, ...] = ()  # EXCLUDE_GROUPS kept in float
    # per_channel False: "depthwise" still quantizes depthwise conv weights per output channel (onnxruntime
    # TensorQuantOverrides, QDQ only) and the other weights per tensor. Per-tensor depthwise weights lost all of
    # the demo model's accuracy; per-tensor pointwise weights lost none and run faster.
    per_channel_only: Tuple[str, ...] = ()
    keep_first_convs: int = 0  # the first N Conv nodes (the stem, largest maps, fewest channels) kept in float
    # > 0: regions of 1x1 convs and pixelwise ops on maps of at most this many pixels run the batch as one tall
    # image (onnx/fold.py), so onnxruntime's image-by-image INT8 convs can use every thread at batch > 1
    fold_max_pixels: int = 0
    # > 0: convs with at least this many weights per output channel run on onnxruntime's general QGEMM (AMX
    # where the CPU has it) instead of its symmetric conv kernels (onnx/gemm_route.py; exact)
    gemm_min_weights: int = 0
    # True: which blocks stay float is searched block by block on the real runtime (onnx/sensitivity.py)
    search: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.per_channel_only) - {"depthwise"}
        if unknown:
            raise ValueError(f"{self.name}: per_channel_only knows only 'depthwise', not {sorted(unknown)}")
        if self.gemm_min_weights and (self.format != "qdq" or self.weights != "int8"):
            raise ValueError(f"{self.name}: gemm_min_weights needs format qdq and int8 weights")

    def describe(self) -> Dict[str, Any]:
        return asdict(self)


CANDIDATES: Registry[Candidate] = Registry("quantization candidate")


def _register(candidate: Candidate) -> None:
    CANDIDATES.register(candidate.name)(candidate)


for _c in (
    # onnxruntime's documented first choice
    Candidate("qdq_s8s8_per_channel", activations="int8", per_channel=True),
    Candidate("qdq_u8s8_per_channel", per_channel=True),
    Candidate("qdq_u8s8_per_tensor"),
    Candidate("qoperator_u8s8_per_tensor", format="qoperator"),
    Candidate("qoperator_u8s8_per_channel", format="qoperator", per_channel=True),
    Candidate("qdq_u8s8_per_tensor_percentile", calibration="percentile"),
    Candidate("qdq_u8s8_per_tensor_keep_ends", exclude=("first_conv", "classifier")),
    Candidate("qdq_u8s8_per_tensor_keep_depthwise", exclude=("depthwise",)),
    Candidate("qdq_u8s8_per_tensor_entropy", calibration="entropy"),
    Candidate("qdq_u8s8_per_channel_keep_depthwise", per_channel=True, exclude=("depthwise",)),
    Candidate(
        "qoperator_u8s8_per_channel_keep_depthwise", format="qoperator", per_channel=True, exclude=("depthwise",)
    ),
    Candidate("qdq_u8s8_per_channel_keep_ends", per_channel=True, exclude=("first_conv", "classifier")),
    # benchmarks/int8_explore.py: MLAS's int8 depthwise and 3-channel stem kernels are slower than float's NCHWc
    # ones on narrow (pruned) layers, and per-channel requantization costs the pointwise convs a few percent
    Candidate("qdq_u8s8_dw_per_channel", per_channel_only=("depthwise",)),
    Candidate("qdq_u8s8_dw_per_channel_keep_stem", per_channel_only=("depthwise",), keep_first_convs=3),
    Candidate("qdq_u8s8_per_channel_keep_stem", per_channel=True, keep_first_convs=3),
    # 64 pixels (8x8 maps): measured on the demo model (32x32 input) and mobilenet_v2 at 224 (onnx/fold.py)
    Candidate(
        "qdq_u8s8_dw_per_channel_keep_stem_fold",
        per_channel_only=("depthwise",),
        keep_first_convs=3,
        fold_max_pixels=64,
    ),
    # 320 weights per output channel: where MLAS's general QGEMM overtakes its symmetric conv kernel on
    # 2 threads (onnx/gemm_route.py); resnet18 and mobilenet_v2 at 224 gain from it
    Candidate("qdq_u8s8_dw_per_channel_gemm", per_channel_only=("depthwise",), gemm_min_weights=320),
    Candidate(
        "qdq_u8s8_dw_per_channel_keep_stem_gemm",
        per_channel_only=("depthwise",),
        keep_first_convs=3,
        gemm_min_weights=320,
    ),
    Candidate(
        "qdq_u8s8_dw_per_channel_keep_stem_fold_gemm",
        per_channel_only=("depthwise",),
        keep_first_convs=3,
        fold_max_pixels=64,
        gemm_min_weights=320,
    ),
    # every block INT8 (depthwise weights per channel), then the blocks whose INT8 costs the accuracy kept in
    # float, chosen by their measured logits divergence and float-fallback latency (onnx/sensitivity.py)
    Candidate("auto", per_channel_only=("depthwise",), search=True),
):
    _register(_c)


# ---------------------------------------------------------------- calibration


class CalibrationReader:
    """onnxruntime CalibrationDataReader over (images, labels) batches: feeds `limit` images,
    already preprocessed like evaluation inputs, as float32 under the model's input name.
    `batches` is iterated afresh on every rewind, so every candidate calibrates on the same images:
    a one-shot iterator (a generator) would hand each candidate the next `limit` images instead."""

    def __init__(self, batches: Iterable[Tuple[Any, Any]], input_name: str, limit: int, batch_size: int = 32):
        if isinstance(batches, collections.abc.Iterator):
            raise TypeError(
                "CalibrationReader needs re-iterable batches (a list or a loader), not a one-shot iterator: "
                "every candidate must calibrate on the same images"
            )
        self.input_name, self.limit, self.batch_size = input_name, limit, batch_size
        self._batches = batches
        self._iter: Optional[Iterator[Dict[str, np.ndarray]]] = None
        self.images_read = 0

    def _chunks(self) -> Iterator[Dict[str, np.ndarray]]:
        for x, _ in self._batches:
            x = np.asarray(x.cpu().numpy() if hasattr(x, "cpu") else x, dtype=np.float32)
            for start in range(0, len(x), self.batch_size):
                take = min(self.batch_size, self.limit - self.images_read, len(x) - start)
                if take <= 0:
                    return
                self.images_read += take
                yield {self.input_name: x[start : start + take]}

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        if self._iter is None:
            self._iter = self._chunks()
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter, self.images_read = None, 0


# ---------------------------------------------------------------- quantize


def preprocess(float_path: Path, out_path: Path) -> None:
    """Shape inference and graph fusions before quantization, as onnxruntime recommends."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with atomic_path(out_path) as tmp:
        try:
            quant_pre_process(str(float_path), str(tmp), skip_symbolic_shape=True)
        except Exception as exc:  # many types: onnx shape inference, optimizer
            raise QuantizeError(
                f"{float_path}: onnxruntime quant_pre_process failed ({first_line(exc)}); "
                "set quantize: null to skip INT8"
            ) from None


def excluded_nodes(model_path: Path, groups: Iterable[str], first_convs: int = 0) -> List[str]:
    """Node names of the first conv, the classifier (last Gemm/MatMul) and depthwise convs, and of the
    first `first_convs` Conv nodes (graph order), each once."""
    import onnx

    groups = set(groups)
    if not groups and first_convs <= 0:
        return []
    graph = onnx.load(str(model_path), load_external_data=False).graph
    inits = {i.name: i for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    names: List[str] = [n.name for n in convs[: max(0, first_convs)]]
    if "first_conv" in groups and convs:
        names.append(convs[0].name)
    if "classifier" in groups:
        heads = [n for n in graph.node if n.op_type in ("Gemm", "MatMul")]
        names += [heads[-1].name] if heads else []
    if "depthwise" in groups:
        names += [n.name for n in convs if _is_depthwise(n, inits)]
    return list(dict.fromkeys(names))


def depthwise_weights(model_path: Path) -> List[str]:
    """Weight initializer names of the depthwise convs."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    inits = {i.name: i for i in graph.initializer}
    return list(dict.fromkeys(n.input[1] for n in graph.node if n.op_type == "Conv" and _is_depthwise(n, inits)))


def quantize_options(pre_path: Path, candidate: Candidate) -> Dict[str, Any]:
    """The candidate-specific keyword arguments of quantize_static (besides the calibration reader)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    extra: Dict[str, Any] = {"ActivationSymmetric": candidate.activations == "int8"}
    if "depthwise" in candidate.per_channel_only and not candidate.per_channel:
        if candidate.format != "qdq":
            raise QuantizeError(f"{candidate.name}: per_channel_only needs format qdq (TensorQuantOverrides)")
        extra["TensorQuantOverrides"] = {w: [{"axis": 0}] for w in depthwise_weights(pre_path)}
    return dict(
        quant_format=QuantFormat.QDQ if candidate.format == "qdq" else QuantFormat.QOperator,
        per_channel=candidate.per_channel,
        activation_type=types[candidate.activations],
        weight_type=types[candidate.weights],
        calibrate_method=methods[candidate.calibration],
        nodes_to_exclude=excluded_nodes(pre_path, candidate.exclude, candidate.keep_first_convs),
        extra_options=extra,
    )


def _is_depthwise(node, inits) -> bool:
    group = int_attr(node, "group", 1)
    weight = inits.get(node.input[1]) if len(node.input) > 1 else None
    # depthwise: one input channel per group (weight shape [out, 1, kh, kw]) and more than one group
    return group > 1 and weight is not None and len(weight.dims) == 4 and weight.dims[1] == 1


def quantize(
    pre_path: Path,
    out_path: Path,
    candidate: Candidate,
    reader: CalibrationReader,
    reduce_range: bool = False,
    float_nodes: Sequence[str] = (),
    calibration_cache: Optional[Path] = None,
) -> Dict[str, Any]:
    """Quantize pre_path into out_path (atomically) as `candidate` says, with `float_nodes` also kept
    in float. calibration_cache: onnxruntime's file of activation ranges, computed by the first call
    that names it and read by the next ones (the block search builds dozens of files from one
    calibration; every file of one cache must come from the same graph and calibration method)."""
    import onnx
    from onnxruntime.quantization import quantize_static

    reader.rewind()
    options = quantize_options(pre_path, candidate)  # node and weight names survive folding
    options["nodes_to_exclude"] = list(dict.fromkeys([*options["nodes_to_exclude"], *float_nodes]))
    if calibration_cache is not None:
        options["calibration_cache_path"] = str(calibration_cache)
    excluded = options["nodes_to_exclude"]
    regions = 0
    with atomic_path(out_path) as tmp, tempfile.TemporaryDirectory(dir=out_path.parent) as work:
        source = pre_path
        if candidate.fold_max_pixels:
            try:
                regions = fold_batch(pre_path, Path(work) / "folded.onnx", candidate.fold_max_pixels, excluded)
            except Exception as exc:  # onnx shape inference on a graph it cannot type
                raise QuantizeError(f"{candidate.name}: folding the batch failed ({first_line(exc)})") from None
            source = Path(work) / "folded.onnx" if regions else pre_path
        try:
            quantize_static(str(source), str(tmp), reader, reduce_range=reduce_range, **options)
        except Exception as exc:
            raise QuantizeError(f"{candidate.name}: onnxruntime quantize_static failed ({first_line(exc)})") from None
        try:
            gemm_convs = route_wide_convs_to_gemm(tmp, candidate.gemm_min_weights) if candidate.gemm_min_weights else 0
        except Exception as exc:  # onnx load / save of a graph it cannot handle
            raise QuantizeError(
                f"{candidate.name}: moving wide convs to the general QGEMM failed ({first_line(exc)})"
            ) from None
        model = onnx.load(str(tmp))
        own_dq = run_in_float(model)
        if own_dq:
            onnx.save_model(model, str(tmp))
        runs_int8 = [n.name for n in runtime_int8(model.graph)]
    return {
        "candidate": candidate.name,
        "excluded_nodes": excluded,
        "reduce_range": reduce_range,
        "calibration_images": reader.images_read,
        "folded_regions": regions,
        "gemm_convs": gemm_convs,
        # excluded, fed by an INT8 activation: given a per-axis DequantizeLinear so they run in float
        # (float_fallback.py); those it cannot help (one input channel) onnxruntime runs in INT8 all the same
        "float_nodes_own_dequantize": own_dq,
        "float_nodes_run_int8": [n for n in runs_int8 if n in excluded],
    }


@dataclass
class Measured:
    """One candidate's numbers, as the selection sees them."""

    name: str
    val_accuracy: float
    speedup: Optional[Dict[int, Interval]] = None  # batch size -> float / candidate with its interval; None: not timed
    info: Dict[str, Any] = field(default_factory=dict)


def within_accuracy(float_val: float, m: Measured, max_accuracy_drop: float) -> bool:
    # accuracies are ratios of counts: 0.90 - 0.89 is not exactly 0.01
    return float_val - m.val_accuracy <= max_accuracy_drop + 1e-9


def choose(
    float_val: float, candidates: List[Measured], max_accuracy_drop: float, min_speedup: float = 1.1
) -> Tuple[Optional[Measured], str]:
    """The fastest candidate (geometric mean of the median speedups over the batch sizes) that loses
    at most max_accuracy_drop of validation accuracy and whose speedup interval's LOWER end clears
    min_speedup at every batch size. When none clears and some interval straddles the gate, the
    reason says the measurement could not decide (float ships, and the intervals are shown)."""
    reasons, ok, undecided = [], [], []
    for m in candidates:
        if not within_accuracy(float_val, m, max_accuracy_drop):
            reasons.append(f"{m.name} loses {float_val - m.val_accuracy:.4f} accuracy")
            continue
        verdicts = {gate(iv, min_speedup) for iv in m.speedup.values()}
        if verdicts == {"clears"}:
            ok.append(m)
        elif "below" in verdicts:
            reasons.append(f"{m.name} is not {min_speedup:.2f}x faster at every batch size ({_ratios(m)})")
        else:
            undecided.append(m)
            reasons.append(f"{m.name} {_ratios(m)} straddles {min_speedup:.2f}x")
    if ok:
        best = max(ok, key=_mean_speedup)
        return best, f"{best.name}: fastest within the accuracy gate, {_ratios(best)} vs float (95% intervals)"
    if undecided:
        return None, f"too noisy to decide: no interval's lower end clears {min_speedup:.2f}x: " + "; ".join(reasons)
    return None, "no candidate was both within the accuracy gate and faster: " + "; ".join(reasons)


def choose_within(
    float_val: float,
    candidates: List[Measured],
    max_accuracy_drop: float,
    min_speedup: float,
    sizes: Dict[str, int],
    max_file_bytes: Optional[int],
) -> Tuple[Optional[Measured], str]:
    """choose() among the files of at most max_file_bytes (sizes: bytes by name, float included).
    When the float file itself is over the limit the budget is size, not speed: the fastest
    candidate within the accuracy gate that fits ships, faster than float or not."""
    if max_file_bytes is None:
        return choose(float_val, candidates, max_accuracy_drop, min_speedup)
    fits = [m for m in candidates if sizes[m.name] <= max_file_bytes]
    over = [f"{m.name} is {sizes[m.name]} bytes" for m in candidates if sizes[m.name] > max_file_bytes]
    limit = f"quantize.max_file_bytes {max_file_bytes}"
    if sizes["float"] <= max_file_bytes:
        chosen, reason = choose(float_val, fits, max_accuracy_drop, min_speedup) if fits else (None, "")
        return chosen, "; ".join(filter(None, [reason, over and f"over {limit}: " + ", ".join(over)]))
    accurate = [m for m in fits if within_accuracy(float_val, m, max_accuracy_drop)]
    if not accurate:
        lost = [f"{m.name} loses {float_val - m.val_accuracy:.4f} accuracy" for m in fits]
        return None, (
            f"the float file ({sizes['float']} bytes) is over {limit} and no candidate within the accuracy gate "
            f"fits it: " + "; ".join([*lost, *(f"{o}, over the limit" for o in over)])
        )
    best = max(accurate, key=lambda m: (_mean_speedup(m), -sizes[m.name]))
    timed = f", {_ratios(best)} vs float (95% intervals)" if best.speedup else ""
    return best, (
        f"{best.name}: the float file ({sizes['float']} bytes) is over {limit}; the fastest candidate within "
        f"the accuracy gate that fits ships ({sizes[best.name]} bytes{timed})"
    )


def _mean_speedup(m: Measured) -> float:
    """Geometric mean of the median speedups over the batch sizes; 0 when not timed."""
    return float(np.exp(np.mean(np.log([iv.ratio for iv in m.speedup.values()])))) if m.speedup else 0.0


def _ratios(m: Measured) -> str:
    return " / ".join(f"{iv.text()} at batch {b}" for b, iv in m.speedup.items())
