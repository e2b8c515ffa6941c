"""User-facing errors.

A ToolchainError is a user mistake or an environment problem the user can fix: the
CLI prints its message on one line and exits with code 2. Anything else is a bug and
keeps its traceback.
"""


class ToolchainError(Exception):
    """Base class: message says what went wrong, where, and how to fix it."""

    exit_code = 2


class RecipeError(ToolchainError):
    """The recipe file or an override is invalid."""


class DataError(ToolchainError):
    """A dataset is missing, corrupt or misconfigured."""


class CheckpointError(ToolchainError):
    """A checkpoint cannot be loaded safely or does not fit the model."""


class ExportError(ToolchainError):
    """ONNX export, checking or the parity gate failed."""


class BenchError(ToolchainError):
    """The onnxruntime benchmark cannot run as asked."""


class TrainingError(ToolchainError):
    """Training diverged (non-finite loss) or cannot proceed."""


class TrackingError(ToolchainError):
    """The MLflow tracking store is unreachable or misconfigured."""


class OutputError(ToolchainError):
    """An output location cannot be written."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first line, whitespace collapsed, for one-line error messages
    (library errors often span pages; the first line names the problem)."""
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.splitlines()[0].split())[:limit]


def run_command(body, prog: str = "", interrupted: str = "interrupted") -> int:
    """The one way a command ends: body()'s exit code; a user mistake as one `error:` line on
    stderr and its exit code (2); Ctrl-C as one line and 130. A bug keeps its traceback.
    One write per line: under torchrun every rank reports, and separate newline writes interleave."""
    import sys

    try:
        return body()
    except ToolchainError as exc:
        sys.stderr.write(f"{prog + ': ' if prog else ''}error: {exc}\n")
        sys.stderr.flush()
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(interrupted + "\n")
        sys.stderr.flush()
        return 130
