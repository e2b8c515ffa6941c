"""MLflow tracking: one parent run per `compress`, one child run per stage.

The embedded default store is SQLite (MLflow 3 refuses the old ./mlruns file store),
with artifacts under mlruns/artifacts. SQLite with several writers can raise
"database is locked", so every MLflow call goes through `retry`.
Only rank 0 tracks under torchrun: the other ranks get a NullTracker.

The package's face: what the rest of the toolchain imports. The code is in
    uris.py     the store's URI: resolve, mask / redact, checks before MLflow is touched (scheme,
                database driver, sqlite path, a server's /health)
    retries.py  retry (SQLite locks, interrupts deferred), MLflow's HTTP retries around connect
    store.py    tag namespace, library log levels, schema lock, stale-run liveness, open_existing_store
    ui.py       what MLflow's UI shows: experiment kind, the runs table's saved view and link, model card tags
    runs.py     StageRun, NullStageRun, NullTracker, Tracker, make_tracker
A test that patches a helper patches it in the submodule that calls it (a name here is a copy).
"""

from ..errors import TrackingError
from .retries import CONNECT_HTTP_ENV, RUN_HTTP_ENV, deferred_interrupts, retry
from .runs import NullStageRun, NullTracker, StageRun, Tracker, dataset_input, make_tracker
from .store import TAG_PREFIX, open_existing_store, quiet_library_logs
from .ui import (
    CARD_TAGS,
    EXPERIMENT_KIND,
    HEADLINE_COLUMNS,
    RUNS_VIEW_ID,
    RUNS_VIEW_NAME,
    RUNS_VIEW_TAG,
    card_description,
    card_tags,
    flatten,
    runs_link,
    runs_view_value,
)
from .uris import (
    CONNECT_TIMEOUT_ENV,
    DB_DRIVERS,
    DEFAULT_URI,
    KNOWN_SCHEMES,
    check_http_server,
    check_uri,
    mask_uri,
    resolve_uri,
)
from .uris import _redact as _redact  # sweep, tests: a library message with the URI's secrets taken out
from .uris import _sqlite_path as _sqlite_path  # report: is the store the embedded SQLite file

__all__ = [
    "CARD_TAGS",
    "CONNECT_HTTP_ENV",
    "CONNECT_TIMEOUT_ENV",
    "DB_DRIVERS",
    "DEFAULT_URI",
    "EXPERIMENT_KIND",
    "HEADLINE_COLUMNS",
    "KNOWN_SCHEMES",
    "NullStageRun",
    "NullTracker",
    "RUNS_VIEW_ID",
    "RUNS_VIEW_NAME",
    "RUNS_VIEW_TAG",
    "RUN_HTTP_ENV",
    "StageRun",
    "TAG_PREFIX",
    "Tracker",
    "TrackingError",
    "card_description",
    "card_tags",
    "check_http_server",
    "check_uri",
    "dataset_input",
    "deferred_interrupts",
    "flatten",
    "make_tracker",
    "mask_uri",
    "open_existing_store",
    "quiet_library_logs",
    "resolve_uri",
    "retry",
    "runs_link",
    "runs_view_value",
]
