"""The runs: one parent run per `compress`, one child run per stage (StageRun handles, made by
Tracker by run id), the no-op NullTracker of untracked runs and of the ranks other than 0, and
make_tracker, which picks one from the recipe.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

from ..errors import TrackingError, first_line
from .retries import _fail_fast, retry
from .store import TAG_PREFIX, _process_alive, _schema_lock, quiet_library_logs
from .ui import EXPERIMENT_KIND, RUNS_VIEW_TAG, _save_runs_view, card_description, card_tags, runs_view_value
from .uris import _redact, _sqlite_path, mask_uri, resolve_uri


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
            from ..fsutil import ensure_dir

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


def make_tracker(cfg, is_main: bool = True):
    """cfg is a recipe TrackingConfig."""
    if not cfg.enabled or not is_main:
        return NullTracker()
    tracker = Tracker(cfg.uri, cfg.experiment)
    tracker.connect()
    return tracker
