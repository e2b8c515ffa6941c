"""`python -m toolchain ...`: a few lines; heavy libraries are imported by the commands that need them."""

import os
import sys


def main() -> int:
    from .cli import run

    try:
        return run(sys.argv[1:])
    except BrokenPipeError:
        # the reader left early (`... --dry-run | head`): stop quietly, as Unix tools do, and keep
        # Python's exit-time flush from raising again on the closed pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
