"""The store as the toolchain finds it: its tag namespace, MLflow's log level, the lock that
serialises a SQLite schema's creation, whether a RUNNING run's process is still alive, and an
existing store opened for reading (attach, report), never created.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Optional

from ..errors import TrackingError
from .uris import _is_http, _sqlite_path, check_http_server, check_uri, mask_uri, resolve_uri

TAG_PREFIX = "toolchain."


def quiet_library_logs() -> None:
    """MLflow/alembic/NNI log at INFO on every call; the user's terminal is for our progress."""
    for name in ("mlflow", "alembic", "alembic.runtime.migration", "nni", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # urllib3 warns once per HTTP retry ("Retrying (Retry(total=6...)) after connection broken"): a dead
    # tracking server is reported by the toolchain, in one line (Tracker._call)
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@contextmanager
def _schema_lock(sqlite_path: Optional[Path]):
    """MLflow creates/migrates the SQLite schema on first connect; two processes doing it at
    once fail ("duplicate column"). Serialise the first connect with a lock file beside the DB."""
    if sqlite_path is None:
        yield
        return
    from ..fsutil import file_lock

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
