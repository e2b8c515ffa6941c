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
    consumes = ("export",)  # the plan runs it after export
    requires = {"export": "it reads the exported file"}
    sections = ("export",)  # runs when the recipe exports; a stage with a new section adds it to recipe/schema.py
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
    consumes = ("toy_bytes",)
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
    # ordered from `consumes`: after export (and after the real stages free at the same time, by name)
    assert list(stages)[-2:] == ["toy_bytes", "toy_kb"]
    onnx_bytes = (tmp_path / "export" / "tiny" / "model.onnx").stat().st_size
    assert abs(stages["toy_bytes"]["metrics"]["toy.onnx_bytes"] - onnx_bytes) < 65536  # the cached file, unstamped
    assert stages["toy_kb"]["metrics"]["toy.onnx_kb"] == stages["toy_bytes"]["metrics"]["toy.onnx_bytes"] / 1000
    assert f"toy: the ONNX file is {stages['toy_kb']['metrics']['toy.onnx_kb']:.1f} kB" in out
    assert run(["compress", str(path)]) == 0  # a rerun reuses both
    again = json.loads((tmp_path / "export" / "tiny" / "summary.json").read_text())["stages"]
    assert again["toy_bytes"]["cached"] and again["toy_kb"]["cached"]
    assert again["toy_kb"]["key"] == stages["toy_kb"]["key"]


def _toy(name, consumes=(), makes_model=False):
    return type(
        name, (Stage,), {"name": name, "sections": ("export",), "consumes": consumes, "makes_model": makes_model}
    )()


def test_the_order_is_derived_from_consumes_not_from_names_or_registration():
    from toolchain.engine.runner import ordered
    from toolchain.engine.stage import MODELS

    stages = {
        "a_last": _toy("a_last", ("m_second", "z_first")),
        "m_second": _toy("m_second", ("z_first",), makes_model=True),
        "z_first": _toy("z_first", makes_model=True),
        "b_ship": _toy("b_ship", (MODELS,)),  # every model stage, whichever ran
    }
    order = [s.name for s in ordered(stages)]
    assert order == ["z_first", "m_second", "a_last", "b_ship"]  # ties (a_last, b_ship) by name
    with pytest.raises(ValueError, match="cycle: x, y"):
        ordered({"x": _toy("x", ("y",)), "y": _toy("y", ("x",))})


def test_a_stage_without_the_stage_it_requires_is_one_recipe_error(toy_stages):
    from toolchain.engine.runner import plan
    from toolchain.errors import RecipeError
    from toolchain.recipe import validate_dict

    base = {"name": "p", "student": {"model": "mobilenet_v2"}, "distill": {"loss": "ce"}}
    names = [s.name for s in plan(validate_dict(base))]
    assert names.index("export") < names.index("toy_bytes") < names.index("toy_kb")
    with pytest.raises(
        RecipeError,
        match=r"^bench needs the export stage \(it measures the exported ONNX file\); add an export section$",
    ):
        plan(validate_dict({**base, "export": None, "quantize": None, "package": None}))


def test_reading_a_stage_not_declared_in_consumes_fails(toy_stages, monkeypatch, tiny_recipe, capsys):
    monkeypatch.setattr(KiloBytes, "consumes", ())  # still reads toy_bytes in inputs()
    path = tiny_recipe(
        teacher=None,
        distill={"epochs": 0, "loss": "ce"},
        export={"exporter": "torchscript", "opset": 17, "references": False},
    )
    with pytest.raises(ValueError, match="stage toy_kb reads toy_bytes, which is not in its consumes"):
        run(["compress", str(path)])
