"""MLflow tracking: one parent run per `compress`, one child run per stage.

The embedded default store is SQLite (MLflow 3 refuses the old ./mlruns file store),
with artifacts under mlruns/artifacts. SQLite with several writers can raise
"database is locked", so every MLflow call goes through `retry`.
Only rank 0 tracks under torchrun: the other ranks get a NullTracker.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

from .errors import TrackingError, first_line

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"
TAG_PREFIX = "toolchain."


def quiet_library_logs() -> None:
    """MLflow/alembic/NNI log at INFO on every call; the user's terminal is for our progress."""
    for name in ("mlflow", "alembic", "alembic.runtime.migration", "nni", "urllib3", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def resolve_uri(uri: Optional[str]) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def retry(fn: Callable, *args, attempts: int = 12, **kwargs):
    """Call fn, retrying with jittered exponential backoff while SQLite says it is locked."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # MlflowException / sqlalchemy OperationalError wrap the message
            if "locked" not in str(exc).lower() or attempt == attempts - 1:
                raise
            time.sleep(min(5.0, 0.05 * 2**attempt) * (0.5 + random.random()))


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _sqlite_path(uri: str) -> Optional[Path]:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


# ---------------------------------------------------------------- tracking servers (http/https)

CONNECT_TIMEOUT_ENV = "TOOLCHAIN_TRACKING_CONNECT_TIMEOUT_S"
# While connecting, MLflow's HTTP client must not retry a dead server (default: 7 retries with
# exponential backoff, about 4 minutes) before we can say so. A value the user set wins.
CONNECT_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_http_server(uri: str) -> None:
    """One plain GET <uri>/health: a refused, unresolvable or silent server fails in seconds.
    Only a failure to connect is an error here; any HTTP answer means something listens."""
    import urllib.error
    import urllib.request

    timeout = float(os.environ.get(CONNECT_TIMEOUT_ENV, "5"))
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        if isinstance(reason, OSError) and reason.strerror:
            reason = reason.strerror
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({reason}); start it "
                            "(docs/scale_out.md) or point tracking.uri / MLFLOW_TRACKING_URI at a running one") from None


def _fail_fast_on_http(connect: Callable) -> Callable:
    """Tracker.connect against a server: reachability check first, then MLflow calls without retries."""
    import functools

    @functools.wraps(connect)
    def wrapper(self, *args, **kwargs):
        if not _is_http(self.uri):
            return connect(self, *args, **kwargs)
        check_http_server(self.uri)
        saved = {k: os.environ.get(k) for k in CONNECT_HTTP_ENV}
        os.environ.update({k: v for k, v in CONNECT_HTTP_ENV.items() if saved[k] is None})
        try:
            return connect(self, *args, **kwargs)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)

    return wrapper


class StageRun:
    """Handle on one MLflow run (the parent or a stage's child). Every call names its run id:
    nothing here relies on MLflow's fluent "active run", which is whichever run started last."""

    def __init__(self, client, run_id: str):
        self._client = client
        self.run_id = run_id

    def log_metrics(self, metrics: Dict[str, Any], step: Optional[int] = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        clean = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if clean:
            retry(self._client.log_batch, self.run_id, metrics=clean)

    def log_params(self, params: Dict[str, Any]) -> None:
        from mlflow.entities import Param

        if params:
            retry(self._client.log_batch, self.run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])

    def set_tags(self, tags: Dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        # str(): SQLite accepts numbers, an HTTP tracking server's protobuf API does not
        retry(self._client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        retry(self._client.log_dict, self.run_id, obj, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        retry(self._client.log_artifact, self.run_id, str(path), artifact_path)


class NullStageRun(StageRun):
    def __init__(self):
        self.run_id = None

    def log_metrics(self, metrics, step=None):
        pass

    def log_params(self, params):
        pass

    def set_tags(self, tags):
        pass

    def log_dict(self, obj, artifact_file):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass


class NullTracker:
    uri = None
    experiment_id = None
    parent_run_id = None

    @contextmanager
    def run(self, run_name: str, params: Dict[str, Any], tags: Dict[str, Any]) -> Iterator[StageRun]:
        yield NullStageRun()

    @contextmanager
    def stage(self, name: str, params: Optional[Dict[str, Any]] = None, tags: Optional[Dict[str, Any]] = None) -> Iterator[StageRun]:
        yield NullStageRun()


class Tracker(NullTracker):
    def __init__(self, uri: Optional[str], experiment: str):
        import mlflow

        quiet_library_logs()  # after the import: mlflow configures its loggers at import time
        self.mlflow = mlflow
        self.uri = resolve_uri(uri)
        self.experiment_name = experiment
        self._common_tags: Dict[str, Any] = {}

    @_fail_fast_on_http
    def connect(self) -> None:
        """Set the URI and experiment; fail early (before any training) when the store is unreachable."""
        sqlite_path = _sqlite_path(self.uri)
        if sqlite_path is not None:
            from .fsutil import ensure_dir

            ensure_dir(sqlite_path.parent if str(sqlite_path.parent) else Path("."))
        self.mlflow.set_tracking_uri(self.uri)
        try:
            with _schema_lock(sqlite_path):
                self.experiment_id = retry(self._get_or_create_experiment, sqlite_path)
        except TrackingError:
            raise
        except Exception as exc:
            raise TrackingError(f"MLflow tracking store {self.uri} is unreachable ({type(exc).__name__}: "
                                f"{first_line(exc, 200)}); start the server or set "
                                "tracking.uri / MLFLOW_TRACKING_URI") from None
        # the process-wide experiment: mlflow.<flavor>.log_model files its LoggedModel there
        self.mlflow.set_experiment(experiment_id=self.experiment_id)
        self.client = self.mlflow.MlflowClient(self.uri)

    def _get_or_create_experiment(self, sqlite_path: Optional[Path]) -> str:
        client = self.mlflow.MlflowClient(self.uri)
        found = client.get_experiment_by_name(self.experiment_name)
        if found is not None:
            return found.experiment_id
        # Embedded store: artifacts beside the database (mlruns/artifacts), not in MLflow's ./mlartifacts.
        location = (sqlite_path.parent / "artifacts").resolve().as_uri() if sqlite_path else None
        try:
            return client.create_experiment(self.experiment_name, artifact_location=location)
        except Exception as exc:  # another process created it between our get and create
            found = client.get_experiment_by_name(self.experiment_name)
            if found is None:
                raise exc
            return found.experiment_id

    def mark_stale_runs(self, run_name: str) -> list:
        """Runs of this name left RUNNING by a hard kill (their process is gone) -> KILLED."""
        client = self.mlflow.MlflowClient(self.uri)
        query = f"tags.`{TAG_PREFIX}run_name` = '{run_name}' and attributes.status = 'RUNNING'"
        stale = []
        for run in retry(client.search_runs, [self.experiment_id], query, max_results=200):
            if _process_alive(run.data.tags):
                continue
            retry(client.set_terminated, run.info.run_id, "KILLED")
            retry(client.set_tag, run.info.run_id, f"{TAG_PREFIX}killed_reason", "process gone (hard kill or crash)")
            if run.data.tags.get(f"{TAG_PREFIX}stage") == "compress":
                stale.append(run.info.run_id)
        return stale

    @contextmanager
    def run(self, run_name: str, params: Dict[str, Any], tags: Dict[str, Any]) -> Iterator[StageRun]:
        """The parent run. Ctrl-C marks it KILLED, an exception FAILED."""
        self._common_tags = {**tags, f"{TAG_PREFIX}run_name": run_name}
        handle = self._start(run_name, {**self._common_tags, f"{TAG_PREFIX}stage": "compress"})
        self.parent_run_id = handle.run_id
        with self._ended_on_exit(handle.run_id):
            handle.log_params(params)
            yield handle

    @contextmanager
    def stage(self, name: str, params: Optional[Dict[str, Any]] = None, tags: Optional[Dict[str, Any]] = None) -> Iterator[StageRun]:
        """A child run of the parent opened by `run`."""
        handle = self._start(name, {**self._common_tags, f"{TAG_PREFIX}stage": name,
                                    "mlflow.parentRunId": self.parent_run_id, **(tags or {})})
        with self._ended_on_exit(handle.run_id):
            handle.log_params(params or {})
            yield handle

    def _start(self, run_name: str, tags: Dict[str, Any]) -> StageRun:
        process = {f"{TAG_PREFIX}pid": os.getpid(), f"{TAG_PREFIX}host": socket.gethostname()}
        all_tags = {k: str(v) for k, v in {**tags, **process}.items()}
        run = retry(self.client.create_run, self.experiment_id, run_name=run_name, tags=all_tags)
        return StageRun(self.client, run.info.run_id)

    @contextmanager
    def _ended_on_exit(self, run_id: str):
        try:
            yield
        except KeyboardInterrupt:
            retry(self.client.set_terminated, run_id, "KILLED")
            raise
        except BaseException:
            retry(self.client.set_terminated, run_id, "FAILED")
            raise
        retry(self.client.set_terminated, run_id, "FINISHED")


@contextmanager
def _schema_lock(sqlite_path: Optional[Path]):
    """MLflow creates/migrates the SQLite schema on first connect; two processes doing it at
    once fail ("duplicate column"). Serialise the first connect with a lock file beside the DB."""
    if sqlite_path is None:
        yield
        return
    from .fsutil import file_lock

    with file_lock(f"{sqlite_path}.lock"):
        yield


def _process_alive(tags: Dict[str, str]) -> bool:
    if tags.get(f"{TAG_PREFIX}host") != socket.gethostname():
        return True  # cannot tell for another machine: leave it alone
    try:
        os.kill(int(tags.get(f"{TAG_PREFIX}pid", "0")), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return int(tags.get(f"{TAG_PREFIX}pid", "0")) > 0


def make_tracker(cfg, is_main: bool = True):
    """cfg is a recipe TrackingConfig."""
    if not cfg.enabled or not is_main:
        return NullTracker()
    tracker = Tracker(cfg.uri, cfg.experiment)
    tracker.connect()
    return tracker
