import base64
import json
import os
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlflow
import pytest
import yaml

import toolchain.tracking as tracking
from toolchain.errors import TrackingError
from toolchain.recipe import load_recipe
from toolchain.tracking import NullTracker, Tracker, check_http_server, check_uri, mask_uri, retry


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
    run = client.create_run(
        tracker.experiment_id,
        run_name="demo",
        tags={
            "toolchain.run_name": "demo",
            "toolchain.stage": "compress",
            "toolchain.pid": "999999",
            "toolchain.host": __import__("socket").gethostname(),
        },
    )
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


# ---------------------------------------------------------------- URI checks and credentials

SECRET = "s3cr@t/pw"  # '@' and '/' must be percent-encoded in a URI
QUOTED = "s3cr%40t%2Fpw"
SUPPRESS_URLS = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


@pytest.fixture(autouse=True)
def _url_printing_restored():
    """A Tracker on a credentialed URI sets SUPPRESS_URLS process-wide; keep that inside each test."""
    saved = os.environ.pop(SUPPRESS_URLS, None)
    yield
    os.environ.pop(SUPPRESS_URLS, None)
    if saved is not None:
        os.environ[SUPPRESS_URLS] = saved


def test_mask_uri_hides_passwords_only():
    assert mask_uri(f"http://alice:{QUOTED}@host:5000/mlflow") == "http://alice:***@host:5000/mlflow"
    assert (
        mask_uri("postgresql://u:p@ss@db:5432/mlflow?sslmode=require&password=zz")
        == "postgresql://u:***@db:5432/mlflow?sslmode=require&password=***"
    )
    for plain in ("http://host:5000/a@b", "http://alice@host", "sqlite:///mlruns/mlflow.db", None):
        assert mask_uri(plain) == plain


@pytest.fixture
def auth_server():
    """A stand-in for an MLflow server behind a basic-auth proxy: /health is 200 only for alice:SECRET."""
    expected = "Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == "/health" and self.headers.get("Authorization") == expected
            self.send_response(200 if ok else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_credentials_in_the_uri_reach_the_server_as_basic_auth(auth_server):
    check_http_server(f"http://alice:{QUOTED}@{auth_server}")  # raises unless the server saw alice:SECRET


def test_wrong_credentials_are_one_line_without_the_secret(auth_server):
    with pytest.raises(TrackingError, match="refused the credentials") as err:
        check_http_server(f"http://alice:wrong-{QUOTED}@{auth_server}")
    assert "\n" not in str(err.value) and "s3cr" not in str(err.value) and "alice:***@" in str(err.value)


def test_env_credentials_are_sent_too(auth_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    check_http_server(f"http://{auth_server}")


def test_unreachable_server_message_never_shows_the_password():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TrackingError, match="is unreachable") as err:
        check_http_server(f"http://alice:{QUOTED}@127.0.0.1:{port}")
    assert "s3cr" not in str(err.value) and f"alice:***@127.0.0.1:{port}" in str(err.value)


def test_sqlite_uri_naming_a_directory_suggests_the_db_file(tmp_path):
    (tmp_path / "mlruns").mkdir()
    tracker = Tracker(f"sqlite:///{tmp_path}/mlruns", "exp")
    with pytest.raises(TrackingError) as err:
        tracker.connect()  # before MLflow: its own retry loop would take minutes here
    message = str(err.value)
    assert "\n" not in message and f"use sqlite:///{tmp_path}/mlruns/mlflow.db" in message
    assert not list((tmp_path / "mlruns").iterdir())


def test_unknown_scheme_lists_the_known_ones():
    with pytest.raises(TrackingError, match="unknown scheme 'htp'.*sqlite://.*https://.*postgresql://") as err:
        Tracker("htp://alice:pw@host:5000", "exp").connect()
    assert "alice:***@" in str(err.value) and ":pw@" not in str(err.value)


@pytest.mark.parametrize(
    "uri, package",
    [("postgresql://u:pw@db/mlflow", "psycopg2-binary"), ("postgresql+psycopg://u:pw@db/mlflow", "psycopg[binary]")],
)
def test_missing_database_driver_says_what_to_install(monkeypatch, uri, package):
    monkeypatch.setattr(tracking.uris, "_has_module", lambda name: False)  # where check_uri looks it up
    with pytest.raises(TrackingError, match=re.escape(f"pip install {package}") + "$") as err:
        check_uri(uri)
    assert ":pw@" not in str(err.value)


def test_display_uri_is_masked_and_mlflow_prints_no_run_links_with_it(tmp_path):
    Tracker(f"sqlite:///{tmp_path}/mlflow.db", "exp")
    assert SUPPRESS_URLS not in os.environ  # no password: MLflow's run links stay
    assert Tracker("http://alice:pw@host:5000", "exp").display_uri == "http://alice:***@host:5000"
    assert os.environ[SUPPRESS_URLS] == "true"  # MLflow's "View run at <uri>" would show the password
    assert NullTracker().display_uri is None


def test_run_outputs_carry_the_masked_uri(tiny_recipe, tmp_path, monkeypatch):
    """summary.json, the parent run's params and the recipe copy: none has the password."""
    from toolchain.engine.runner import open_run

    uri = f"http://alice:{QUOTED}@127.0.0.1:1"
    logged = {}

    class Recording(NullTracker):
        def run(self, run_name, params, tags):
            logged.update(params)
            return super().run(run_name, params, tags)

    recording = Recording()
    recording.uri = uri
    monkeypatch.setattr(tracking, "make_tracker", lambda cfg, is_main=True: recording)
    recipe = load_recipe(tiny_recipe(tracking={"uri": uri, "experiment": "tests"}))
    with open_run(recipe) as run:
        assert run.recipe.tracking.uri == uri  # the stages still get the real recipe
    run_dir = tmp_path / "export" / "tiny"
    masked = "http://alice:***@127.0.0.1:1"
    assert json.loads((run_dir / "summary.json").read_text())["mlflow"]["tracking_uri"] == masked
    assert logged["tracking.uri"] == masked
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["tracking"]["uri"] == masked


# ---------------------------------------------------------------- what the MLflow UI shows


def test_a_new_experiment_is_a_model_development_one(tracker):
    experiment = mlflow.MlflowClient(tracker.uri).get_experiment(tracker.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # a model-training experiment


def test_an_existing_experiment_gets_the_kind_unless_it_has_one(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    Tracker(uri, "bootstrap").connect()  # creates the store
    client = mlflow.MlflowClient(uri)
    old = client.create_experiment("old")
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    for name in ("old", "chosen"):
        Tracker(uri, name).connect()
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_the_dataset_is_an_input_of_the_parent_run(tiny_recipe, tmp_path):
    from toolchain.engine.runner import open_run

    recipe = load_recipe(tiny_recipe())
    with open_run(recipe) as run:
        parent_id = run.parent.run_id
    client = mlflow.MlflowClient(recipe.tracking.uri)
    (entry,) = client.get_run(parent_id).inputs.dataset_inputs
    assert entry.dataset.name == "fashion_mnist" and len(entry.dataset.digest) == 16
    # the tiny files: 300 training images (10% carved out for validation) and 100 test images
    assert json.loads(entry.dataset.profile) == {"num_rows": 400, "train_rows": 270, "val_rows": 30, "test_rows": 100}
    assert {t.key: t.value for t in entry.tags} == {"mlflow.data.context": "training"}
    with open_run(load_recipe(tiny_recipe(seed=1))) as run:  # another split of the same files: another digest
        other = client.get_run(run.parent.run_id).inputs.dataset_inputs[0].dataset.digest
    assert other != entry.dataset.digest


def test_register_model_adds_a_version_described_by_the_card(tracker, tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from toolchain.onnx.export import log_onnx_to_mlflow

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["logits"])],
        "flat",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "model.onnx")
    card = {
        "name": "demo",
        "model": "flat",
        "dataset": "toy",
        "test_accuracy": 0.5,
        "onnx_test_accuracy": 0.5,
        "performance_efficiency": {"vs_teacher.pe_params": 0.7},
        "files": {"model.onnx": {"sha256": "ab" * 32}},
    }
    with tracker.run("demo", {}, {}) as parent:
        uri = log_onnx_to_mlflow(tmp_path / "model.onnx", np.zeros((1, 2, 2), np.float32), run_id=parent.run_id)
        first = tracker.register_model("toy-classifier", uri, parent.run_id, card)
        second = tracker.register_model("toy-classifier", uri, parent.run_id, card)
    assert (str(first.version), str(second.version)) == ("1", "2")  # one registered model, a version per run
    version = mlflow.MlflowClient(tracker.uri).get_model_version("toy-classifier", "2")
    assert version.run_id == parent.run_id and "PE(params) vs teacher 0.7" in version.description
    assert version.tags["sha256.model.onnx"] == "ab" * 32 and version.tags["vs_teacher.pe_params"] == "0.7"


def test_register_model_needs_tracking():
    from toolchain.errors import RecipeError
    from toolchain.recipe import validate_dict

    recipe = {
        "name": "r",
        "student": {"model": "cifar_resnet20"},
        "distill": {"loss": "ce"},
        "tracking": {"enabled": False, "register_model": "clf"},
    }
    with pytest.raises(RecipeError, match="register_model needs tracking.enabled: true") as err:
        validate_dict(recipe)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- the runs table's saved view


def _view(client, experiment_id):
    tag = client.get_experiment(experiment_id).tags.get(tracking.RUNS_VIEW_TAG)
    return tag and json.loads(tag)


def test_a_new_experiment_gets_the_headline_view(tracker):
    """The UI's saved-view envelope (what its "Save view" writes under mlflow.sharedViewState.<id>):
    the Dataset column and the headline metrics finish() logs on the parent run, newest first."""
    view = _view(mlflow.MlflowClient(tracker.uri), tracker.experiment_id)
    assert tracking.RUNS_VIEW_TAG == "mlflow.sharedViewState.toolchain-headline"
    assert view["name"] == "Headline metrics (toolchain)"
    assert isinstance(view["createdAt"], int) and view["updatedAt"] == view["createdAt"]
    state = json.loads(view["state"])  # a JSON string inside the envelope, as the UI stores it
    expected = [
        "attributes.`Dataset`",
        "metrics.`test_accuracy`",
        "metrics.`vs_teacher.pe_params`",
        "metrics.`latency_p50_ms.cpu.bs1`",
        "metrics.`onnx_file_bytes`",
        "metrics.`vs_student.pe_params`",
        "metrics.`onnx_zip_bytes`",
        "metrics.`int8.test_accuracy`",
        "metrics.`int8.latency_p50_ms.cpu.bs1`",
        "metrics.`int8.file_bytes`",
    ]
    assert state["selectedColumns"] == expected and state["columnOrder"] == expected
    assert set(state["columnWidths"]) == set(expected)  # the UI's column ids, as its own saved views write them
    assert (state["orderByKey"], state["orderByAsc"]) == ("attributes.start_time", False)


def test_the_view_columns_are_metrics_the_parent_run_gets():
    """Every headline column is one finish() logs on the parent run for a recipe with bench and int8."""
    from toolchain.stages.bench import bench_metrics

    row = {"provider": "cpu", "batch_size": 1, "p50_ms": 1.0, "throughput_img_s": 1.0}
    logged = {
        "test_accuracy",
        "vs_teacher.pe_params",
        "vs_student.pe_params",
        "onnx_file_bytes",
        "onnx_zip_bytes",
        "int8.test_accuracy",
        "int8.file_bytes",
    }
    logged |= set(bench_metrics({"final": [row], "int8": [row]}, None, {}))
    assert set(tracking.HEADLINE_COLUMNS) <= logged


def test_the_view_is_written_once_and_a_changed_one_stays(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = Tracker(uri, "exp")
    first.connect()
    client = mlflow.MlflowClient(uri)
    written = client.get_experiment(first.experiment_id).tags[tracking.RUNS_VIEW_TAG]
    Tracker(uri, "exp").connect()  # the second run: nothing rewritten
    assert client.get_experiment(first.experiment_id).tags[tracking.RUNS_VIEW_TAG] == written
    mine = json.dumps({"name": "mine", "createdAt": 1, "updatedAt": 2, "state": "{}"})  # the user's "Overwrite view"
    client.set_experiment_tag(first.experiment_id, tracking.RUNS_VIEW_TAG, mine)
    Tracker(uri, "exp").connect()
    assert client.get_experiment(first.experiment_id).tags[tracking.RUNS_VIEW_TAG] == mine


def test_an_existing_experiment_gets_the_view_on_first_use(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    Tracker(uri, "bootstrap").connect()  # creates the store
    client = mlflow.MlflowClient(uri)
    old = client.create_experiment("old", tags={"mlflow.experimentKind": "custom_model_development"})
    Tracker(uri, "old").connect()
    assert json.loads(_view(client, old)["state"])["selectedColumns"][0] == "attributes.`Dataset`"


def test_a_refused_view_is_a_warning_not_a_failed_run(tmp_path, monkeypatch, caplog):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    Tracker(uri, "bootstrap").connect()
    client = mlflow.MlflowClient(uri)
    old = client.create_experiment("old")

    def refuse(self, experiment_id, key, value):
        if key == tracking.RUNS_VIEW_TAG:
            raise RuntimeError("PERMISSION_DENIED")
        return original(self, experiment_id, key, value)

    original = mlflow.MlflowClient.set_experiment_tag
    monkeypatch.setattr(mlflow.MlflowClient, "set_experiment_tag", refuse)
    tracker = Tracker(uri, "old")
    tracker.connect()
    assert tracker.experiment_id == old and tracking.RUNS_VIEW_TAG not in client.get_experiment(old).tags
    assert "could not save the runs-table view" in caplog.text


def test_the_printed_link_opens_the_runs_table_in_the_view(tmp_path):
    from toolchain.engine.summary import Summary, final_table

    summary = Summary(
        tmp_path / "summary.json",
        {
            "run_name": "demo",
            "mlflow": {"tracking_uri": "sqlite:///mlruns/mlflow.db", "experiment_id": "7", "parent_run_id": "abc"},
        },
        owner=False,
    )
    line = next(t for t in final_table(summary).splitlines() if t.startswith("MLflow:"))
    assert line.endswith(
        "then open #/experiments/7/runs?viewStateShareKey=toolchain-headline&workflowType=machine_learning)"
    )


def test_an_interrupt_during_an_mlflow_call_waits_for_the_call_to_finish(tmp_path):
    """Ctrl-C inside SQLAlchemy's transaction left the SQLite store locked by the process itself, and
    the run's closing calls then hung (a fresh-clone CI run); now the call completes, then it unwinds."""
    import os
    import signal

    from toolchain.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "interrupts")
    tracker.connect()
    done = []
    # a background job (nohup ... &) starts Python with SIGINT ignored: the behaviour under test is
    # that of a terminal's Ctrl-C, Python's own handler
    outside = signal.signal(signal.SIGINT, signal.default_int_handler)

    def interrupted_write():
        os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the call
        done.append(tracker.client.create_run(tracker.experiment_id).info.run_id)
        return done[-1]

    with pytest.raises(KeyboardInterrupt):
        tracker._call("creating a run", interrupted_write)
    assert len(done) == 1  # the write finished before the interrupt unwound
    assert tracker.client.get_run(done[0]).info.status == "RUNNING"
    tracker._call("closing a run", tracker.client.set_terminated, done[0], "KILLED")  # the store is not locked
    assert tracker.client.get_run(done[0]).info.status == "KILLED"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back
    signal.signal(signal.SIGINT, outside)
