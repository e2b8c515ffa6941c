"""No secret reaches a screen, a file or a hash (issue 34, items 1-3 and the token user name):
the tracking password stays out of recipe_hash, out of what `sweep` and `validate` print and
write, and out of everything a run against a real MLflow server leaves behind."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from toolchain.recipe import load_recipe, recipe_hash, stable_hash
from toolchain.sweep import expand
from toolchain.tracking import _redact, mask_uri

REPO = Path(__file__).resolve().parents[1]
SECRET = "Hunter2-s3cret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on loopback (SQLite backend, proxied artifacts), started and stopped by pid."""

    def __init__(self, root: Path, port: int = 0):
        self.root = root
        self.port = port or free_port()
        self.proc = None

    def start(self, timeout: float = 180) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.root}/mlflow.db",
                "--artifacts-destination",
                str(self.root / "art"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # its own group: uvicorn + job runner
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    pytest.skip("mlflow server did not start")
                time.sleep(0.5)
        self.stop()
        pytest.skip("mlflow server did not answer in time")

    def uri(self, user="alice", password=SECRET) -> str:
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this fixture started, nothing else
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield srv
    srv.stop()


def no_secret_in(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"password in {path}"


def cli(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "toolchain", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


# ---------------------------------------------------------------- item 1: recipe_hash


def test_recipe_hash_does_not_depend_on_the_tracking_password(tiny_recipe):
    """Hashed raw, a dictionary attack over the saved (masked) recipe.yaml would find the password."""
    hashes = {
        recipe_hash(load_recipe(tiny_recipe(tracking={"uri": f"http://alice:{pw}@host:5000"})))
        for pw in (SECRET, "guess")
    }
    assert len(hashes) == 1
    token = {
        recipe_hash(load_recipe(tiny_recipe(tracking={"uri": f"https://{t}@host"})))
        for t in ("ghp_0123456789abcdefABCDEF", "ghp_guessguess1234567890")
    }
    assert len(token) == 1
    # the tracking server still counts: another host is another recipe
    assert recipe_hash(load_recipe(tiny_recipe(tracking={"uri": "http://alice:x@other:5000"}))) not in hashes


def test_recipe_hash_of_a_recipe_without_credentials_is_unchanged(tiny_recipe):
    """No password to mask: the hash is the one published before (stable run identities)."""
    for tracking in ({"uri": "sqlite:///mlruns/mlflow.db", "experiment": "tests"}, {}):
        recipe = load_recipe(tiny_recipe(tracking=tracking))
        assert recipe_hash(recipe) == stable_hash(recipe.model_dump(mode="json"))


def test_a_token_as_user_name_is_masked_and_a_plain_name_is_not():
    assert mask_uri("https://ghp_0123456789abcdefABCDEF@host/mlflow") == "https://***@host/mlflow"
    assert mask_uri("http://alice@host") == "http://alice@host"
    assert _redact("401 for ghp_0123456789abcdefABCDEF", "https://ghp_0123456789abcdefABCDEF@host") == "401 for ***"


# ---------------------------------------------------------------- item 2: sweep and validate


def test_validate_and_a_dry_run_sweep_never_print_the_password(tiny_recipe, tmp_path):
    path = tiny_recipe(matrix={"axes": {"distill.lr": [0.05, 0.01]}})
    override = f"tracking.uri=http://alice:{SECRET}@127.0.0.1:1"
    swept = cli("sweep", str(path), override, "--dry-run")
    assert swept.returncode == 0, swept.stderr
    assert SECRET not in swept.stdout + swept.stderr and "alice:***@127.0.0.1:1" in swept.stdout
    plain = tiny_recipe()
    shown = cli("validate", str(plain), override)
    assert shown.returncode == 0 and SECRET not in shown.stdout + shown.stderr
    assert yaml.safe_load(shown.stdout)["tracking"]["uri"] == "http://alice:***@127.0.0.1:1"


@pytest.mark.slow
def test_a_sweep_against_a_real_server_leaves_no_password_anywhere(server, tiny_recipe, tmp_path):
    """tracking.uri with a password on the command line: a real sweep (one variant) logs to a real
    server; neither the terminal, sweep-<recipe>.json, export/ nor the server's store has the password,
    and the published recipe_hash is the one of the masked recipe."""
    path = tiny_recipe(matrix={"axes": {"distill.lr": [0.05]}})
    done = cli("sweep", str(path), f"tracking.uri={server.uri()}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert SECRET not in done.stdout + done.stderr
    record = json.loads((tmp_path / "export" / "sweep-recipe.json").read_text())
    assert record["variants"][0]["overrides"]["tracking.uri"] == server.uri(password="***")
    no_secret_in(tmp_path / "export")
    no_secret_in(server.root)
    summary = json.loads((tmp_path / "export" / "tiny-lr0.05" / "summary.json").read_text())
    guessed = expand(path, [f"tracking.uri={server.uri(password='another-guess')}"])[0].recipe
    assert summary["recipe_hash"] == recipe_hash(guessed)  # the hash says nothing about the password
    saved = yaml.safe_load((tmp_path / "export" / "tiny-lr0.05" / "recipe.yaml").read_text())
    assert saved["tracking"]["uri"] == server.uri(password="***")


# ---------------------------------------------------------------- item 3: the server dies mid-run


@pytest.mark.slow
def test_a_server_that_dies_while_the_teacher_trains_is_one_line_and_the_rerun_resumes(tmp_path, tiny_recipe):
    srv = MlflowServer(tmp_path / "server").start()
    try:
        path = tiny_recipe(
            teacher={"model": "cifar_resnet20", "train": {"epochs": 4, "lr": 0.05}},
            tracking={"uri": srv.uri(), "experiment": "tests"},
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "toolchain", "compress", str(path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        cache = tmp_path / "export" / ".cache"
        deadline = time.time() + 300
        while time.time() < deadline and not list(cache.glob("teacher-*/train_state.pt")):
            time.sleep(0.05)
        srv.stop()  # mid-teacher: one epoch done, three to go
        out, err = proc.communicate(timeout=600)  # a hang guard, not a performance bound
    finally:
        srv.stop()
    assert proc.returncode == 2, err[-3000:]
    assert err.count("\n") == 1 and err.startswith("error: MLflow tracking store http://alice:***@127.0.0.1:"), err
    # a killed server shows as refused connections or, mid-request, as an error answer: either is the one line
    assert ("stopped answering" in err or "refused a request" in err) and "rerun the same command" in err
    assert "Traceback" not in err
    assert SECRET not in out + err
    assert list(cache.glob("teacher-*/train_state.pt")) and not list(cache.glob("teacher-*/result.json"))
    no_secret_in(tmp_path / "export")
    summary = json.loads((tmp_path / "export" / "tiny" / "summary.json").read_text())
    assert summary["status"] == "FAILED"

    again = MlflowServer(tmp_path / "server", srv.port).start()  # the same store, back
    try:
        resumed = cli("compress", str(path))
    finally:
        again.stop()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch" in resumed.stdout + resumed.stderr
    assert SECRET not in resumed.stdout + resumed.stderr


def test_a_bare_postgresql_uri_names_sqlalchemys_default_driver(monkeypatch):
    """SQLAlchemy 2.1 imports psycopg (3) for postgresql://; with only psycopg2 installed MLflow said
    'start the server'. The check names the driver and the URI that uses the installed one."""
    import toolchain.tracking as tracking
    from toolchain.errors import TrackingError

    monkeypatch.setattr(tracking.uris, "_has_module", lambda name: name == "psycopg2")  # where check_uri looks it up
    with pytest.raises(TrackingError) as err:
        tracking.check_uri(f"postgresql://u:{SECRET}@db/mlflow")
    message = str(err.value)
    assert "default driver for postgresql:// is psycopg" in message and "postgresql+psycopg2://" in message
    assert SECRET not in message and "\n" not in message
    tracking.check_uri(f"postgresql+psycopg2://u:{SECRET}@db/mlflow")  # the installed one: fine
