"""CONTRIBUTING.md's "add a stage", followed once: two toy stages, each one class in one file's worth
of code, the second fed by the first, plugged in through the registry alone (no engine, summary
or sweep edit). They run in the real pipeline on the tiny files, are cached like every stage, and
their closing-table line comes from their own summary_lines hook."""

import json

import pytest

from toolchain.cli import run
from toolchain.engine.artifacts import StageResult
from toolchain.engine.stage import STAGES, Stage


class OnnxBytes(Stage):
    """Self-contained: reads the export stage's output, computes a number."""

    name = "toy_bytes"
    order = 56
    sections = ("export",)  # runs when the recipe exports; a stage with a new section adds it to recipe.py
    uses_data = False
    revision = {"toy_revision": 1}

    def inputs(self, cfg, models, ran):
        return {"export": "export"}

    def compute(self, job):
        export = job.inputs["export"]
        size = export.path(export.result.artifacts["final"].file).stat().st_size
        return StageResult({"toy.onnx_bytes": float(size)})


class KiloBytes(Stage):
    """Feeding: reads the first toy stage's result through its declared input."""

    name = "toy_kb"
    order = 57
    sections = ("export",)
    uses_data = False

    def inputs(self, cfg, models, ran):
        return {"bytes": "toy_bytes"}

    def compute(self, job):
        return StageResult({"toy.onnx_kb": job.inputs["bytes"].result.metrics["toy.onnx_bytes"] / 1000})

    def summary_lines(self, entry):
        return [f"toy: the ONNX file is {entry['metrics']['toy.onnx_kb']:.1f} kB"]


@pytest.fixture
def toy_stages(monkeypatch):
    import toolchain.stages  # noqa: F401  (the real stages first)

    for cls in (OnnxBytes, KiloBytes):
        monkeypatch.setitem(STAGES._entries, cls.name, cls())


def test_a_toy_stage_that_feeds_another_runs_caches_and_reports(toy_stages, tiny_recipe, tmp_path, warm_cache, capsys):
    path = tiny_recipe(export={"exporter": "torchscript", "opset": 17, "references": False})
    assert run(["compress", str(path)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "export" / "tiny" / "summary.json").read_text())
    stages = summary["stages"]
    assert list(stages)[-2:] == ["toy_bytes", "toy_kb"]  # ordered by `order`, after export
    onnx_bytes = (tmp_path / "export" / "tiny" / "model.onnx").stat().st_size
    assert abs(stages["toy_bytes"]["metrics"]["toy.onnx_bytes"] - onnx_bytes) < 65536  # the cached file, unstamped
    assert stages["toy_kb"]["metrics"]["toy.onnx_kb"] == stages["toy_bytes"]["metrics"]["toy.onnx_bytes"] / 1000
    assert f"toy: the ONNX file is {stages['toy_kb']['metrics']['toy.onnx_kb']:.1f} kB" in out
    assert run(["compress", str(path)]) == 0  # a rerun reuses both
    again = json.loads((tmp_path / "export" / "tiny" / "summary.json").read_text())["stages"]
    assert again["toy_bytes"]["cached"] and again["toy_kb"]["cached"]
    assert again["toy_kb"]["key"] == stages["toy_kb"]["key"]
