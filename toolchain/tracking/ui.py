"""What the MLflow UI shows: the experiment's kind, the runs table's saved view (the headline
metric columns) and its link, and a registered model version's tags and description (the card).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional

from ..errors import first_line
from .retries import retry
from .uris import _redact

# MLflow 3's kind for model-training experiments (unset, its UI may treat them as GenAI ones). 3.17.2's UI
# lands by its own GenAI / Model training toggle instead: docs/mlflow_ui/README.md
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


# The runs table's columns. MLflow 3.17.2's UI keeps them per browser (localStorage "ExperimentPage"
# state; a fresh browser gets Source, Models, Dataset), with one server-side exception: a saved view,
# the experiment tag mlflow.sharedViewState.<id> (its "Views" menu lists them), which the runs page
# applies when its URL carries ?viewStateShareKey=<id>. The toolchain saves one such view when it
# creates or first uses an experiment, and never rewrites it (the user may have overwritten it from
# the UI); its link is runs_link(). Evidence from the UI bundle: docs/mlflow_ui/README.md.
RUNS_VIEW_ID = "toolchain-headline"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW_ID}"
RUNS_VIEW_NAME = "Headline metrics (toolchain)"
# metrics finish() logs on the parent run (engine/runner.py; bench and int8 ones only when those stages ran;
# the UI skips a selected column no run has)
HEADLINE_COLUMNS = (
    "test_accuracy",
    "vs_teacher.pe_params",
    "latency_p50_ms.cpu.bs1",
    "onnx_file_bytes",
    "vs_student.pe_params",
    "onnx_zip_bytes",
    "int8.test_accuracy",
    "int8.latency_p50_ms.cpu.bs1",
    "int8.file_bytes",
)


def runs_view_value(now_ms: Optional[int] = None) -> str:
    """The saved view as the UI writes one (its "Save view" envelope: name, createdAt, updatedAt, and the
    state as a JSON string): newest runs first, the Dataset column and the headline metric columns."""
    import json

    columns = ["attributes.`Dataset`"] + [f"metrics.`{name}`" for name in HEADLINE_COLUMNS]
    # metric columns about as wide as their names (the UI's default cuts vs_teacher.pe_params to "vs_teacher.pe_")
    widths = {f"metrics.`{name}`": max(100, 7 * len(name) + 24) for name in HEADLINE_COLUMNS}
    widths["attributes.`Dataset`"] = 220
    state = {
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "selectedColumns": columns,
        "columnOrder": columns,
        "columnWidths": widths,
    }
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return json.dumps({"name": RUNS_VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms, "state": json.dumps(state)})


def runs_link(experiment_id: str) -> str:
    """The URL fragment (after the MLflow UI's address) that opens the experiment's runs table in
    the saved view, whatever the browser's GenAI / Model training toggle says."""
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={RUNS_VIEW_ID}&workflowType=machine_learning"


def _save_runs_view(client, experiment_id: str, uri: str) -> None:
    """Best effort: a server that refuses the tag (permissions) costs the link its columns, not the run."""
    try:
        retry(client.set_experiment_tag, experiment_id, RUNS_VIEW_TAG, runs_view_value())
    except Exception as exc:
        logging.getLogger(__package__).warning(
            "MLflow: could not save the runs-table view %s on experiment %s (%s); "
            "the runs link opens without its columns",
            RUNS_VIEW_TAG,
            experiment_id,
            _redact(first_line(exc, 200), uri),
        )


CARD_TAGS = (
    "name",
    "model",
    "dataset",
    "test_accuracy",
    "onnx_test_accuracy",
    "params",
    "nonzero_params",
    "macs",
    "recipe_hash",
    "toolchain_version",
)


def card_tags(card: Dict[str, Any]) -> Dict[str, str]:
    """The model card's headline fields, and the shipped files' sha256, as model version tags."""
    tags = {k: str(card[k]) for k in CARD_TAGS if card.get(k) is not None}
    tags.update({f"sha256.{f}": v["sha256"] for f, v in (card.get("files") or {}).items() if v.get("sha256")})
    tags.update({k: str(v) for k, v in flatten(card.get("performance_efficiency") or {}).items()})
    return tags


def card_description(card: Dict[str, Any]) -> str:
    pe = (card.get("performance_efficiency") or {}).get("vs_teacher.pe_params")
    head = (
        f"{card.get('model')} on {card.get('dataset')} (run {card.get('name')}): test accuracy "
        f"{card.get('test_accuracy')}, ONNX {card.get('onnx_test_accuracy')}, PE(params) vs teacher {pe}."
    )
    return head + " The full card is the run's model_card.json artifact."


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested fields as MLflow's flat keys (card tags; the engine's params)."""
    out: Dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
