import mlflow
import pytest

from toolchain.tracking import Tracker, retry


@pytest.fixture
def tracker(tmp_path):
    t = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "exp")
    t.connect()
    return t


def runs(tracker):
    return mlflow.MlflowClient(tracker.uri).search_runs([tracker.experiment_id])


def test_parent_with_stage_children_in_sqlite(tracker, tmp_path):
    with tracker.run("demo", {"distill.epochs": 2}, {"student": "mobilenet_v2"}) as parent:
        with tracker.stage("teacher", {"model": "resnet18"}) as stage:
            stage.log_metrics({"val_accuracy": 0.5}, step=0)
            stage.log_metrics({"val_accuracy": 0.7, "note": "skipped"}, step=1)
        with tracker.stage("distill") as stage:
            stage.log_metrics({"test_accuracy": 0.8})
    found = {r.info.run_name: r for r in runs(tracker)}
    assert set(found) == {"demo", "teacher", "distill"}
    assert found["demo"].data.params["distill.epochs"] == "2"
    for child in ("teacher", "distill"):
        assert found[child].data.tags["mlflow.parentRunId"] == parent.run_id
        assert found[child].data.tags["toolchain.stage"] == child
        assert found[child].data.tags["student"] == "mobilenet_v2"  # comparable in the UI
        assert found[child].info.status == "FINISHED"
    history = mlflow.MlflowClient(tracker.uri).get_metric_history(found["teacher"].info.run_id, "val_accuracy")
    assert [m.value for m in history] == [0.5, 0.7]


def test_exception_marks_failed_and_ctrl_c_killed(tracker):
    with pytest.raises(ValueError):
        with tracker.run("boom", {}, {}):
            with tracker.stage("teacher"):
                raise ValueError("bug")
    with pytest.raises(KeyboardInterrupt):
        with tracker.run("stop", {}, {}):
            raise KeyboardInterrupt
    status = {r.info.run_name: r.info.status for r in runs(tracker)}
    assert status == {"boom": "FAILED", "teacher": "FAILED", "stop": "KILLED"}


def test_runs_left_running_by_a_dead_process_are_marked_killed(tracker):
    client = mlflow.MlflowClient(tracker.uri)
    run = client.create_run(tracker.experiment_id, run_name="demo",
                            tags={"toolchain.run_name": "demo", "toolchain.stage": "compress",
                                  "toolchain.pid": "999999", "toolchain.host": __import__("socket").gethostname()})
    stale = tracker.mark_stale_runs("demo")
    assert stale == [run.info.run_id]
    assert client.get_run(run.info.run_id).info.status == "KILLED"


def test_experiment_is_reused(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    a, b = Tracker(uri, "same"), Tracker(uri, "same")
    a.connect()
    b.connect()
    assert a.experiment_id == b.experiment_id


def test_retry_waits_out_database_locked():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert retry(flaky) == "ok" and len(calls) == 3
    with pytest.raises(RuntimeError, match="other"):
        retry(lambda: (_ for _ in ()).throw(RuntimeError("other")))
