"""`python -m toolchain ...`: a few lines; heavy libraries are imported by the commands that need them."""

import sys


def main() -> int:
    from .cli import run

    return run(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
