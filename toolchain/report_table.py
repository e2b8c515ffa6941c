"""The short table `compress` prints at the end (and stores in summary.json)."""

from __future__ import annotations

from typing import Any, Dict, List

ROW_STAGES = (("teacher", "teacher"), ("distill", "KD student"), ("prune", "pruned"), ("finetune", "pruned+KD ft"))


def _fmt_int(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def model_rows(results: Dict[str, Dict[str, Any]]) -> List[str]:
    header = f"{'stage':<13} {'val acc':>7} {'test acc':>8} {'params':>8} {'nonzero':>8} {'MACs':>8} {'PE(params) vs teacher':>21}"
    lines = [header, "-" * len(header)]
    for stage, label in ROW_STAGES:
        if stage not in results:
            continue
        m = results[stage]["metrics"]
        pe = m.get("vs_teacher.pe_params")
        lines.append(f"{label:<13} {m['val_accuracy']:>7.4f} {m['test_accuracy']:>8.4f} {_fmt_int(m['params']):>8} "
                     f"{_fmt_int(m['nonzero_params']):>8} {_fmt_int(m['macs']):>8} {'-' if pe is None else f'{pe:.3f}':>21}")
    return lines


def final_table(ctx) -> str:
    lines = ["", f"== {ctx.recipe.name}: results =="] + model_rows(ctx.results)
    export = ctx.results.get("export")
    if export:
        m = export["metrics"]
        lines.append(f"ONNX: test acc {m['onnx_test_accuracy']:.4f} (PyTorch {m['torch_test_accuracy']:.4f}), "
                     f"parity max|diff| {m['parity_max_abs_diff']:.2e}, top-1 agreement {m['parity_top1_agreement']:.3f}")
    bench = ctx.results.get("bench")
    if bench:
        lines += ["", bench["table"]]
    lines += ["", f"summary:      {ctx.summary.path}"]
    if export:
        lines.append(f"ONNX model:   {export['paths']['onnx']}  (card: {export['paths']['model_card']})")
    mlflow_info = ctx.summary.data.get("mlflow", {})
    if mlflow_info.get("tracking_uri"):
        lines.append(f"MLflow:       {mlflow_info['tracking_uri']}  parent run {mlflow_info['parent_run_id']}  "
                     f"(browse: mlflow ui --backend-store-uri {mlflow_info['tracking_uri']})")
    return "\n".join(lines)
