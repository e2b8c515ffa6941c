"""Reruns on tiny Fashion-MNIST files (the end-to-end run of every stage, conftest's
`pipeline_runs`, is checked in tests/test_engine.py, the one module that reads it)."""

import json

from toolchain.cli import run


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
    path = tiny_recipe(
        prune={"method": "channel", "pruner": "taylor", "sparsity": 0.5, "taylor_batches": 4},
        finetune={"epochs": 1, "lr": 0.01, "loss": "kd"},
    )
    assert run(["compress", str(path)]) == 0
    stages = json.loads((tmp_path / "export" / "tiny" / "summary.json").read_text())["stages"]
    prune = stages["prune"]["metrics"]
    assert prune["macs"] < 0.6 * stages["distill"]["metrics"]["macs"] and prune["prune.unaligned_layers"] == 0
    assert len(stages["finetune"]["history"]) == 1 and stages["finetune"]["metrics"]["params"] == prune["params"]
