"""Team tracking: a real `mlflow server` backed by PostgreSQL (no mocks), and a fast, clear
failure when the server is down.

The server tests need MLFLOW_TEST_SERVER_URI; .ci/run starts the stack with
.ci/postgres_mlflow.sh and sets it (and TOOLCHAIN_REQUIRE_TEAM_TRACKING=1, which turns
a missing server into a failure instead of a skip). Locally: see docs/scale_out.md.
"""

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import pytest

from toolchain.cli import run

SERVER = os.environ.get("MLFLOW_TEST_SERVER_URI")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def server():
    if not SERVER:
        if os.environ.get("TOOLCHAIN_REQUIRE_TEAM_TRACKING") == "1":
            pytest.fail(
                "MLFLOW_TEST_SERVER_URI is not set but TOOLCHAIN_REQUIRE_TEAM_TRACKING=1: .ci/postgres_mlflow.sh did not run"
            )
        pytest.skip(
            'no team MLflow server: start one with `vars=$(.ci/postgres_mlflow.sh start) && eval "$vars"` '
            "(sets MLFLOW_TEST_SERVER_URI; see docs/scale_out.md)"
        )
    return SERVER


def runs_of(client, experiment_id):
    runs = client.search_runs([experiment_id])
    parents = [r for r in runs if r.data.tags.get("toolchain.stage") == "compress"]
    return runs, parents


@pytest.mark.postgres
def test_compress_logs_to_postgres_backed_server(server, tiny_recipe, tmp_path, monkeypatch, one_thread):
    experiment = f"team-{uuid.uuid4().hex[:8]}"
    path = tiny_recipe(tracking={"uri": server, "experiment": experiment})
    assert run(["compress", str(path)]) == 0
    summary = json.loads((tmp_path / "export" / "tiny" / "summary.json").read_text())
    assert summary["mlflow"]["tracking_uri"] == server

    # read everything back through the server with a fresh client
    client = mlflow.MlflowClient(server)
    exp = client.get_experiment_by_name(experiment)
    assert exp.experiment_id == summary["mlflow"]["experiment_id"]
    runs, parents = runs_of(client, exp.experiment_id)
    assert len(parents) == 1 and parents[0].info.run_id == summary["mlflow"]["parent_run_id"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert sorted(children) == ["distill", "teacher"] and len(runs) == 3
    assert all(r.info.status == "FINISHED" for r in runs)
    for stage in ("teacher", "distill"):
        assert children[stage].data.metrics["test_accuracy"] == summary["stages"][stage]["metrics"]["test_accuracy"]
    assert parents[0].data.params["student.model"] == "mobilenet_v3_small"
    history = client.get_metric_history(children["teacher"].info.run_id, "train_loss")
    assert [m.step for m in history] == [0]  # per-epoch metrics: one epoch

    # artifacts went through the server (proxied) into its artifact store
    local = Path(client.download_artifacts(parents[0].info.run_id, "recipe.yaml", str(tmp_path / "dl")))
    assert local.read_text() == (tmp_path / "export" / "tiny" / "recipe.yaml").read_text()
    artifacts_dir = os.environ.get("MLFLOW_TEST_ARTIFACTS_DIR")
    if artifacts_dir:
        assert list(Path(artifacts_dir).rglob(f"{parents[0].info.run_id}/artifacts/recipe.yaml"))

    # ... and the runs are rows in PostgreSQL
    backend = os.environ.get("MLFLOW_TEST_BACKEND_URI")
    if backend:
        import sqlalchemy

        engine = sqlalchemy.create_engine(backend)
        try:
            with engine.connect() as conn:
                assert conn.execute(sqlalchemy.text("select version()")).scalar().startswith("PostgreSQL")
                count = conn.execute(
                    sqlalchemy.text("select count(*) from runs where experiment_id = :e"), {"e": int(exp.experiment_id)}
                ).scalar()
        finally:
            engine.dispose()
        assert count == 3

    # the same server through MLFLOW_TRACKING_URI (no tracking.uri in the recipe); stages are reused
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    path = tiny_recipe(tracking={"experiment": experiment})
    assert run(["compress", str(path)]) == 0
    runs, parents = runs_of(client, exp.experiment_id)
    assert len(parents) == 2 and len(runs) == 6
    assert all(r.info.status == "FINISHED" for r in runs)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("how", ["recipe", "env"])
def test_unreachable_server_fails_fast_with_one_line(tiny_recipe, tmp_path, how):
    """Before any training, in seconds (not MLflow's minutes of HTTP retries), exit 2, one line."""
    uri = f"http://127.0.0.1:{closed_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    if how == "env":
        path = tiny_recipe(tracking={"experiment": "tests"})
        env["MLFLOW_TRACKING_URI"] = uri
    else:
        path = tiny_recipe(tracking={"uri": uri, "experiment": "tests"})
        env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # timeout: MLflow's own retry loop against a dead server would take about 4 minutes
    proc = subprocess.run(
        [sys.executable, "-m", "toolchain", "compress", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: MLflow tracking server {uri} is unreachable")
    assert "tracking.uri" in lines[0] and "MLFLOW_TRACKING_URI" in lines[0]
    assert "epoch" not in proc.stdout
    assert not (tmp_path / "export" / ".cache").exists() or not any((tmp_path / "export" / ".cache").iterdir())
