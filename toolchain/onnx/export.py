"""ONNX export with checker, parity gate and self-describing metadata.

API (used by the pipeline):
    export_onnx(model, path, example_batch, cfg: ExportConfig, metadata) -> info dict
        torch.onnx.export with dynamo=(cfg.exporter == "dynamo") passed explicitly, opset
        cfg.opset, input "input", output "logits", a dynamic batch axis named "batch" when
        cfg.dynamic_batch (dynamic_shapes for dynamo, dynamic_axes for torchscript).
        Spatial ReduceMeans become GlobalAveragePool, or Identity over a 1x1 map (onnx/pooling.py:
        onnxruntime quantizes and blocks GlobalAveragePool, not ReduceMean). Then metadata_props
        from `metadata` (str values as is, others JSON-encoded), onnx.checker.check_model(
        full_check=True) and strict shape inference, and an atomic write (a failure leaves no
        half-written file). The model is exported in eval mode
        and its train/eval mode restored afterwards.
        info: path, exporter, opset, ir_version, dynamic_batch, input_name, output_name,
        input_shape, output_shape, pools_rewritten, file_size_bytes, export_time_s, torch_version, onnx_version.
    check_parity(model, onnx_path, batch, atol, min_agreement, rtol=0.0) -> {max_abs_diff, mean_abs_diff,
        max_abs_logit, outside_tolerance, top1_agreement, batch_size, atol, rtol, min_agreement}; raises
        ExportError unless |diff| <= atol + rtol * (the image's largest |PyTorch logit|) for every logit
        and top-1 agreement >= min_agreement.
    onnx_accuracy(onnx_path, batches, providers=("cpu",)) -> top-1 accuracy in onnxruntime.
    read_metadata(onnx_path) -> metadata_props decoded (exact round trip of export's `metadata`).
    write_model_card(path, card) -> None                      JSON, atomic.
    log_onnx_to_mlflow(onnx_path, example_input) -> model URI  mlflow.onnx.log_model, name
        "model", signature inferred from example_input and the ONNX output, in the active run.

Quirks worth knowing (torch 2.14): the dynamo exporter cannot keep a batch axis dynamic
when the example batch is 1 (torch.export specialises sizes 0/1), so a batch of 1 is
repeated to 2 here. The dynamo exporter implements opset >= 18 only (below, it tries a
down-conversion that fails quietly for most CNNs), so opset < 18 with dynamo is an ExportError:
use the torchscript exporter for older runtimes.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Tuple

import numpy as np
import onnx
import torch

from ..bench import ort as bench
from ..errors import ExportError, first_line
from ..fsutil import atomic_path, atomic_write_json
from ..train.loop import eval_mode
from .pooling import simplify_global_pools

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
DYNAMO_MIN_OPSET = 18  # torch 2.14's torchlib has no lower implementations
_JSON_KEYS = "_json_keys"  # metadata key listing which values are JSON-encoded (for an exact round trip)


# ---------------------------------------------------------------- export


def _device_of(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _example(model: torch.nn.Module, example_batch: torch.Tensor, dynamic: bool) -> torch.Tensor:
    x = example_batch.detach().to(_device_of(model))
    if dynamic and x.shape[0] < 2:
        x = x.repeat(2, *([1] * (x.dim() - 1)))  # see module docstring: batch 1 gets specialised
    return x


def _to_proto(model: torch.nn.Module, x: torch.Tensor, cfg) -> onnx.ModelProto:
    """Run the chosen exporter and return the in-memory ModelProto."""
    common = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=cfg.opset, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice, tracer warnings
        if cfg.exporter == "dynamo":
            shapes = ({0: torch.export.Dim(BATCH_DIM, min=1)},) if cfg.dynamic_batch else None
            program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=shapes, optimize=True, **common)
            return program.model_proto
        buf = io.BytesIO()
        axes = {INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}} if cfg.dynamic_batch else None
        torch.onnx.export(model, (x,), buf, dynamo=False, dynamic_axes=axes, do_constant_folding=True, **common)
        return onnx.load_from_string(buf.getvalue())


def _export_failed(exc: Exception, cfg) -> ExportError:
    root = exc
    while root.__cause__ is not None:  # the dynamo exporter wraps the real reason ("step 1/3 ...")
        root = root.__cause__
    if isinstance(root, ImportError) and "onnxscript" in str(root):
        return ExportError(
            "the dynamo ONNX exporter needs onnxscript: pip install onnxscript, or set export.exporter: torchscript"
        )
    hint = f"try export.exporter: {'torchscript' if cfg.exporter == 'dynamo' else 'dynamo'}"
    if cfg.dynamic_batch:
        hint += " or export.dynamic_batch: false"
    stage = f" ({type(exc).__name__})" if root is not exc else ""
    reason = re.sub(r"\x1b\[[0-9;]*m", "", first_line(root))  # dynamo colours its messages
    return ExportError(f"torch.onnx.export ({cfg.exporter}, opset {cfg.opset}) failed{stage}: {reason}; {hint}")


def set_metadata(proto: onnx.ModelProto, metadata: Dict[str, Any]) -> None:
    """metadata_props: strings as is (readable in Netron / ORT), everything else as JSON."""
    encoded = {}
    json_keys = []
    for key, value in metadata.items():
        if isinstance(value, str):
            encoded[str(key)] = value
        else:
            encoded[str(key)] = json.dumps(value, default=str)
            json_keys.append(str(key))
    encoded[_JSON_KEYS] = json.dumps(json_keys)
    del proto.metadata_props[:]
    for key, value in encoded.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _check(proto: onnx.ModelProto) -> onnx.ModelProto:
    try:
        onnx.checker.check_model(proto, full_check=True)
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(
            f"the exported ONNX model fails onnx.checker: {first_line(exc)}; try another export.opset or export.exporter"
        ) from None


def _io_shape(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def export_onnx(
    model: torch.nn.Module, path, example_batch: torch.Tensor, cfg, metadata: Dict[str, Any]
) -> Dict[str, Any]:
    """Export, attach metadata, check, write atomically. See the module docstring."""
    if cfg.exporter == "dynamo" and cfg.opset < DYNAMO_MIN_OPSET:
        # it would build at 18, try to convert down, and on failure quietly keep 18
        raise ExportError(
            f"the dynamo exporter builds opset >= {DYNAMO_MIN_OPSET} (export.opset is {cfg.opset}); "
            f"set export.opset: {DYNAMO_MIN_OPSET} or higher, or export.exporter: torchscript for older runtimes"
        )
    start = time.perf_counter()
    with eval_mode(model), torch.no_grad():
        x = _example(model, example_batch, cfg.dynamic_batch)
        try:
            proto = _to_proto(model, x, cfg)
        except Exception as exc:  # exporter errors have many types (torch._dynamo, onnxscript, ...)
            raise _export_failed(exc, cfg) from exc
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset != cfg.opset:
        raise ExportError(
            f"export.opset is {cfg.opset} but the {cfg.exporter} exporter produced opset {opset}; choose another export.opset"
        )
    if proto.ByteSize() > 2**31 - 1:  # protobuf limit; the checker cannot even take it in memory
        raise ExportError(
            "the model is over 2 GB, beyond a single ONNX protobuf file; this exporter writes single-file models"
        )
    pools = simplify_global_pools(proto)
    set_metadata(proto, metadata)
    proto = _check(proto)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
    return {
        "path": str(path),
        "exporter": cfg.exporter,
        "opset": opset,
        "ir_version": proto.ir_version,
        "dynamic_batch": cfg.dynamic_batch,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_shape": _io_shape(proto.graph.input[0]),
        "output_shape": _io_shape(proto.graph.output[0]),
        "pools_rewritten": pools,
        "file_size_bytes": Path(path).stat().st_size,
        "export_time_s": round(time.perf_counter() - start, 3),
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
    }


# ---------------------------------------------------------------- parity / accuracy


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _ort_logits(session, images) -> np.ndarray:
    name = session.get_inputs()[0].name
    return session.run(None, {name: _numpy(images).astype(np.float32, copy=False)})[0]


def check_parity(
    model: torch.nn.Module, onnx_path, batch: torch.Tensor, atol: float, min_agreement: float, rtol: float = 0.0
) -> Dict[str, Any]:
    """Compare PyTorch (eval mode) and onnxruntime CPU logits on `batch`; ExportError unless every
    logit is within atol + rtol * (its image's largest |PyTorch logit|) and top-1 agreement >=
    min_agreement. The image's scale, not the logit's own value: float32 rounding follows the
    magnitude of the activations, so a logit near 0 next to logits of 2.7e6 carries an error of
    ~1 in PyTorch alone (inception_v3, random weights: float32 vs float64 differ by 2.3)."""
    with eval_mode(model), torch.no_grad():
        ref = _numpy(model(batch.to(_device_of(model)))).astype(np.float64)
    got = _ort_logits(bench.create_session(onnx_path, "cpu"), batch).astype(np.float64)
    if ref.shape != got.shape:
        raise ExportError(
            f"ONNX parity: output shape {list(got.shape)} differs from PyTorch {list(ref.shape)}; re-export the model"
        )
    diff = np.abs(ref - got)
    finite = bool(np.isfinite(diff).all())
    scale = np.abs(ref).reshape(len(ref), -1).max(axis=1).reshape(-1, *([1] * (ref.ndim - 1)))
    outside = ~(diff <= atol + rtol * scale)  # written so that NaN counts as outside
    report = {
        "max_abs_diff": float(diff.max()) if finite else float("inf"),
        "mean_abs_diff": float(diff.mean()) if finite else float("inf"),
        "max_abs_logit": float(np.abs(ref).max()),
        "outside_tolerance": int(outside.sum()),
        "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
        "batch_size": int(ref.shape[0]),
        "atol": float(atol),
        "rtol": float(rtol),
        "min_agreement": float(min_agreement),
    }
    if not finite or report["outside_tolerance"] or report["top1_agreement"] < min_agreement:
        raise ExportError(_parity_message(onnx_path, report, finite))
    return report


def _parity_message(onnx_path, r: Dict[str, Any], finite: bool) -> str:
    what = (
        "non-finite logits"
        if not finite
        else (
            f"{r['outside_tolerance']} logits beyond atol {r['atol']:g} + rtol {r['rtol']:g} x the image's largest |logit| "
            f"(max |logit diff| {r['max_abs_diff']:.3g}, largest |logit| {r['max_abs_logit']:.3g})"
        )
    )
    exporters = "try export.exporter dynamo<->torchscript or another export.opset"
    if finite and r["top1_agreement"] >= r["min_agreement"]:
        advice = (
            f"large logits can differ by more than atol from float32 rounding alone: raise export.parity_rtol "
            f"if the gap is benign, else {exporters}"
        )
    else:
        advice = (
            f"the ONNX model computes something else than PyTorch: {exporters}; raise export.parity_atol / "
            "export.parity_rtol only if the gap is benign (large logits differ more from float32 rounding alone)"
        )
    return (
        f"ONNX parity gate failed for {onnx_path}: {what}, top-1 agreement {r['top1_agreement']:.3f} "
        f"(need >= {r['min_agreement']:g}) on {r['batch_size']} images; {advice}"
    )


def onnx_accuracy(onnx_path, batches: Iterable[Tuple[Any, Any]], providers=("cpu",)) -> float:
    """Top-1 accuracy of the ONNX file in onnxruntime (first provider of `providers`)."""
    session = bench.create_session(onnx_path, providers[0])
    correct = total = 0
    for images, labels in batches:
        pred = _ort_logits(session, images).argmax(1)
        labels = _numpy(labels).reshape(-1)
        correct += int((pred == labels).sum())
        total += int(labels.size)
    if total == 0:
        raise ExportError("onnx_accuracy got no batches; the evaluation split is empty")
    return correct / total


# ---------------------------------------------------------------- metadata / card


def read_metadata(onnx_path) -> Dict[str, Any]:
    """metadata_props as a dict, JSON values decoded (the exact inverse of export's `metadata`)."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    raw = {p.key: p.value for p in proto.metadata_props}
    json_keys = set(json.loads(raw.pop(_JSON_KEYS, "[]")))
    return {k: json.loads(v) if k in json_keys else v for k, v in raw.items()}


def write_model_card(path, card: Dict[str, Any]) -> None:
    atomic_write_json(path, card)


# ---------------------------------------------------------------- MLflow


@contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """MLflow logs and warns a lot on log_model (env inference, signature notes): keep errors only."""
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def log_onnx_to_mlflow(onnx_path, example_input: np.ndarray, run_id: str) -> str:
    """Log the ONNX file as an MLflow model named "model" in run `run_id`; returns its model URI."""
    import mlflow.onnx
    from mlflow.models import infer_signature

    example = np.asarray(example_input, dtype=np.float32)
    output = _ort_logits(bench.create_session(onnx_path, "cpu"), example)
    proto = onnx.load(str(onnx_path))
    with _quiet_mlflow():
        info = mlflow.onnx.log_model(
            proto,
            name="model",
            signature=infer_signature(example, output),
            pip_requirements=mlflow.onnx.get_default_pip_requirements(),  # skips a slow inference subprocess
            save_as_external_data=False,  # one self-contained .onnx file, as shipped to devices
            run_id=run_id,
        )
    return info.model_uri
