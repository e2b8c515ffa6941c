"""Where the tracking store is, checked before MLflow is touched.

The URI (recipe, else $MLFLOW_TRACKING_URI, else the embedded SQLite file), its printable form
(password masked, library messages redacted), and the checks that refuse in one line what MLflow
would spend minutes retrying or misreport: an unknown scheme, a missing database driver, a sqlite
URI naming a directory, a tracking server that does not answer its /health.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import re
from pathlib import Path
from typing import Optional

from ..errors import TrackingError

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"


def resolve_uri(uri: Optional[str]) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


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
