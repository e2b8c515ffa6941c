"""MLflow tracking: one parent run per `compress`, one child run per stage.

The embedded default store is SQLite (MLflow 3 refuses the old ./mlruns file store),
with artifacts under mlruns/artifacts. SQLite with several writers can raise
"database is locked", so every MLflow call goes through `retry`.
Only rank 0 tracks under torchrun: the other ranks get a NullTracker.
"""

from __future__ import annotations

import base64
import importlib.util
import logging
import os
import random
import re
import signal
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from .errors import TrackingError, first_line

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"
TAG_PREFIX = "toolchain."
# MLflow 3's kind for model-training experiments (unset, its UI may treat them as GenAI ones). 3.17.2's UI
# lands by its own GenAI / Model training toggle instead: docs/mlflow_ui/README.md
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")

# The runs table's columns. MLflow 3.17.2's UI keeps them per browser (localStorage "ExperimentPage"
# state; a fresh browser gets Source, Models, Dataset), with one server-side exception: a saved view,
# the experiment tag mlflow.sharedViewState.<id> (its "Views" menu lists them), which the runs page
# applies when its URL carries ?viewStateShareKey=<id>. The toolchain saves one such view when it
# creates or first uses an experiment, and never rewrites it (the user may have overwritten it from
# the UI); its link is runs_link(). Evidence from the UI bundle: docs/mlflow_ui/README.md.
RUNS_VIEW_ID = "toolchain-headline"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW_ID}"
RUNS_VIEW_NAME = "Headline metrics (toolchain)"
# metrics finish() logs on the parent run (engine/runner.py; bench and int8 ones only when those stages ran;
# the UI skips a selected column no run has)
HEADLINE_COLUMNS = (
    "test_accuracy",
    "vs_teacher.pe_params",
    "latency_p50_ms.cpu.bs1",
    "onnx_file_bytes",
    "vs_student.pe_params",
    "onnx_zip_bytes",
    "int8.test_accuracy",
    "int8.latency_p50_ms.cpu.bs1",
    "int8.file_bytes",
)


def runs_view_value(now_ms: Optional[int] = None) -> str:
    """The saved view as the UI writes one (its "Save view" envelope: name, createdAt, updatedAt, and the
    state as a JSON string): newest runs first, the Dataset column and the headline metric columns."""
    import json

    columns = ["attributes.`Dataset`"] + [f"metrics.`{name}`" for name in HEADLINE_COLUMNS]
    # metric columns about as wide as their names (the UI's default cuts vs_teacher.pe_params to "vs_teacher.pe_")
    widths = {f"metrics.`{name}`": max(100, 7 * len(name) + 24) for name in HEADLINE_COLUMNS}
    widths["attributes.`Dataset`"] = 220
    state = {
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "selectedColumns": columns,
        "columnOrder": columns,
        "columnWidths": widths,
    }
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return json.dumps({"name": RUNS_VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms, "state": json.dumps(state)})


def runs_link(experiment_id: str) -> str:
    """The URL fragment (after the MLflow UI's address) that opens the experiment's runs table in
    the saved view, whatever the browser's GenAI / Model training toggle says."""
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={RUNS_VIEW_ID}&workflowType=machine_learning"


def quiet_library_logs() -> None:
    """MLflow/alembic/NNI log at INFO on every call; the user's terminal is for our progress."""
    for name in ("mlflow", "alembic", "alembic.runtime.migration", "nni", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # urllib3 warns once per HTTP retry ("Retrying (Retry(total=6...)) after connection broken"): a dead
    # tracking server is reported by the toolchain, in one line (Tracker._call)
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def resolve_uri(uri: Optional[str]) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


_DEFERRED = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Ctrl-C / SIGTERM during an MLflow call is handled when the call returns, not inside it.

    An interrupt raised inside SQLAlchemy's transaction left the SQLite store locked by this very
    process: the run's closing calls (mark the runs KILLED) then waited on that lock past a minute
    (a fresh-clone CI run of tests/test_reliability.py). Deferred, the call completes and the
    interrupt unwinds as before. Only the main thread can hold signal handlers; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: List[Tuple[int, Any]] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append((signum, frame))) for s in _DEFERRED}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)  # None: set outside Python
        for signum, frame in caught[:1]:  # one interrupt is enough to unwind
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)  # Python's own SIGINT handler raises KeyboardInterrupt here
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def retry(fn: Callable, *args, attempts: int = 12, **kwargs):
    """Call fn, retrying with jittered exponential backoff while SQLite says it is locked. Every
    MLflow call goes through here, so an interrupt waits for the call (deferred_interrupts)."""
    for attempt in range(attempts):
        try:
            with deferred_interrupts():
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


# ---------------------------------------------------------------- URI checks (before MLflow is touched)

KNOWN_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "file", "databricks")
# SQLAlchemy dialect[+driver] -> (module it imports, pip package). A bare dialect uses SQLAlchemy's default driver.
DB_DRIVERS = {
    "postgresql": ("psycopg2", "psycopg2-binary"),
    "postgresql+psycopg2": ("psycopg2", "psycopg2-binary"),
    "postgresql+psycopg": ("psycopg", "psycopg[binary]"),
    "postgresql+pg8000": ("pg8000", "pg8000"),
    "mysql": ("MySQLdb", "mysqlclient"),
    "mysql+mysqldb": ("MySQLdb", "mysqlclient"),
    "mysql+pymysql": ("pymysql", "pymysql"),
    "mssql": ("pyodbc", "pyodbc"),
    "mssql+pyodbc": ("pyodbc", "pyodbc"),
}
_USERINFO_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/?#:@]*:)([^/?#]*)@")
_QUERY_SECRET = re.compile(r"([?&](?:password|passwd|pwd|token|access_token|secret)=)([^&#]*)", re.IGNORECASE)
# https://TOKEN@host (GitHub, GitLab, Databricks personal access tokens): a user name alone that is long and
# mixes letters and digits is a credential; a short plain name (alice@host) is not and stays readable
_USERINFO_TOKEN = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)((?=[^/?#:@]*[0-9])(?=[^/?#:@]*[A-Za-z])[^/?#:@]{16,})@")


def mask_uri(uri: Optional[str]) -> Optional[str]:
    """`uri` with its password (user:PASSWORD@ or a password=/token= query parameter) replaced by ***:
    the form to print, write to summary.json or log to MLflow."""
    if not uri:
        return uri
    masked = _USERINFO_TOKEN.sub(r"\1***@", _USERINFO_PASSWORD.sub(r"\1***@", uri))
    return _QUERY_SECRET.sub(r"\1***", masked)


def _redact(text: str, uri: str) -> str:
    """Library messages may echo the password, raw or percent-decoded; print none of it."""
    from urllib.parse import unquote

    matches = (_USERINFO_PASSWORD.match(uri), _USERINFO_TOKEN.match(uri))
    secrets = [m.group(2) for m in _QUERY_SECRET.finditer(uri)] + [m.group(2) for m in matches if m]
    for secret in sorted({v for s in secrets for v in (s, unquote(s)) if v}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _scheme(uri: str) -> str:
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", uri)
    # no scheme: MLflow takes it as a local path (file store); one letter is a Windows drive
    return match.group(1).lower() if match and len(match.group(1)) > 1 else "file"


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _sqlalchemy_default_driver(dialect: str):
    """(module, pip package) of the driver SQLAlchemy uses for a bare dialect, None if it cannot tell."""
    try:
        from sqlalchemy.engine import make_url

        driver = make_url(f"{dialect}://").get_dialect().driver
    except Exception:  # noqa: BLE001  (SQLAlchemy missing or a dialect it does not know)
        return None
    return DB_DRIVERS.get(f"{dialect}+{driver}", (driver, driver))


def check_uri(uri: str) -> None:
    """Refuse, in one line, a URI MLflow would spend minutes retrying or misreport: an unknown
    scheme, a database driver that is not installed, a sqlite URI naming a directory."""
    scheme = _scheme(uri)
    if scheme.split("+")[0] not in KNOWN_SCHEMES:
        raise TrackingError(
            f"tracking URI {mask_uri(uri)} has an unknown scheme {scheme!r}; set tracking.uri / "
            f"MLFLOW_TRACKING_URI to one of {', '.join(s + '://' for s in KNOWN_SCHEMES)}"
        )
    module, package = DB_DRIVERS.get(scheme, (None, None))
    if module and not _has_module(module):
        raise TrackingError(
            f"tracking URI {mask_uri(uri)} needs the {module} database driver, which is not "
            f"installed; pip install {package}"
        )
    default = _sqlalchemy_default_driver(scheme) if module and "+" not in scheme else None
    if default and default[0] != module and not _has_module(default[0]):
        # SQLAlchemy 2.1 made psycopg (3) the default for postgresql://: MLflow would fail with "start the server"
        raise TrackingError(
            f"tracking URI {mask_uri(uri)}: SQLAlchemy's default driver for {scheme}:// is {default[0]}, "
            f"which is not installed; pip install {default[1]}, or name the installed one: "
            f"{scheme}+{module}://..."
        )
    sqlite_path = _sqlite_path(uri)
    if sqlite_path is not None and sqlite_path.is_dir():
        raise TrackingError(
            f"tracking URI {mask_uri(uri)} names the directory {sqlite_path}, not a database file; "
            f"use sqlite:///{sqlite_path.as_posix().rstrip('/')}/mlflow.db"
        )


# ---------------------------------------------------------------- tracking servers (http/https)

CONNECT_TIMEOUT_ENV = "TOOLCHAIN_TRACKING_CONNECT_TIMEOUT_S"
# While connecting, MLflow's HTTP client must not retry a dead server (default: 7 retries with
# exponential backoff, about 4 minutes) before we can say so. A value the user set wins.
CONNECT_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# After connecting, for the rest of the run: a server that dies mid-run costs one call at most
# (3 tries x 10 s + 1 + 2 s of backoff), then Tracker._call says so in one line; MLflow's defaults
# (7 retries, backoff factor 2, 120 s timeout) kept a dead-server run waiting for many minutes per call.
RUN_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _split_credentials(uri: str):
    """(uri without user:password@, (user, password) or None). The credentials come from the
    URI, else from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, which MLflow also honours."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
        return uri, ((user, password or "") if user else None)
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), ((unquote(user), unquote(password)) if userinfo else None)


def check_http_server(uri: str) -> None:
    """One plain GET <uri>/health: a refused, unresolvable or silent server fails in seconds.
    Only a failure to connect is an error here; any HTTP answer means something listens,
    except 401/403 to the credentials we sent (a proxy refusing them: every MLflow call would too).

    Credentials in the URI (http://user:password@host) are sent as HTTP Basic auth, as
    MLflow does; MLflow also takes them from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD,
    which keep them out of recipes and process listings."""
    import urllib.error
    import urllib.request

    timeout = float(os.environ.get(CONNECT_TIMEOUT_ENV, "5"))
    try:
        url, credentials = _split_credentials(uri)
        request = urllib.request.Request(url.rstrip("/") + "/health")
        if credentials:
            token = base64.b64encode(":".join(credentials).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError as exc:
        if credentials and exc.code in (401, 403):
            raise TrackingError(
                f"MLflow tracking server {mask_uri(uri)} refused the credentials (HTTP {exc.code}); "
                "check the user and password in tracking.uri / MLFLOW_TRACKING_URI or "
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
            ) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        if isinstance(reason, OSError) and reason.strerror:
            reason = reason.strerror
        raise TrackingError(
            f"MLflow tracking server {mask_uri(uri)} is unreachable ({_redact(str(reason), uri)}); "
            "start it (docs/scale_out.md) or point tracking.uri / MLFLOW_TRACKING_URI at a running one"
        ) from None


def _fail_fast(connect: Callable) -> Callable:
    """Tracker.connect: URI checks first, and against a server a reachability check, then MLflow
    calls without retries."""
    import functools

    @functools.wraps(connect)
    def wrapper(self, *args, **kwargs):
        check_uri(self.uri)
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
            for key, value in RUN_HTTP_ENV.items():
                os.environ.setdefault(key, value)  # a value the user set wins

    return wrapper


class StageRun:
    """Handle on one MLflow run (the parent or a stage's child). Every call names its run id:
    nothing here relies on MLflow's fluent "active run", which is whichever run started last.
    call: how MLflow calls are made (Tracker._call: a dead server is one TrackingError); default retry."""

    def __init__(self, client, run_id: str, call: Optional[Callable] = None, name: str = "run"):
        self._client = client
        self.run_id = run_id
        self.name = name
        self._call = call or (lambda what, fn, *a, **k: retry(fn, *a, **k))

    def log_metrics(self, metrics: Dict[str, Any], step: Optional[int] = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        clean = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        if clean:
            self._call(f"logging {self.name}'s metrics", self._client.log_batch, self.run_id, metrics=clean)

    def log_params(self, params: Dict[str, Any]) -> None:
        from mlflow.entities import Param

        if params:
            self._call(
                f"logging {self.name}'s params",
                self._client.log_batch,
                self.run_id,
                params=[Param(k, str(v)[:500]) for k, v in params.items()],
            )

    def set_tags(self, tags: Dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        # str(): SQLite accepts numbers, an HTTP tracking server's protobuf API does not
        self._call(
            f"tagging {self.name}",
            self._client.log_batch,
            self.run_id,
            tags=[RunTag(k, str(v)) for k, v in tags.items()],
        )

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self._call(f"logging {self.name}'s {artifact_file}", self._client.log_dict, self.run_id, obj, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self._call(
            f"logging {self.name}'s {Path(path).name}", self._client.log_artifact, self.run_id, str(path), artifact_path
        )

    def log_dataset(self, name: str, digest: str, source: str, splits: Dict[str, int]) -> None:
        """The run's data as an MLflow dataset input (the UI's Dataset column): split sizes as its profile."""
        self._call(
            f"logging {self.name}'s dataset",
            self._client.log_inputs,
            self.run_id,
            datasets=[dataset_input(name, digest, source, splits)],
        )


def dataset_input(name: str, digest: str, source: str, splits: Dict[str, int]):
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    profile = json.dumps({"num_rows": sum(splits.values()), **{f"{k}_rows": v for k, v in splits.items()}})
    dataset = Dataset(
        name, digest[:36], "local", json.dumps({"uri": source}), profile=profile
    )  # digest: 36 chars in MLflow's DB
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])


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

    def log_dataset(self, name, digest, source, splits):
        pass


class NullTracker:
    uri = None
    experiment_id = None
    parent_run_id = None

    @property
    def display_uri(self) -> Optional[str]:
        """The URI with any password masked: what may be printed or stored (the real one is `uri`)."""
        return mask_uri(self.uri)

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        """An MLflow call made on the run's behalf (Tracker: a dead server is one TrackingError line)."""
        return retry(fn, *args, **kwargs)

    @contextmanager
    def run(self, run_name: str, params: Dict[str, Any], tags: Dict[str, Any]) -> Iterator[StageRun]:
        yield NullStageRun()

    @contextmanager
    def stage(
        self, name: str, params: Optional[Dict[str, Any]] = None, tags: Optional[Dict[str, Any]] = None
    ) -> Iterator[StageRun]:
        yield NullStageRun()


class Tracker(NullTracker):
    def __init__(self, uri: Optional[str], experiment: str):
        import mlflow

        quiet_library_logs()  # after the import: mlflow configures its loggers at import time
        self.mlflow = mlflow
        self.uri = resolve_uri(uri)
        if mask_uri(self.uri) != self.uri:  # MLflow prints run links built from the URI, password included
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.experiment_name = experiment
        self._common_tags: Dict[str, Any] = {}

    @_fail_fast
    def connect(self) -> None:
        """Set the URI and experiment; fail early (before any training) when the store is unreachable."""
        sqlite_path = _sqlite_path(self.uri)
        if sqlite_path is not None:
            from .fsutil import ensure_dir

            ensure_dir(
                sqlite_path.parent if str(sqlite_path.parent) else Path("."), "tracking.uri (MLflow's SQLite file)"
            )
        self.mlflow.set_tracking_uri(self.uri)
        try:
            with _schema_lock(sqlite_path):
                self.experiment_id = retry(self._get_or_create_experiment, sqlite_path)
        except TrackingError:
            raise
        except Exception as exc:
            raise TrackingError(
                f"MLflow tracking store {self.display_uri} is unreachable ({type(exc).__name__}: "
                f"{_redact(first_line(exc, 200), self.uri)}); start the server or set "
                "tracking.uri / MLFLOW_TRACKING_URI"
            ) from None
        # the process-wide experiment: mlflow.<flavor>.log_model files its LoggedModel there
        self.mlflow.set_experiment(experiment_id=self.experiment_id)
        self.client = self.mlflow.MlflowClient(self.uri)

    def _get_or_create_experiment(self, sqlite_path: Optional[Path]) -> str:
        client = self.mlflow.MlflowClient(self.uri)
        found = client.get_experiment_by_name(self.experiment_name)
        if found is None:
            # Embedded store: artifacts beside the database (mlruns/artifacts), not in MLflow's ./mlartifacts.
            location = (sqlite_path.parent / "artifacts").resolve().as_uri() if sqlite_path else None
            try:
                return client.create_experiment(
                    self.experiment_name,
                    artifact_location=location,
                    tags={EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1], RUNS_VIEW_TAG: runs_view_value()},
                )
            except Exception as exc:  # another process created it between our get and create
                found = client.get_experiment_by_name(self.experiment_name)
                if found is None:
                    raise exc
        if EXPERIMENT_KIND[0] not in found.tags:  # made by an older toolchain; a kind the user chose stays
            client.set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
        if RUNS_VIEW_TAG not in found.tags:  # present: ours, or the user's overwrite of it from the UI; keep it
            _save_runs_view(client, found.experiment_id, self.uri)
        return found.experiment_id

    def register_model(self, name: str, model_uri: str, run_id: str, card: Dict[str, Any]):
        """A new version of registered model `name` from the ONNX MLflow model logged on the parent
        run, described by the model card. Returns the ModelVersion."""
        try:
            retry(self.client.create_registered_model, name)
        except Exception as exc:  # RESOURCE_ALREADY_EXISTS: add a version to it
            if "already exists" not in str(exc).lower():
                self._call(f"registering model {name}", _raise, exc)  # one masked line against a server
        model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/") else None
        return self._call(
            f"registering model {name}",
            self.client.create_model_version,
            name,
            model_uri,
            run_id=run_id,
            description=card_description(card),
            tags=card_tags(card),
            model_id=model_id,
        )

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
    def stage(
        self, name: str, params: Optional[Dict[str, Any]] = None, tags: Optional[Dict[str, Any]] = None
    ) -> Iterator[StageRun]:
        """A child run of the parent opened by `run`."""
        handle = self._start(
            name,
            {**self._common_tags, f"{TAG_PREFIX}stage": name, "mlflow.parentRunId": self.parent_run_id, **(tags or {})},
        )
        with self._ended_on_exit(handle.run_id):
            handle.log_params(params or {})
            yield handle

    def _start(self, run_name: str, tags: Dict[str, Any]) -> StageRun:
        process = {f"{TAG_PREFIX}pid": os.getpid(), f"{TAG_PREFIX}host": socket.gethostname()}
        all_tags = {k: str(v) for k, v in {**tags, **process}.items()}
        run = self._call(
            f"starting the {run_name} run", self.client.create_run, self.experiment_id, run_name=run_name, tags=all_tags
        )
        return StageRun(self.client, run.info.run_id, self._call, run_name)

    @contextmanager
    def _ended_on_exit(self, run_id: str):
        try:
            yield
        except KeyboardInterrupt:
            self._call("closing a run", self.client.set_terminated, run_id, "KILLED")
            raise
        except BaseException:
            self._call("closing a run", self.client.set_terminated, run_id, "FAILED")
            raise
        self._call("closing a run", self.client.set_terminated, run_id, "FINISHED")

    _lost: Optional[TrackingError] = None  # set once the store stopped answering mid-run

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        """An MLflow call of the run. Against a server or database (not the embedded SQLite file), a
        failure is one TrackingError line with the password masked, and the store counts as lost: the
        calls that follow (closing the runs while the error unwinds) are skipped instead of each waiting
        out its own retries. The resume state on disk is untouched, so a rerun continues."""
        if self._lost is not None:
            return None
        try:
            return retry(fn, *args, **kwargs)
        except Exception as exc:  # MlflowException, requests / SQLAlchemy errors
            if _sqlite_path(self.uri) is not None:
                raise  # the embedded store: a failure here is a bug or a full disk, keep its traceback
            self._lost = TrackingError(
                f"MLflow tracking store {self.display_uri} {_failure_kind(exc)} while {what} "
                f"({type(exc).__name__}: {_redact(first_line(exc, 160), self.uri)}); finished stages and the current "
                "stage's last epoch checkpoint are kept, this epoch's metrics were not logged: rerun the same command "
                "when the store answers again to resume (the runs left RUNNING are then marked KILLED)"
            )
            raise self._lost from None


def _raise(exc: BaseException):
    raise exc


_CONNECTION_WORDS = (
    "max retries exceeded",
    "connection refused",
    "connectionerror",
    "failed to establish",
    "timed out",
    "timeout",
    "connection aborted",
    "connection reset",
    "remotedisconnected",
    "could not connect",
    "connection to server",
)


def _failure_kind(exc: BaseException) -> str:
    text = f"{type(exc).__name__} {exc}".lower()
    return "stopped answering" if any(w in text for w in _CONNECTION_WORDS) else "refused a request"


def _save_runs_view(client, experiment_id: str, uri: str) -> None:
    """Best effort: a server that refuses the tag (permissions) costs the link its columns, not the run."""
    try:
        retry(client.set_experiment_tag, experiment_id, RUNS_VIEW_TAG, runs_view_value())
    except Exception as exc:
        logging.getLogger(__name__).warning(
            "MLflow: could not save the runs-table view %s on experiment %s (%s); "
            "the runs link opens without its columns",
            RUNS_VIEW_TAG,
            experiment_id,
            _redact(first_line(exc, 200), uri),
        )


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


CARD_TAGS = (
    "name",
    "model",
    "dataset",
    "test_accuracy",
    "onnx_test_accuracy",
    "params",
    "nonzero_params",
    "macs",
    "recipe_hash",
    "toolchain_version",
)


def card_tags(card: Dict[str, Any]) -> Dict[str, str]:
    """The model card's headline fields, and the shipped files' sha256, as model version tags."""
    tags = {k: str(card[k]) for k in CARD_TAGS if card.get(k) is not None}
    tags.update({f"sha256.{f}": v["sha256"] for f, v in (card.get("files") or {}).items() if v.get("sha256")})
    tags.update({k: str(v) for k, v in flatten(card.get("performance_efficiency") or {}).items()})
    return tags


def card_description(card: Dict[str, Any]) -> str:
    pe = (card.get("performance_efficiency") or {}).get("vs_teacher.pe_params")
    head = (
        f"{card.get('model')} on {card.get('dataset')} (run {card.get('name')}): test accuracy "
        f"{card.get('test_accuracy')}, ONNX {card.get('onnx_test_accuracy')}, PE(params) vs teacher {pe}."
    )
    return head + " The full card is the run's model_card.json artifact."


def open_existing_store(uri: Optional[str]):
    """An MlflowClient on a store that already holds runs (attach): the URI checks of
    Tracker.connect, but nothing is created, so a mistyped sqlite path is an error, not a new empty DB."""
    uri = resolve_uri(uri)
    check_uri(uri)
    sqlite_path = _sqlite_path(uri)
    if sqlite_path is not None and not sqlite_path.is_file():
        raise TrackingError(
            f"tracking store {mask_uri(uri)}: no such database file; pass --tracking-uri of the store "
            "the run was logged to (export/<run>/summary.json: mlflow.tracking_uri)"
        )
    if _is_http(uri):
        check_http_server(uri)
    import mlflow

    quiet_library_logs()
    return mlflow.MlflowClient(uri)


def make_tracker(cfg, is_main: bool = True):
    """cfg is a recipe TrackingConfig."""
    if not cfg.enabled or not is_main:
        return NullTracker()
    tracker = Tracker(cfg.uri, cfg.experiment)
    tracker.connect()
    return tracker
