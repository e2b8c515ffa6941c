"""qad: quantization-aware distillation, when post-training INT8 misses the gate (quantize.qat).

The candidate's own QDQ file (quantize.qat.candidate, calibrated like every candidate) becomes a
trainable module (onnx/qat.py): its layout, folded BatchNorm and calibrated scales exactly as
onnxruntime runs them. The fine-tuned student is not retrained in PyTorch terms; the QDQ graph is,
against the teacher with the pipeline's loss and trainer (resumable, torchrun). The trained
weights are written back with the learned scales, and the file then faces the quantize stage's
gate: onnxruntime validation accuracy within max_accuracy_drop of float, a speedup interval whose
lower end clears min_speedup at every batch size, and, where post-training INT8 shipped a file,
not measurably slower than it and either faster or more accurate. The fake-quant forward is
compared with onnxruntime on the written file (top-1 agreement, largest logit difference).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import procgroup as pg
from ..bench.compare import Interval, compare, gate
from ..engine.artifacts import OnnxArtifact, StageResult
from ..engine.stage import MODELS, Job, Sections, Stage, StageOutput, register_stage
from ..fsutil import file_sha256, file_sizes
from ..onnx.quantize import (
    CANDIDATES,
    Measured,
    cpu_features,
    needs_reduce_range,
    preprocess,
    quantize,
    within_accuracy,
)
from ..train import ddp as dist
from .common import (
    calibration_reader,
    cpu_batches,
    latency_plan,
    pe_against_references,
    reference_reads,
    stamp_and_write,
    teacher_role,
    train,
    update_card,
)

if TYPE_CHECKING:  # annotations only
    from ..engine.context import Publication
    from ..tracking import StageRun

INT8_FILE = "model_int8.onnx"
QAD_FILE = "qad.onnx"
REVISION = 3  # in the stage key (2: float convs after an INT8 activation run as onnxruntime quantizes them;
# 3: such convs get a per-axis DequantizeLinear and run in float, onnx/float_fallback.py)


@register_stage
class Qad(Stage):
    name = "qad"
    consumes = ("export", "quantize", "teacher", MODELS)
    requires = {
        "export": "it trains the exported model's INT8 graph",
        "quantize": "it starts where post-training INT8 stopped and must beat what that shipped",
    }
    sections = ("quantize",)
    followers = "train"
    revision = {"qat_revision": REVISION}

    def enabled(self, recipe) -> bool:
        return recipe.quantize is not None and recipe.quantize.qat is not None

    def inputs(self, cfg: Sections, models: Sequence[str], ran: Sequence[str]) -> Dict[str, str]:
        return {"export": "export", "quantize": "quantize", **teacher_role(cfg.quantize.qat, models)}

    def reads(self, cfg: Sections, models: Sequence[str], ran: Sequence[str]) -> Dict[str, str]:
        return {**reference_reads(models), "final": models[-1]}

    def fingerprint(self, cfg: Sections) -> Dict[str, Any]:
        # quantize.qat is outside the quantize section's cache key (the post-training candidates do not
        # depend on it), so the stage keys on it here
        return {"qat": cfg.quantize.qat.model_dump(mode="json")}

    def compute(self, job: Job) -> StageResult:
        from ..onnx.qat import load_qdq, write_qdq

        qat = job.cfg.quantize.qat
        ptq = job.inputs["quantize"].result
        shipped = ptq.artifacts.get("int8")
        if qat.when == "on_miss" and shipped is not None:
            reason = f"not needed: post-training INT8 shipped {shipped.metadata['quantization']['candidate']}"
            tqdm.write(f"[qad] {reason} (quantize.qat.when: on_miss)")
            return StageResult({"qad.trained": 0}, info={"reason": reason, "shipped": False})
        float_art = job.inputs["export"].result.artifacts["final"]
        start = self._shared_start(job, job.inputs["export"].path(float_art.file), float_art.metadata["input_name"])
        module = load_qdq(start, job.stage_dir / "float_pre.onnx", qat.scales).to(job.device)
        tqdm.write(
            f"[qad] training {qat.candidate}'s QDQ graph ({len(module.weights)} INT8 weights, "
            f"{len(module.act_scales)} activation scales {qat.scales}) for {qat.epochs} epoch(s)"
        )
        history = train(job, module, qat, "qad")
        if not dist.is_main():  # torchrun: rank 0 writes, measures and decides
            return StageResult({})
        module = module.cpu().eval()
        written = write_qdq(module, start, job.stage_dir / QAD_FILE)
        return self._gate(job, module, start, float_art, history, written)

    def _shared_start(self, job: Job, float_path: Path, input_name: str) -> Path:
        """Rank 0 builds the candidate (under torchrun only its stage folders hold the float file) and
        hands the files to the other ranks; a build error stops every rank."""
        start = job.stage_dir / "ptq.onnx"
        pg.agree(lambda: self._start_file(job, float_path, input_name) if pg.is_main() else None)
        if pg.is_distributed():
            names = ("float_pre.onnx", start.name)
            files = pg.share({n: (job.stage_dir / n).read_bytes() for n in names} if pg.is_main() else None)
            if not pg.is_main():
                for name, data in files.items():
                    (job.stage_dir / name).write_bytes(data)
        return start

    def _start_file(self, job: Job, float_path: Path, input_name: str) -> Path:
        """The candidate built as the quantize stage builds it: same preprocessing, same calibration images."""
        cfg = job.cfg.quantize
        preprocess(float_path, job.stage_dir / "float_pre.onnx")
        start = job.stage_dir / "ptq.onnx"
        reader = calibration_reader(job, input_name, cfg.calibration_images)
        quantize(
            job.stage_dir / "float_pre.onnx",
            start,
            CANDIDATES.get(cfg.qat.candidate),
            reader,
            needs_reduce_range(cpu_features()),
        )
        return start

    def _gate(self, job: Job, module, start: Path, float_art, history, written) -> StageResult:
        from ..onnx.export import onnx_accuracy

        cfg, qat = job.cfg.quantize, job.cfg.quantize.qat
        ptq = job.inputs["quantize"]
        qad_path, float_path = job.stage_dir / QAD_FILE, job.inputs["export"].path(float_art.file)
        val = {
            "float": ptq.result.metrics["float_val_accuracy"],
            "start": onnx_accuracy(start, cpu_batches(job.data.val)),
            "qad": onnx_accuracy(qad_path, cpu_batches(job.data.val)),
        }
        parity = fake_quant_parity(module, qad_path, job.data.val, qat.parity_images)
        tqdm.write(
            f"[qad] val accuracy: post-training {val['start']:.4f} -> QAD {val['qad']:.4f} (float {val['float']:.4f}); "
            f"fake-quant vs onnxruntime: top-1 agreement {parity['top1_agreement']:.4f}, "
            f"max logit difference {parity['max_abs_logit_diff']:.4g} (output step {parity['output_step']:.4g})"
        )
        shipped = ptq.result.artifacts.get("int8")
        files = {"float": float_path, "qad": qad_path}
        pairs = [("float", "qad")]
        if shipped is not None:
            files["ptq"], pairs = ptq.path(shipped.file), [*pairs, ("ptq", "qad")]
        comparison = None
        if within_accuracy(val["float"], Measured("qad", val["qad"]), cfg.max_accuracy_drop):
            settings, plan = latency_plan(cfg)
            tqdm.write(f"[qad] timing the QAD file against {' and '.join(f for f in files if f != 'qad')}")
            comparison = compare(
                files, pairs, cfg.batch_sizes, settings, plan, progress=lambda line: tqdm.write(f"[qad] {line}")
            )
        vs_float = {b: comparison.ratio("float", "qad", b) for b in cfg.batch_sizes} if comparison else None
        vs_ptq = {b: comparison.ratio("ptq", "qad", b) for b in cfg.batch_sizes} if comparison and shipped else None
        ptq_val = shipped and ptq.result.metrics["int8.val_accuracy"]
        ships, reason = decide(
            val["float"], val["qad"], vs_float, ptq_val, vs_ptq, cfg.max_accuracy_drop, cfg.min_speedup
        )
        tqdm.write(f"[qad] {reason}")
        info = {
            "candidate": qat.candidate,
            "scales": qat.scales,
            "epochs": qat.epochs,
            "shipped": ships,
            "reason": reason,
            "min_speedup": cfg.min_speedup,
            "val_accuracy": val,
            "parity": parity,
            "written": written,
            "latency": comparison.summary() if comparison else None,
        }
        metrics = {
            "qad.trained": 1,
            "qad.shipped": float(ships),
            "qad.start_val_accuracy": val["start"],
            "qad.val_accuracy": val["qad"],
            "qad.test_accuracy": onnx_accuracy(qad_path, cpu_batches(job.data.test)),
            "qad.parity.top1_agreement": parity["top1_agreement"],
            "qad.parity.max_abs_logit_diff": parity["max_abs_logit_diff"],
            **_interval_metrics("qad.speedup_vs_float", vs_float),
            **_interval_metrics("qad.speedup_vs_ptq", vs_ptq),
        }
        if not ships:
            return StageResult(metrics, history, info=info)
        shutil.copyfile(qad_path, job.stage_dir / INT8_FILE)
        quantization = {"candidate": qat.candidate, **CANDIDATES.get(qat.candidate).describe()}
        art = OnnxArtifact(
            INT8_FILE,
            float_art.stage,
            {**float_art.metadata, "quantization": {**quantization, "path": "qad", "qat": qat.model_dump(mode="json")}},
            parity,
            {**file_sizes(qad_path), **written},
            metrics["qad.test_accuracy"],
            file_sha256(job.stage_dir / INT8_FILE),
        )
        return StageResult(metrics, history, {"int8": art}, info=info)

    def summary_lines(self, entry: Dict[str, Any]) -> List[str]:
        m, info = entry["metrics"], entry["info"]
        if not m.get("qad.trained"):
            return [f"QAD: {info['reason']}"]
        head = (
            f"QAD: {info['candidate']} ({info['epochs']} epoch(s), scales {info['scales']}), val acc "
            f"{info['val_accuracy']['start']:.4f} post-training -> {m['qad.val_accuracy']:.4f}"
        )
        return [f"{head}; {'ships' if m.get('qad.shipped') else 'not shipped'}: {info['reason']}"]

    def headline(self, output: StageOutput) -> Dict[str, float]:
        # when the QAD file ships, the run's int8.* columns are its numbers
        m = output.metrics
        out = {k: v for k, v in m.items() if k.startswith("qad.")}
        if m.get("qad.shipped"):
            out.update({"int8.shipped": 1, "int8.test_accuracy": m["qad.test_accuracy"]})
            out.update(
                {
                    k.replace("qad.speedup_vs_float.", "int8.speedup."): v
                    for k, v in m.items()
                    if k.startswith("qad.speedup_vs_float.")
                }
            )
            out.update({k: v for k, v in m.items() if k.startswith("int8.")})
        return out

    def publish(self, pub: Publication, output: StageOutput, child: StageRun) -> Dict[str, float]:
        info = output.result.info
        child.log_dict(info, "qad.json")
        card = {k: info[k] for k in ("candidate", "scales", "epochs", "reason", "val_accuracy", "parity") if k in info}
        update_card(pub, {"qad": {"shipped": bool(info.get("shipped")), **card}})
        art = output.result.artifacts.get("int8")
        if art is None:
            return {}
        path = pub.run_dir / INT8_FILE
        stamp_and_write(pub, output.path(art.file), art.metadata, path)
        pub.summary.add_files({INT8_FILE: path})
        sha = file_sha256(path)
        pub.parent.set_tags({f"toolchain.sha256.{INT8_FILE}": sha})
        speedup = {
            b: {"ratio": iv[0], "low": iv[1], "high": iv[2]}
            for b, iv in _intervals_of(output.result.metrics, "qad.speedup_vs_float").items()
        }
        update_card(
            pub,
            {
                "int8": {
                    "shipped": True,
                    "file": INT8_FILE,
                    "path": "qad",
                    "candidate": info["candidate"],
                    "why": info["reason"],
                    "min_speedup": info.get("min_speedup"),  # the gate it cleared (check_claims re-tests it)
                    "speedup_vs_float": speedup,
                    "latency": info.get("latency"),
                },
                "files": {INT8_FILE: {**file_sizes(path), "sha256": sha}},
            },
        )
        final = pub.final().result.metrics
        pe = pe_against_references(pub.inputs, {**final, "test_accuracy": art.onnx_test_accuracy}, art.stage)
        return {f"int8.{k}": v for k, v in pe.items()}


def decide(
    float_val: float,
    qad_val: float,
    vs_float: Optional[Dict[int, Interval]],
    ptq_val: Optional[float],
    vs_ptq: Optional[Dict[int, Interval]],
    max_accuracy_drop: float,
    min_speedup: float,
) -> Tuple[bool, str]:
    """Whether the QAD file ships: the quantize stage's gate against float (accuracy within
    max_accuracy_drop, every speedup interval's lower end at least min_speedup), and where
    post-training INT8 shipped a file (ptq_val, vs_ptq: QAD's speedup over it), not measurably
    slower than that file at any batch size and either measurably faster or more accurate."""
    if not within_accuracy(float_val, Measured("qad", qad_val), max_accuracy_drop):
        return False, f"QAD loses {float_val - qad_val:.4f} validation accuracy vs float (gate {max_accuracy_drop})"
    verdicts = {b: gate(iv, min_speedup) for b, iv in vs_float.items()}
    if set(verdicts.values()) != {"clears"}:
        return False, f"QAD is not {min_speedup:.2f}x faster than float at every batch size ({_text(vs_float)})"
    if ptq_val is None:
        return True, f"QAD within the accuracy gate and {_text(vs_float)} faster than float (95% intervals)"
    if any(gate(iv, 1.0) == "below" for iv in vs_ptq.values()):
        return False, f"QAD is slower than the shipped post-training file ({_text(vs_ptq)} of its speed)"
    faster = all(gate(iv, 1.0) == "clears" for iv in vs_ptq.values()) and any(iv.low > 1.0 for iv in vs_ptq.values())
    if faster or qad_val > ptq_val:
        why = "faster than" if faster else f"more accurate ({qad_val:.4f} vs {ptq_val:.4f}) and not slower than"
        return True, f"QAD {why} the shipped post-training file ({_text(vs_ptq)}), {_text(vs_float)} vs float"
    return False, (
        f"QAD is neither faster ({_text(vs_ptq)}) nor more accurate ({qad_val:.4f} vs {ptq_val:.4f}) than the "
        "shipped post-training file"
    )


def _text(intervals: Dict[int, Interval]) -> str:
    return " / ".join(f"{iv.text()} at batch {b}" for b, iv in intervals.items())


def _interval_metrics(prefix: str, intervals: Optional[Dict[int, Interval]]) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for b, iv in (intervals or {}).items():
        out.update({f"{prefix}.bs{b}": iv.ratio, f"{prefix}.bs{b}_lo": iv.low, f"{prefix}.bs{b}_hi": iv.high})
    return out


def _intervals_of(metrics: Dict[str, float], prefix: str) -> Dict[int, Tuple[float, float, float]]:
    batches = sorted(
        int(k.rsplit("bs", 1)[1]) for k in metrics if k.startswith(prefix + ".bs") and "_" not in k.rsplit(".", 1)[1]
    )
    return {
        b: (metrics[f"{prefix}.bs{b}"], metrics[f"{prefix}.bs{b}_lo"], metrics[f"{prefix}.bs{b}_hi"]) for b in batches
    }


@torch.no_grad()
def fake_quant_parity(module, onnx_path: Path, batches, images: int) -> Dict[str, float]:
    """The trained module's fake-quant logits against onnxruntime's on the written file: top-1
    agreement and the largest logit difference, next to the output's quantization step."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    agree, seen, diff = 0, 0, 0.0
    for x, _ in cpu_batches(batches):
        x = x[: images - seen]
        ours = module(x).numpy()
        theirs = session.run(None, {name: x.numpy()})[0]
        agree += int((ours.argmax(1) == theirs.argmax(1)).sum())
        diff = max(diff, float(np.abs(ours - theirs).max()))
        seen += len(x)
        if seen >= images:
            break
    return {
        "images": seen,
        "top1_agreement": agree / max(seen, 1),
        "max_abs_logit_diff": diff,
        "output_step": module.output_step(),
    }
