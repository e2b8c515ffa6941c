"""What the model stages share: build, train, save, evaluate, restore, and PE at publish.

A model stage's result holds val/test accuracy, params, nonzero params and MACs (content of
the stage, cached). Performance Efficiency compares it with *this run's* teacher and KD
student, so it is derived at publish time on every run, never cached.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..bench.compare import Plan, Settings
from ..engine.artifacts import ModelArtifact, StageResult
from ..engine.stage import Job, Sections, Stage, StageOutput
from ..fsutil import atomic_path, atomic_write_json, file_sha256
from ..metrics import model_stats, performance_efficiency
from ..models import resolve
from ..models.checkpoint import load_weights, save_state
from ..train import ddp as dist
from ..train.loop import evaluate, fit, memory_layout
from ..train.tasks import make_task

if TYPE_CHECKING:  # annotations only
    from ..data.loaders import DataBundle
    from ..engine.context import Publication
    from ..tracking import StageRun

REFERENCES = {"teacher": "teacher", "student": "distill"}  # PE label -> reference model stage


def reseed(job: Job) -> None:
    """Restart torch's RNG from the recipe seed. Each model stage does this first, so its
    output (init, dropout masks) depends only on its cache key, not on which earlier
    stages ran in this process and which were loaded from the cache."""
    torch.manual_seed(job.seed)


def teacher_role(train_cfg, models) -> Dict[str, str]:
    """The teacher is an input only of training that distils from it."""
    return {"teacher": "teacher"} if train_cfg.needs_teacher and "teacher" in models else {}


def new_model(job: Job, model_cfg) -> torch.nn.Module:
    """The section's model (any reference form), its `weights:` loaded, heads fitted to the data."""
    reseed(job)
    return resolve.create(model_cfg, job.data.num_classes).to(job.device)


def initial_model(job: Job, model_cfg) -> torch.nn.Module:
    """A fresh model of the section's architecture, from its `checkpoint` when one is named."""
    model = new_model(job, model_cfg)
    if model_cfg.checkpoint:
        load_weights(model.cpu(), model_cfg.checkpoint, model_cfg.model)
    return model.to(job.device)


def file_digest(path) -> str:
    """sha256 of a file the recipe names, so editing the file changes the stage key."""
    if not path or not Path(path).is_file():
        return str(path)
    return file_sha256(path)[:16]


def check_features(train_cfg, student, teacher, data, section: str) -> None:
    """Feature terms' module paths resolve, and their shapes probe, on the untrained architectures:
    a misspelt path fails in the preflight, not after the teacher trained. Module names do not
    change with channel pruning, so this holds for the fine-tune stage too."""
    from ..train.features import FeatureDistiller

    if train_cfg is None or not train_cfg.features or teacher is None:
        return
    FeatureDistiller(
        train_cfg.features,
        resolve.architecture(student, data.num_classes),
        resolve.architecture(teacher, data.num_classes),
        data.input_shape,
        section,
    )


def load_model(job: Job, art: ModelArtifact) -> torch.nn.Module:
    """Rebuild a stage's model from its artifact: the architecture from its reference, pruned
    layers at the stored shapes (a forward pass on a zero batch settles grouped convolutions)."""
    from ..prune import keep_sparsity

    reseed(job)
    model = resolve.build(art.arch, art.num_classes, art.cifar_stem, art.kwargs)
    example = torch.zeros(2, *job.data.input_shape)
    load_weights(model, job.stage_dir / art.checkpoint, art.arch, resize=True, example_input=example)
    model = model.to(job.device)
    if art.keep_zeros:
        keep_sparsity(model)()
    return model


def train(
    job: Job, model, cfg, stage: str, resumable: bool = True, after_step=None, report: Optional[Dict[str, float]] = None
) -> List[Dict[str, float]]:
    """The one training entry point of the pipeline (all stages go through `fit`).

    Feature-distillation adapters are built here, from the model as it is now (a pruned
    model gets new ones); report receives their size (adapter_params), which model_stats
    does not count because they are not part of the model, and the training precision."""
    teacher = job.inputs.get("teacher")
    task = make_task(cfg, teacher.model if teacher else None, model, job.data.input_shape, section=stage)
    if report is not None and task.features is not None:
        report["adapter_params"] = task.features.num_params()
    with memory_layout(model, task, cfg.channels_last):
        trained = dist.wrap_for_training(model, job.device)
        result = fit(
            trained,
            task,
            job.data.train,
            job.data.val,
            cfg,
            stage=stage,
            state_path=job.stage_dir / "train_state.pt" if resumable else None,
            on_epoch=lambda epoch, m: job.run.log_metrics(m, step=epoch),
            after_step=after_step,
        )
    dist.debug_record(stage, job.data.train, model, task.features)
    if report is not None and result.precision is not None:
        report.update(precision_metrics(result.precision))
    return result.history


def cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode CPU copy to export or time, leaving the stage's model where it trains."""
    return copy.deepcopy(model).cpu().eval()


def cpu_batches(batches):
    """The split's batches on the CPU, where onnxruntime reads them."""
    for x, y in batches:
        yield x.cpu(), y.cpu()


def reference_reads(models: Sequence[str], own: Optional[str] = None) -> Dict[str, str]:
    """The reference model stages that ran (PE compares with them), keyed by their stage names as
    pe_against_references reads them; a model is no reference for itself."""
    return {ref: ref for ref in REFERENCES.values() if ref in models and ref != own}


def stamp_and_write(pub, cached: Path, content: Dict[str, Any], dst: Path) -> Dict[str, Any]:
    """Copy a cached ONNX file to the run folder with this run's identity and the final model's PE
    (the publication's `final` read) added to its metadata; returns the metadata written."""
    import onnx

    from ..onnx.export import set_metadata

    final = pub.final()
    pe = {k: v for k, v in final.metrics.items() if k.startswith("vs_")} if final else {}
    metadata = {
        **content,
        "run_name": pub.identity["run_name"],
        "recipe_hash": pub.identity["recipe_hash"],
        "performance_efficiency": pe,
        "mlflow_parent_run_id": pub.parent.run_id or "",
    }
    proto = onnx.load(str(cached))
    set_metadata(proto, metadata)
    with atomic_path(dst) as tmp:
        onnx.save_model(proto, str(tmp))
    return metadata


def update_card(pub, fields: Dict[str, Any]) -> None:
    """Later stages (quantize) add their section to this run's model card and re-log it; a section
    that already exists (files) is extended, not replaced."""
    path = pub.run_dir / "model_card.json"
    card = json.loads(path.read_text())
    for key, value in fields.items():
        card[key] = {**card[key], **value} if isinstance(value, dict) and isinstance(card.get(key), dict) else value
    atomic_write_json(path, card)
    if pub.tracker.uri is not None:
        pub.parent.log_artifact(path)


def precision_metrics(p) -> Dict[str, float]:
    """The training precision as stage metrics: bf16 (1) or fp32 (0) per forward, and what `auto` timed."""
    return {
        "bf16_student": float(p.student == "bf16"),
        "bf16_teacher": float(p.teacher == "bf16"),
        **{f"precision_{name}_ms": ms for name, ms in p.measured_ms.items()},
    }


def finalize(job: Job, model, arch: Dict[str, Any], history=None, extra=None, keep_zeros: bool = False) -> StageResult:
    """Save, evaluate (val for selection, test once for the report), count."""
    model.eval()
    if not dist.is_main():  # torchrun: rank 0 saves and scores; the others load its checkpoint after the stage
        return StageResult(module=model)
    checkpoint = job.stage_dir / "model.pt"
    save_state({"model": model.state_dict()}, checkpoint)
    metrics = {
        "val_accuracy": evaluate(model, job.data.val)["accuracy"],
        "test_accuracy": evaluate(model, job.data.test)["accuracy"],
        **model_stats(model, (1, *job.data.input_shape)),
        **(extra or {}),
    }
    art = ModelArtifact(
        checkpoint.name, num_classes=job.data.num_classes, keep_zeros=keep_zeros, sha256=file_sha256(checkpoint), **arch
    )
    return StageResult(metrics, history or [], {"model": art}, module=model)


def arch_of(model_cfg) -> Dict[str, Any]:
    return {"arch": model_cfg.model, "cifar_stem": model_cfg.cifar_stem, "kwargs": dict(model_cfg.kwargs)}


def model_fingerprint(model_cfg) -> Dict[str, Any]:
    """The content of the files a model section points at (checkpoint, weights), for the stage key."""
    weights = resolve.weights_identity(model_cfg)
    return {"checkpoint": file_digest(model_cfg.checkpoint), **({"weights": weights} if weights else {})}


def pe_against_references(
    outputs: Dict[str, StageOutput],  # a publication's inputs: the references under their stage names
    metrics: Dict[str, float],
    own_stage: str,
    latency: Optional[Dict[str, float]] = None,
) -> Dict[str, float]:
    """PE of a model (made by `own_stage`, or its INT8 version) against this run's teacher and unpruned
    KD student, those present and not `own_stage` itself (a model is no reference for itself).
    latency: reference stage -> p50 ms, plus "final" for the model itself."""
    out = {}
    for label, ref in REFERENCES.items():
        if ref not in outputs or ref == own_stage:
            continue
        r = outputs[ref].result.metrics
        pe = performance_efficiency(
            metrics["test_accuracy"],
            r["test_accuracy"],
            metrics["nonzero_params"],
            r["params"],
            metrics["macs"],
            r["macs"],
            None if latency is None else latency.get("final"),
            None if latency is None else latency.get(ref),
        )
        out.update({f"vs_{label}.{k}": v for k, v in pe.items() if v is not None})
    return out


class ModelStage(Stage):
    """A stage whose output is a trained (or pruned) model."""

    makes_model = True
    followers = "train"

    def preflight(self, cfg: Sections, data: DataBundle) -> None:
        """A model section's reference builds, its weights resolve, and its forward gives one
        (batch, num_classes) logits tensor on a real batch, before any stage trains."""
        example = data.example_batch(2).cpu() if hasattr(data, "example_batch") else None  # None: build checks only
        for section in vars(cfg).values():
            if hasattr(section, "weights") and hasattr(section, "model"):  # teacher / student
                resolve.check_model(section, data.num_classes, example)

    def restore(self, job: Job, result: StageResult):
        return load_model(job, result.model())

    def reads(self, cfg: Sections, models: Sequence[str], ran: Sequence[str]) -> Dict[str, str]:
        return reference_reads(models, self.name)

    def publish(self, pub: Publication, output: StageOutput, child: StageRun) -> Dict[str, float]:
        if not output.result.metrics:
            return {}
        return pe_against_references(pub.inputs, output.result.metrics, output.name)


def latency_plan(section) -> Tuple[Settings, Plan]:
    """A recipe section with threads and a `latency` subsection -> how bench/compare.py measures:
    the target's threads (recorded with every ratio) and the replication plan."""
    lat = section.latency
    settings = Settings(
        intra_op_threads=section.intra_op_threads,
        inter_op_threads=getattr(section, "inter_op_threads", 1),
        graph_optimization=getattr(section, "graph_optimization", "all"),
        block_s=lat.block_s,
        blocks=lat.blocks,
    )
    return settings, Plan(lat.min_replicates, lat.max_replicates, lat.target_width, lat.budget_s, lat.isolation)


def calibration_reader(job: Job, input_name: str, images: int):
    """Training images with the evaluation preprocessing (no flips or crops), in split order."""
    from ..onnx.quantize import CalibrationReader

    plain = dataclasses.replace(job.data.train, augment=False, shuffle=False, num_replicas=1, rank=0)
    return CalibrationReader(plain, input_name, images)  # re-iterable: every candidate sees the same images


INT8_SOURCES = ("qad", "quantize")  # the stages that may ship model_int8.onnx; QAD's file replaces PTQ's


def int8_roles(ran: Sequence[str]) -> Dict[str, str]:
    """inputs() entries of a stage that reads the shipped INT8 file: the INT8 stages that ran."""
    return {name: name for name in INT8_SOURCES if name in ran}


def shipped_int8(inputs: Dict[str, StageOutput]) -> Optional[Tuple[StageOutput, Any]]:
    """(stage output, OnnxArtifact) of the INT8 file this run ships, None when the float model ships."""
    for name in INT8_SOURCES:
        out = inputs.get(name)
        if out is not None and "int8" in out.result.artifacts:
            return out, out.result.artifacts["int8"]
    return None
