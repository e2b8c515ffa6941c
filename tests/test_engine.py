"""The engine's promises: a cached stage never carries another run's identity, a stage's key
covers exactly what it reads, MLflow artifacts land in the run they are meant for, and the
package has no import cycles."""

import ast
import json
from pathlib import Path

import mlflow
import onnx
import pytest

from toolchain.cli import run
from toolchain.engine.runner import plan, sections_of, stage_key
from toolchain.recipe import validate_dict

STAGES = ["teacher", "distill", "prune", "finetune", "export", "bench"]
PACKAGE = Path(__file__).resolve().parents[1] / "toolchain"


def onnx_metadata(path: Path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def artifacts_of(client, run_id: str, path: str = "") -> set:
    return {a.path for a in client.list_artifacts(run_id, path)}


def test_compress_end_to_end(pipeline_runs):
    run_dir = pipeline_runs["tmp"] / "export" / "tiny"
    summary = pipeline_runs["tiny"]
    assert summary["status"] == "FINISHED" and list(summary["stages"]) == STAGES

    stages = summary["stages"]
    assert stages["prune"]["metrics"]["macs"] < stages["distill"]["metrics"]["macs"]  # channels removed
    assert stages["prune"]["metrics"]["params"] < stages["distill"]["metrics"]["params"]
    # the shipped model is the fine-tuned one, scored at its best validation epoch
    assert stages["export"]["metrics"]["torch_test_accuracy"] == stages["finetune"]["metrics"]["test_accuracy"]
    assert stages["finetune"]["metrics"]["val_accuracy"] == pytest.approx(
        max(h["val_accuracy"] for h in stages["finetune"]["history"])
    )
    assert (
        "vs_teacher.pe_params" in stages["finetune"]["metrics"]
        and "vs_student.pe_macs" in stages["finetune"]["metrics"]
    )
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


@pytest.fixture
def two_runs(pipeline_runs):
    """conftest's full run `tiny`, its `name=copy` rerun, and a bench-only change of copy."""
    return pipeline_runs


def test_a_copy_run_reuses_every_stage(two_runs):
    assert all(s["cached"] for s in two_runs["copy_first"]["stages"].values())
    assert list(two_runs["copy_first"]["stages"]) == STAGES


def test_a_copy_run_ships_its_own_identity(two_runs):
    run_dir = two_runs["tmp"] / "export" / "copy"
    meta = onnx_metadata(run_dir / "model.onnx")
    copy = two_runs["copy"]
    assert meta["run_name"] == "copy" and meta["recipe_hash"] == copy["recipe_hash"] != two_runs["tiny"]["recipe_hash"]
    assert meta["mlflow_parent_run_id"] == copy["mlflow"]["parent_run_id"]
    card = json.loads((run_dir / "model_card.json").read_text())
    assert card["name"] == "copy" and card["run_name"] == "copy"
    assert (
        card["mlflow"]["parent_run_id"]
        == copy["mlflow"]["parent_run_id"]
        != two_runs["tiny"]["mlflow"]["parent_run_id"]
    )
    assert copy["files"]["model.onnx"] == str(run_dir / "model.onnx")
    assert "export/copy/model.onnx" in copy["final_table"] and "export/tiny/" not in copy["final_table"]
    # the latency files of a fully cached run are in its own folder
    assert (run_dir / "latency.txt").is_file() and json.loads((run_dir / "bench.json").read_text())["onnxruntime"]


def test_the_first_run_is_untouched_by_the_copy(two_runs):
    meta = onnx_metadata(two_runs["tmp"] / "export" / "tiny" / "model.onnx")
    assert meta["run_name"] == "tiny" and meta["recipe_hash"] == two_runs["tiny"]["recipe_hash"]


def test_card_and_model_are_artifacts_of_the_parent_run(two_runs):
    for name in ("tiny", "copy"):
        info = two_runs[name]["mlflow"]
        client = mlflow.MlflowClient(info["tracking_uri"])
        parent = artifacts_of(client, info["parent_run_id"])
        assert {"model_card.json", "recipe.yaml"} <= parent
        models = client.search_logged_models(experiment_ids=[info["experiment_id"]])
        assert info["parent_run_id"] in {m.source_run_id for m in models}  # the ONNX model (MLflow 3 LoggedModel)
        export_child = two_runs[name]["stages"]["export"]["mlflow_run_id"]
        assert "model_card.json" not in artifacts_of(client, export_child)
        assert "bench.json" in artifacts_of(client, two_runs[name]["stages"]["bench"]["mlflow_run_id"])


def test_derived_metrics_reach_the_child_runs_of_a_cached_run(two_runs):
    info = two_runs["copy_first"]["mlflow"]
    client = mlflow.MlflowClient(info["tracking_uri"])
    child = client.get_run(two_runs["copy_first"]["stages"]["finetune"]["mlflow_run_id"])
    assert (
        child.data.metrics["vs_teacher.pe_params"]
        == two_runs["tiny"]["stages"]["finetune"]["metrics"]["vs_teacher.pe_params"]
    )
    parent = client.get_run(info["parent_run_id"])
    assert "final.test_accuracy" in parent.data.metrics and "vs_student.pe_latency" in parent.data.metrics


def test_a_bench_only_change_retimes_this_runs_own_file(two_runs):
    stages = two_runs["copy"]["stages"]
    assert [n for n, s in stages.items() if not s["cached"]] == ["bench"]
    bench = json.loads((two_runs["tmp"] / "export" / "copy" / "bench.json").read_text())
    assert sorted(r["batch_size"] for r in bench["onnxruntime"]["final"]["results"]) == [1, 3]
    # it timed the content-keyed export file that this run's model.onnx was stamped from
    timed = Path(bench["onnxruntime"]["final"]["model"])
    assert timed.parent == Path(stages["export"]["paths"]["final"]).parent
    assert ".cache" in timed.parts


# ---------------------------------------------------------------- keys


def recipe(**changes):
    body = {
        "name": "k",
        "student": {"model": "mobilenet_v2"},
        "teacher": {"model": "resnet18"},
        "prune": {"method": "channel"},
        "finetune": {"epochs": 1},
    }
    body.update(changes)
    return validate_dict(body)


def keys(r):
    out, models = {}, []
    for stage in plan(r):
        cfg = sections_of(r, stage)
        inputs = stage.inputs(cfg, models, list(out))
        out[stage.name] = stage_key(stage, cfg, {role: out[n] for role, n in inputs.items()}, "data")
        if stage.makes_model:
            models.append(stage.name)
    return out


def test_keys_ignore_what_a_stage_cannot_read():
    base = keys(recipe())
    assert keys(recipe(name="other", tracking={"experiment": "x"}, output_dir="elsewhere")) == base
    bench_changed = keys(recipe(bench={"batch_sizes": [1, 8]}))
    assert {n for n in base if base[n] != bench_changed[n]} == {"bench"}


def test_a_check_setting_is_not_part_of_the_key():
    """prune.check_time_limit_s bounds the preflight; the pruned model does not depend on it."""
    pruned = dict(prune={"method": "channel"}, finetune={"epochs": 1})
    base = keys(recipe(**pruned))
    assert keys(recipe(prune={"method": "channel", "check_time_limit_s": 5}, finetune={"epochs": 1})) == base
    assert keys(recipe(prune={"method": "channel", "sparsity": 0.3}, finetune={"epochs": 1}))["prune"] != base["prune"]


def test_keys_follow_inputs():
    base = keys(recipe())
    teacher_changed = keys(recipe(teacher={"model": "resnet34"}))
    assert all(base[n] != teacher_changed[n] for n in STAGES)
    export_changed = keys(recipe(export={"opset": 19}))
    assert {n for n in base if base[n] != export_changed[n]} == {"export", "bench"}


def test_a_student_trained_without_kd_does_not_depend_on_the_teacher():
    ce = dict(distill={"loss": "ce"}, finetune={"epochs": 1, "loss": "ce"}, prune={"method": "channel"})
    base, other_teacher = keys(recipe(**ce)), keys(recipe(**ce, teacher={"model": "resnet34"}))
    assert base["distill"] == other_teacher["distill"] and base["finetune"] == other_teacher["finetune"]
    assert base["export"] != other_teacher["export"]  # it exports the teacher as a reference


# ---------------------------------------------------------------- layering


def module_imports(path: Path) -> set:
    """Every toolchain module a file imports, at module level or inside functions."""
    name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.startswith("toolchain"):
                found.update(f"{base}.{a.name}" for a in node.names)
                found.add(base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("toolchain"))
    return found


def import_graph() -> dict:
    files = {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in PACKAGE.rglob("*.py")
    }
    return {mod: {m for m in module_imports(p) if m in files and m != mod} for mod, p in files.items()}


def find_cycle(graph: dict):
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt, stack + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    assert "toolchain.engine.runner" in graph and len(graph) > 30
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layers_point_down():
    """Libraries never import the engine or the stages; stages never import the runner."""
    graph = import_graph()
    upper = ("toolchain.engine", "toolchain.stages", "toolchain.cli", "toolchain.sweep")
    for mod, deps in graph.items():
        if mod.startswith(upper) or mod == "toolchain.__main__":
            continue
        assert not any(d.startswith(upper) for d in deps), (
            f"{mod} imports {sorted(d for d in deps if d.startswith(upper))}"
        )
    for mod, deps in graph.items():
        if mod.startswith("toolchain.stages"):
            assert "toolchain.engine.runner" not in deps, mod


# command modules: what a user runs (python -m toolchain ..., python -m toolchain.bench on a device)
COMMANDS = (
    "toolchain.cli",
    "toolchain.sweep",
    "toolchain.report",
    "toolchain.attach",
    "toolchain.__main__",
    "toolchain.bench.cli",
    "toolchain.bench.__main__",
)


def test_stages_are_peers_and_the_engine_imports_no_command():
    """A stage imports stages/common.py, never another stage; the engine imports no command module
    (cli, sweep, report, attach); libraries import neither engine, stages nor commands."""
    graph = import_graph()
    stage_files = {m for m in graph if m.startswith("toolchain.stages.") and m != "toolchain.stages.common"}
    for mod in stage_files:
        assert not graph[mod] & stage_files, f"{mod} imports {sorted(graph[mod] & stage_files)}"
    for mod, deps in graph.items():
        if mod.startswith("toolchain.engine"):
            assert not any(d.startswith(COMMANDS) for d in deps), f"{mod} imports {sorted(deps)}"
            # the torchrun protocol builds on the process group (a leaf), not on the training package
            assert not any(d.startswith("toolchain.train") for d in deps), f"{mod} imports {sorted(deps)}"
    assert {d for d in graph["toolchain.procgroup"] if d.startswith("toolchain.")} <= {"toolchain.errors"}
    upper = ("toolchain.engine", "toolchain.stages", *COMMANDS)
    for mod, deps in graph.items():
        if mod.startswith(upper) or mod == "toolchain.stages":
            continue
        assert not any(d.startswith(upper) for d in deps), (
            f"{mod} imports {sorted(d for d in deps if d.startswith(upper))}"
        )


# ---------------------------------------------------------------- cache entries are verified before reuse


def test_damaged_cache_entries_are_recomputed_and_never_shipped(tiny_recipe, tmp_path, capsys):
    # untrained student, torchscript export (faster): the cache-healing path is under test
    path = tiny_recipe(
        teacher=None,
        distill={"epochs": 0, "loss": "ce"},
        export={"exporter": "torchscript", "opset": 17, "references": False},
    )
    assert run(["compress", str(path)]) == 0
    first = json.loads((tmp_path / "export" / "tiny" / "summary.json").read_text())["stages"]
    cached_onnx = Path(first["export"]["paths"]["final"])
    cached_onnx.write_bytes(cached_onnx.read_bytes()[:1000])  # truncated
    result_json = Path(first["distill"]["paths"]["model"]).parent / "result.json"
    result_json.write_text('{"metrics": ')  # truncated JSON
    capsys.readouterr()
    assert run(["compress", str(path)]) == 0
    out = capsys.readouterr().out
    second = json.loads((tmp_path / "export" / "tiny" / "summary.json").read_text())["stages"]
    assert not second["distill"]["cached"] and not second["export"]["cached"]
    assert "[distill] warning: damaged cache entry" in out and "[export] warning:" in out and "(model.onnx)" in out
    assert second["distill"]["metrics"]["test_accuracy"] == first["distill"]["metrics"]["test_accuracy"]
    shipped = onnx.load(str(tmp_path / "export" / "tiny" / "model.onnx"))  # a whole, valid model
    onnx.checker.check_model(shipped)
    # an altered file alone (its result.json intact) is caught by its sha256
    Path(second["export"]["paths"]["final"]).write_bytes(b"not onnx")
    assert run(["compress", str(path)]) == 0
    assert "missing or altered files (model.onnx)" in capsys.readouterr().out
    onnx.checker.check_model(onnx.load(str(tmp_path / "export" / "tiny" / "model.onnx")))


# ---------------------------------------------------------------- stage revisions, artifact types


def test_a_stage_revision_is_in_its_key_and_a_bump_changes_it(monkeypatch):
    import toolchain.stages  # noqa: F401  (registers every stage)
    from toolchain.engine.stage import STAGES
    from toolchain.recipe import load_recipe

    quantize = STAGES.get("quantize")
    cfg = sections_of(load_recipe("recipes/mobilenet.yaml"), quantize)
    before = stage_key(quantize, cfg, {"export": "k"}, None)
    assert set(quantize.revision) == {
        "fold_revision",
        "gemm_revision",
        "float_fallback_revision",
        "calibration_revision",
        "latency_revision",
        "search_revision",
    }
    monkeypatch.setattr(type(quantize), "revision", {**quantize.revision, "latency_revision": 99})
    assert stage_key(quantize, cfg, {"export": "k"}, None) != before


def test_a_registered_artifact_type_round_trips_and_an_unknown_one_is_refused():
    from dataclasses import dataclass

    from toolchain.engine.artifacts import ARTIFACT_TYPES, StageResult, register_artifact

    @register_artifact
    @dataclass(frozen=True)
    class ToyArtifact:
        file: str
        sha256: str = ""

        def files(self):
            return {self.file: self.sha256}

    try:
        stored = StageResult({"m": 1.0}, artifacts={"toy": ToyArtifact("toy.json", "ab")}).to_json()
        assert StageResult.from_json(json.loads(json.dumps(stored))).artifacts["toy"] == ToyArtifact("toy.json", "ab")
    finally:
        ARTIFACT_TYPES.pop("ToyArtifact")
    with pytest.raises(ValueError, match="unknown artifact type 'ToyArtifact'; known: BenchArtifact"):
        StageResult.from_json(stored)
