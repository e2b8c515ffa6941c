"""How MLflow calls are made: every one through `retry` (SQLite's "database is locked", an
interrupt deferred until the call returns), and against a tracking server, MLflow's own HTTP
retries off while connecting (`_fail_fast`) and bounded for the rest of the run.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Tuple

from .uris import _is_http, check_http_server, check_uri

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
