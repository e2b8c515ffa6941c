"""The Recipe: the run's own settings (name, seed, device, output, tracking) and one field per section."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from .base import Section
from .deployment import BenchConfig, ExportConfig, LatencyConfig, PackageConfig, QuantizeConfig
from .inputs import DataConfig, StudentConfig, TeacherConfig
from .matrix import MatrixConfig
from .names import _loss_needs_teacher
from .pruning import LATENCY_BUDGETS, PruneConfig
from .training import TrainConfig

RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class TrackingConfig(Section):
    enabled: bool = Field(True, description="Log to MLflow.")
    uri: Optional[str] = Field(
        None,
        description="MLflow tracking URI (sqlite, http(s), postgresql, mysql, mssql, file, databricks); None uses $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db. A password in it is masked (***) in outputs; MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD keep it out of the recipe.",
    )
    experiment: str = Field("toolchain", min_length=1, description="MLflow experiment name.")
    register_model: Optional[str] = Field(
        None,
        min_length=1,
        max_length=256,
        description="Register the shipped ONNX model (the MLflow model on the parent run) under this name in the MLflow "
        "model registry when the run finishes, a new version per run, described by its model card; None registers nothing.",
    )

    @model_validator(mode="after")
    def _registry_needs_tracking(self) -> "TrackingConfig":
        if self.register_model and not self.enabled:
            raise ValueError(
                "register_model needs tracking.enabled: true (the model is registered from its MLflow run)"
            )
        return self


class Recipe(Section):
    name: str = Field(
        ...,
        pattern=RUN_NAME_PATTERN,
        description="Run name; becomes export/<name>/ (letters, digits, . _ -; no path separators).",
    )
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed for data split, init, shuffling (0 to 2^32 - 1: numpy's seed range)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Training device; auto picks cuda when available."
    )
    threads: Optional[int] = Field(
        None,
        ge=1,
        le=1024,
        description="torch CPU threads for training and evaluation; None keeps torch's default (one per core). On a machine shared with other jobs, 1 is often faster.",
    )
    output_dir: str = Field("export", description="Where export/<name>/ (summary, ONNX, checkpoints) is written.")
    data: DataConfig = Field(default_factory=DataConfig, description="Dataset and loaders.")
    teacher: Optional[TeacherConfig] = Field(None, description="Teacher: trained here or loaded from a checkpoint.")
    student: StudentConfig = Field(..., description="The student architecture to distil into and compress.")
    distill: TrainConfig = Field(
        default_factory=lambda: TrainConfig(loss="kd"),
        description="Student training (losses kd and dkd, and features, need a teacher).",
    )
    prune: Optional[PruneConfig] = Field(None, description="Pruning stage; omit to skip.")
    finetune: Optional[TrainConfig] = Field(
        None,
        description="Fine-tuning after pruning (loss kd, dkd or ce; features too). "
        "Without a prune section it fine-tunes the unpruned student: the same-budget control.",
    )
    export: Optional[ExportConfig] = Field(
        default_factory=ExportConfig, description="ONNX export with parity gate; null to skip."
    )
    bench: Optional[BenchConfig] = Field(
        default_factory=BenchConfig, description="onnxruntime benchmark; null to skip."
    )
    quantize: Optional[QuantizeConfig] = Field(
        None, description="INT8 quantization of the exported model, measured before it ships; omit to skip."
    )
    package: Optional[PackageConfig] = Field(
        None,
        description="Self-checking device package of the shipped model(s) in export/<name>/package/ (ONNX + ORT format, infer.py, golden data); omit to skip.",
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    matrix: Optional[MatrixConfig] = Field(
        None,
        description="Sweep over variants of this recipe; run it with `python -m toolchain sweep` (compress refuses it).",
    )

    @field_validator("name")
    @classmethod
    def _no_dot_names(cls, v: str) -> str:
        if set(v) <= {"."}:
            raise ValueError("run name cannot be '.' or '..'")
        return v

    @model_validator(mode="after")
    def _kd_needs_a_teacher_section(self) -> "Recipe":
        qat = self.quantize.qat if self.quantize is not None else None
        for key, section in (("distill", self.distill), ("finetune", self.finetune), ("quantize.qat", qat)):
            if section is not None and section.needs_teacher and self.teacher is None:
                what = f"loss is {section.loss}" if _loss_needs_teacher(section.loss) else "features is set"
                raise ValueError(
                    f"{key}.{what} but the recipe has no teacher section; add one or set {key}.loss: ce "
                    f"without {key}.features"
                )
        # which stage needs which (bench needs export...) is declared by the stages (Stage.requires)
        # and checked by the engine's plan
        self._resolve_budget()
        return self

    def _resolve_budget(self) -> None:
        """prune.budget's measurement settings left unset take the bench / export sections' (the prune
        stage sees only its own sections, so they are resolved here, into its cache key)."""
        budget = self.prune.budget if self.prune is not None else None
        if budget is None or budget.kind not in (*LATENCY_BUDGETS, "file_bytes"):
            return
        export = self.export or ExportConfig()
        updates = {"exporter": budget.exporter or export.exporter, "opset": budget.opset or export.opset}
        if budget.kind in LATENCY_BUDGETS:
            bench = self.bench
            updates.update(
                batch_size=budget.batch_size or (bench.batch_sizes[0] if bench else 1),
                threads=budget.threads if budget.threads is not None else (bench.intra_op_threads if bench else 0),
                latency=budget.latency or (bench.latency.model_copy() if bench else LatencyConfig()),
            )
        if budget.kind == "file_bytes":
            updates["file"] = self._budgeted_file(budget)
        if any(getattr(budget, k) != v for k, v in updates.items()):
            self.prune.budget = budget.model_copy(update=updates)

    def _budgeted_file(self, budget) -> str:
        """file_bytes budgets the INT8 file when the recipe quantizes; the quantize stage then keeps a
        larger file from shipping (quantize.max_file_bytes, unless the recipe sets its own)."""
        file = budget.file or ("int8" if self.quantize is not None else "float")
        if file == "int8" and self.quantize is None:
            raise ValueError(
                "prune.budget.file int8 budgets the quantize stage's INT8 file, but the recipe has no quantize "
                "section; add one, or set prune.budget.file: float"
            )
        if file == "int8" and self.quantize.max_file_bytes is None:
            self.quantize = self.quantize.model_copy(update={"max_file_bytes": budget.file_bytes})
        return file
