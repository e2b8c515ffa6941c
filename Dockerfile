# CPU image that runs the demo; mirrors the Makefile's steps (make demo).
# Not built on the development machines (no Docker engine there).
#   docker build -t toolchain .
#   docker run --rm -v "$PWD/export:/app/export" -v "$PWD/mlruns:/app/mlruns" toolchain
#   docker run --rm toolchain make test
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends make dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies first (cached layer): the same pinned versions as `make venv`.
COPY setup.cfg pyproject.toml constraints.txt README.md Makefile ./
COPY toolchain/__init__.py toolchain/__init__.py
RUN python -m venv .venv \
    && .venv/bin/pip install --no-cache-dir -c constraints.txt uv \
    && .venv/bin/uv pip install --python .venv/bin/python --no-cache --compile-bytecode -c constraints.txt -e ".[dev]" \
    && touch .venv/.installed

COPY . .
# setup.cfg/constraints.txt are older than .installed in the image: make will not reinstall.
RUN touch .venv/.installed
CMD ["make", "demo"]
