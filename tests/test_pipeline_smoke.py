"""End to end: `compress` on tiny Fashion-MNIST files, every stage (the run itself is conftest's
`pipeline_runs`, shared with tests/test_engine.py)."""

import json

import mlflow
import onnx
import pytest

from toolchain.cli import run

STAGES = ["teacher", "distill", "prune", "finetune", "export", "bench"]


def test_compress_end_to_end(pipeline_runs):
    run_dir = pipeline_runs["tmp"] / "export" / "tiny"
    summary = pipeline_runs["tiny"]
    assert summary["status"] == "FINISHED" and list(summary["stages"]) == STAGES

    stages = summary["stages"]
    assert stages["prune"]["metrics"]["macs"] < stages["distill"]["metrics"]["macs"]  # channels removed
    assert stages["prune"]["metrics"]["params"] < stages["distill"]["metrics"]["params"]
    # the shipped model is the fine-tuned one, scored at its best validation epoch
    assert stages["export"]["metrics"]["torch_test_accuracy"] == stages["finetune"]["metrics"]["test_accuracy"]
    assert stages["finetune"]["metrics"]["val_accuracy"] == pytest.approx(max(h["val_accuracy"] for h in stages["finetune"]["history"]))
    assert "vs_teacher.pe_params" in stages["finetune"]["metrics"] and "vs_student.pe_macs" in stages["finetune"]["metrics"]
    assert stages["export"]["metrics"]["parity_top1_agreement"] >= 0.99
    assert "speedup_vs_teacher.cpu.bs1" in stages["bench"]["metrics"]

    model = onnx.load(str(run_dir / "model.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["run_name"] == "tiny" and "recipe_hash" in meta
    card = json.loads((run_dir / "model_card.json").read_text())
    assert card["onnx_test_accuracy"] == stages["export"]["metrics"]["onnx_test_accuracy"]

    client = mlflow.MlflowClient(summary["mlflow"]["tracking_uri"])
    runs = client.search_runs([summary["mlflow"]["experiment_id"]])
    parent = summary["mlflow"]["parent_run_id"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}
    assert sorted(children) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert children["distill"].data.metrics["test_accuracy"] == stages["distill"]["metrics"]["test_accuracy"]
    assert "KD student" in summary["final_table"] and "model.onnx" in summary["final_table"]
    assert "PyTorch eager" in summary["stages"]["bench"]["info"]["table"]


def test_rerun_reuses_finished_stages(tiny_recipe, tmp_path, warm_cache):
    path = tiny_recipe()
    assert run(["compress", str(path)]) == 0
    first = json.loads((tmp_path / "export" / "tiny" / "summary.json").read_text())
    # the entries warm_cache copied from another output_dir are reused: a cache entry does not depend on where it lives
    assert first["stages"]["teacher"]["cached"] and first["stages"]["distill"]["cached"]
    assert run(["compress", str(path), "distill.lr=0.02"]) == 0
    second = json.loads((tmp_path / "export" / "tiny" / "summary.json").read_text())
    assert second["stages"]["teacher"]["cached"] is True
    assert second["stages"]["distill"]["cached"] is False  # its section changed
    assert second["stages"]["teacher"]["metrics"] == first["stages"]["teacher"]["metrics"]


def test_taylor_pruner_scores_with_the_pipeline_training_data(tiny_recipe, tmp_path, warm_cache):
    path = tiny_recipe(prune={"method": "channel", "pruner": "taylor", "sparsity": 0.5, "taylor_batches": 4},
                       finetune={"epochs": 1, "lr": 0.01, "loss": "kd"})
    assert run(["compress", str(path)]) == 0
    stages = json.loads((tmp_path / "export" / "tiny" / "summary.json").read_text())["stages"]
    prune = stages["prune"]["metrics"]
    assert prune["macs"] < 0.6 * stages["distill"]["metrics"]["macs"] and prune["prune.unaligned_layers"] == 0
    assert len(stages["finetune"]["history"]) == 1 and stages["finetune"]["metrics"]["params"] == prune["params"]
