"""export/<run>/summary.json and the table `compress` prints at the end.

The summary is run-specific: it is rewritten by the runner after every stage (status RUNNING
from the start, FINISHED / FAILED / KILLED at the end) and never cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from ..formatting import si
from ..fsutil import atomic_write_json
from ..tracking import runs_link
from .stage import STAGES


@dataclass
class Summary:
    path: Path
    data: Dict[str, Any] = field(default_factory=dict)
    owner: bool = True  # under torchrun only rank 0 writes it

    def add_stage(self, output) -> None:
        """output: an engine StageOutput."""
        paths = {name: str(output.path(_main_file(a))) for name, a in output.result.artifacts.items()}
        self.data.setdefault("stages", {})[output.name] = {
            "metrics": output.metrics,
            "history": output.result.history,
            "info": output.result.info,
            "paths": paths,
            "key": output.key,
            "cached": output.cached,
            "mlflow_run_id": output.run_id,
        }
        self.write()

    def add_files(self, files: Dict[str, Path]) -> None:
        """Files published into export/<run>/ for this run."""
        self.data.setdefault("files", {}).update({k: str(v) for k, v in files.items()})
        self.write()

    def write(self) -> None:
        if self.owner:
            atomic_write_json(self.path, self.data)

    def close(self, status: str) -> None:
        """Best effort: closing after a failure (a full disk) must not hide the failure itself."""
        from ..errors import OutputError

        self.data["status"] = status
        try:
            if self.path.parent.is_dir():
                self.write()
        except OutputError:
            pass


def _main_file(artifact) -> str:
    return next(iter(artifact.files()))


def model_rows(stages: Dict[str, Dict[str, Any]]) -> List[str]:
    """One row per model stage (a stage with a row_label), in the order the stages ran."""
    header = f"{'stage':<13} {'val acc':>7} {'test acc':>8} {'params':>8} {'nonzero':>8} {'MACs':>8} {'PE(params) vs teacher':>21}"
    lines = [header, "-" * len(header)]
    for name, entry in stages.items():
        label = STAGES.get(name).row_label if name in STAGES else None
        if label is None:
            continue
        m = entry["metrics"]
        pe = m.get("vs_teacher.pe_params")
        lines.append(
            f"{label:<13} {m['val_accuracy']:>7.4f} {m['test_accuracy']:>8.4f} {si(m['params']):>8} "
            f"{si(m['nonzero_params']):>8} {si(m['macs']):>8} {'-' if pe is None else f'{pe:.3f}':>21}"
        )
    return lines


def final_table(summary: Summary) -> str:
    data = summary.data
    stages, files = data.get("stages", {}), data.get("files", {})
    lines = ["", f"== {data['run_name']}: results =="] + model_rows(stages)
    for name, entry in stages.items():
        if name in STAGES:
            lines += STAGES.get(name).summary_lines(entry)
    lines += ["", f"summary:      {summary.path}"]
    if "model.onnx" in files:
        lines.append(f"ONNX model:   {files['model.onnx']}  (card: {files['model_card.json']})")
    if "model_int8.onnx" in files:
        lines.append(f"INT8 model:   {files['model_int8.onnx']}")
    if "package" in files:
        lines.append(
            f"Device pkg:   {files['package']}  (checked: ORT format, golden outputs, infer.py; see its README.md)"
        )
    mlflow_info = data.get("mlflow", {})
    if mlflow_info.get("tracking_uri"):
        lines.append(
            f"MLflow:       {mlflow_info['tracking_uri']}  parent run {mlflow_info['parent_run_id']}  "
            f"(browse: mlflow ui --backend-store-uri {mlflow_info['tracking_uri']}, then open "
            f"{runs_link(mlflow_info['experiment_id'])})"
        )
    return "\n".join(lines)
