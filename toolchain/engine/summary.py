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

ROW_STAGES = (("teacher", "teacher"), ("distill", "KD student"), ("prune", "pruned"), ("finetune", "pruned+KD ft"))


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
    header = f"{'stage':<13} {'val acc':>7} {'test acc':>8} {'params':>8} {'nonzero':>8} {'MACs':>8} {'PE(params) vs teacher':>21}"
    lines = [header, "-" * len(header)]
    for stage, label in ROW_STAGES:
        if stage not in stages:
            continue
        m = stages[stage]["metrics"]
        pe = m.get("vs_teacher.pe_params")
        lines.append(
            f"{label:<13} {m['val_accuracy']:>7.4f} {m['test_accuracy']:>8.4f} {si(m['params']):>8} "
            f"{si(m['nonzero_params']):>8} {si(m['macs']):>8} {'-' if pe is None else f'{pe:.3f}':>21}"
        )
    return lines


def _replicates(latency: Dict[str, Any]) -> str:
    return f"{latency['replicates']} fresh-{latency['plan']['isolation']} replicates, stopped: {latency['stopped']}"


def _int8_line(quantize: Dict[str, Any]) -> str:
    m, info = quantize["metrics"], quantize["info"]
    if not m.get("int8.shipped"):
        return f"INT8: not shipped, the float model ships ({info['reason']})"
    batches = sorted(int(k.split("bs")[1]) for k in m if k.startswith("int8.speedup.bs") and "_" not in k)
    speedups = " / ".join(
        f"{m[f'int8.speedup.bs{b}']:.2f}x [{m[f'int8.speedup.bs{b}_lo']:.2f}, "
        f"{m[f'int8.speedup.bs{b}_hi']:.2f}] at batch {b}"
        for b in batches
    )
    return (
        f"INT8: {info['chosen']}, test acc {m['int8.test_accuracy']:.4f}, val acc {m['int8.val_accuracy']:.4f} "
        f"(float {m['float_val_accuracy']:.4f}), {speedups} faster than float (median, 95% interval over "
        f"{_replicates(info['latency'])})"
    )


def final_table(summary: Summary) -> str:
    data = summary.data
    stages, files = data.get("stages", {}), data.get("files", {})
    lines = ["", f"== {data['run_name']}: results =="] + model_rows(stages)
    if stages.get("prune", {}).get("info", {}).get("budget_line"):  # prune.budget: what was decided
        lines.append(stages["prune"]["info"]["budget_line"])
    if "export" in stages:
        m = stages["export"]["metrics"]
        lines.append(
            f"ONNX: test acc {m['onnx_test_accuracy']:.4f} (PyTorch {m['torch_test_accuracy']:.4f}), "
            f"parity max|diff| {m['parity_max_abs_diff']:.2e}, top-1 agreement {m['parity_top1_agreement']:.3f}"
        )
    if "quantize" in stages:
        lines.append(_int8_line(stages["quantize"]))
    if "bench" in stages:
        lines += ["", stages["bench"]["info"]["table"]]
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
