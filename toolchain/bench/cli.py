"""`python -m toolchain.bench`: the torch-free device bench's command line (the library is ort.py,
the paired comparison with --reference is compare.py). See ort.py's docstring for the options.

    python -m toolchain.bench --latency-table SPEC.json --json TABLE.json

instead times the single Conv / Gemm layers a spec lists and writes the layer latency table the
prune stage allocates channels from (latency_table.py; no model file, torch-free too).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..errors import BenchError, OutputError, first_line, run_command
from ..fsutil import atomic_write_json, file_sha256
from .compare import Plan, Settings, compare
from .device import fingerprint, format_device
from .latency_table import load_spec, measure_table
from .ort import GRAPH_OPT_LEVELS, PROVIDERS, _check_model_file, _fmt_shape, benchmark, format_environment, format_table

# ---------------------------------------------------------------- CLI


_PROG = "python -m toolchain.bench"


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (exit 2), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def _provider_list(text: str) -> List[str]:
    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PROVIDERS]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"unknown provider {','.join(bad) or text!r}; choose from {', '.join(PROVIDERS)}"
        )
    return names


def _parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog=_PROG,
        description="onnxruntime latency benchmark of an ONNX image classifier (no torch needed); "
        "or, with --latency-table SPEC.json --json TABLE.json, the per-layer latency table for latency-aware pruning.",
    )
    p.add_argument("model", nargs="?", help="path to the .onnx file (absent with --latency-table)")
    p.add_argument(
        "--latency-table",
        default=None,
        metavar="SPEC",
        help="time the Conv/Gemm layers listed in this JSON spec (batch_size, threads, layers; see "
        "toolchain/bench/latency_table.py) instead of a model, and write the table to --json",
    )
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 32], help="comma-separated batch sizes (default 1,32)")
    p.add_argument(
        "--providers",
        type=_provider_list,
        default=["cpu"],
        help=f"comma-separated: {', '.join(PROVIDERS)} (default cpu)",
    )
    p.add_argument("--threads", type=int, default=0, help="intra-op threads; 0 = one per physical core (default)")
    p.add_argument("--inter-op-threads", type=int, default=1, help="inter-op threads (default 1)")
    p.add_argument(
        "--graph-optimization", choices=GRAPH_OPT_LEVELS, default="all", help="graph optimisation level (default all)"
    )
    p.add_argument("--warmup", type=int, default=10, help="untimed runs per input shape (default 10)")
    p.add_argument("--iterations", type=int, default=200, help="max timed runs per batch size (default 200)")
    p.add_argument("--time-budget", type=float, default=3.0, help="max timed seconds per batch size (default 3)")
    p.add_argument(
        "--input-shape",
        type=_int_list,
        default=None,
        help="per-sample input dims, e.g. 3,32,32 (default: from the model)",
    )
    p.add_argument(
        "--json",
        default=None,
        help="also write the full results and the device fingerprint as JSON to this path "
        "(python -m toolchain attach RUN FILE logs it into the run)",
    )
    p.add_argument(
        "--name", default=None, help="device name in the JSON and the MLflow metric names (default: the hostname)"
    )
    p.add_argument("--no-hostname", action="store_true", help="leave the hostname out of the JSON")
    p.add_argument(
        "--reference",
        action="append",
        type=_reference,
        default=[],
        metavar="ROLE=PATH",
        help="also time the run's teacher or student ONNX file (export/RUN/summary.json, stages.export.paths), "
        "so attach can log pe_latency on this device; repeatable",
    )
    p.add_argument(
        "--compare-budget",
        type=float,
        default=60.0,
        help="seconds for the paired, replicated comparison with the references (bench/compare.py; default 60)",
    )
    p.add_argument(
        "--mlflow-run-id",
        default=None,
        help="log the results into this compress run (parent run id or run "
        "name) directly, as attach does; needs mlflow and the tracking server",
    )
    p.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI for --mlflow-run-id (default $MLFLOW_TRACKING_URI)"
    )
    return p


def _reference(text: str):
    role, sep, path = text.partition("=")
    if not sep or role not in ("teacher", "student") or not path:
        raise argparse.ArgumentTypeError(f"expected teacher=PATH or student=PATH, got {text!r}")
    return role, path


def _check_counts(args) -> None:
    for flag, value, low in (
        ("--threads", args.threads, 0),
        ("--inter-op-threads", args.inter_op_threads, 1),
        ("--warmup", args.warmup, 0),
        ("--iterations", args.iterations, 1),
    ):
        if value < low:
            raise BenchError(f"{flag} must be >= {low}, got {value}")
    for flag, value in (("--time-budget", args.time_budget), ("--compare-budget", args.compare_budget)):
        if not value > 0:
            raise BenchError(f"{flag} must be > 0 seconds, got {value}")


def _check_json_path(path: Optional[str]) -> None:
    """Before the benchmark, not after minutes of it."""
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise BenchError(f"--json {path} is a directory; pass a file path, e.g. {target / 'bench.json'}")
    parent = next((p for p in target.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise BenchError(f"--json {path}: {parent} is a file, not a directory; pass a file path in a directory")


def _write_json(path: str, results: Dict[str, Any]) -> None:
    try:
        atomic_write_json(path, results)
    except (OSError, OutputError) as exc:  # OutputError's advice is about the pipeline's output_dir
        reason = (
            exc.strerror if isinstance(exc, OSError) and exc.strerror else "its folder cannot be created or written"
        )
        raise BenchError(f"--json {path}: cannot write the results ({reason}); pass a writable file path") from None


def _attach_target(args, device: Dict[str, Any]):
    """--mlflow-run-id: connect and check the model against the run before the timing, not after it."""
    if not args.mlflow_run_id:
        return None
    from ..attach import find_run, open_store, shipped_file

    client = open_store(args.tracking_uri)
    run = find_run(client, args.mlflow_run_id)
    shipped_file(run, device["model_sha256"], args.model)
    return client, run


def _bench_references(args) -> Dict[str, Any]:
    """The references against the model, paired and replicated (bench/compare.py): each reference's
    rows, and each ratio (reference p50 / model p50) with its 95% interval, per provider."""
    files = {"model": args.model, **{role: path for role, path in args.reference}}
    pairs = [(role, "model") for role, _ in args.reference]
    base = Settings(
        intra_op_threads=args.threads,
        inter_op_threads=args.inter_op_threads,
        graph_optimization=args.graph_optimization,
        block_s=0.25,  # as the bench stage: shorter blocks favoured the smaller model (docs/latency.md)
    )
    out: Dict[str, Any] = {
        role: {"model": path, "sha256": file_sha256(path), "results": []} for role, path in args.reference
    }
    comparisons = {}
    for provider in args.providers:
        c = compare(
            files,
            pairs,
            args.batch_sizes,
            replace(base, provider=provider),
            Plan(budget_s=args.compare_budget),
            input_shape=args.input_shape,
            progress=lambda line: print(f"[compare] {line}", file=sys.stderr),
        )
        comparisons[provider] = c.summary()
        for role in out:
            out[role]["results"] += c.stats(role)
    return out, comparisons


def _run(args) -> tuple:
    _check_counts(args)
    _check_json_path(args.json)
    for path in [args.model, *(p for _, p in args.reference)]:
        _check_model_file(path)
    roles = [role for role, _ in args.reference]
    if len(set(roles)) != len(roles):
        raise BenchError(f"--reference {', '.join(roles)}: give each role once")
    device = fingerprint(args.model, args.name, not args.no_hostname, args.threads, args.inter_op_threads)
    target = _attach_target(args, device)
    results = {
        "device": device,
        **benchmark(  # device first: what a reader of the JSON looks for first
            args.model,
            args.batch_sizes,
            args.providers,
            args.threads,
            args.inter_op_threads,
            args.graph_optimization,
            args.warmup,
            args.iterations,
            args.time_budget,
            args.input_shape,
        ),
    }
    if args.reference:
        results["references"], results["comparisons"] = _bench_references(args)
    if args.json:
        _write_json(args.json, results)
    return results, target


def _print(args, results: Dict[str, Any]) -> None:
    inp = results["input"]
    for provider, c in results.get("comparisons", {}).items():
        for row in c["ratios"]:
            print(
                f"{provider} batch {row['batch_size']}: {row['ratio']:.2f}x [{row['low']:.2f}, {row['high']:.2f}] faster "
                f"than {row['baseline']} (median, 95% interval over {row['replicates']} fresh-process replicates)"
            )
    print(f"{args.model}: input {inp['name']} {_fmt_shape(inp['shape'])} {inp['dtype']}")
    print(format_environment(results))
    print(format_device(results["device"]))
    print(format_table(results))
    for role, ref in results.get("references", {}).items():
        print(f"reference {role} ({ref['model']}):")
        print(format_table(ref["results"]))


def _log_to_run(args, target, results: Dict[str, Any]) -> None:
    from ..attach import attach_data

    try:
        print("\n".join(attach_data(*target, results, args.json or args.model)))
    except Exception as exc:  # the store failed after the timing (checked before it): the numbers must not be lost
        kept = (
            f"; the results are in {args.json}: attach them later with python -m toolchain attach RUN {args.json}"
            if args.json
            else "; rerun with --json FILE to keep the results"
        )
        raise BenchError(f"--mlflow-run-id: logging failed ({first_line(exc, 200)}){kept}") from None


# ---------------------------------------------------------------- --latency-table


def _check_table_args(parser: argparse.ArgumentParser, args) -> None:
    """Usage errors: exactly one of MODEL and --latency-table; the table needs --json and takes its
    batch size and threads from the spec, so model-bench options would be silently ignored: refused."""
    if args.latency_table is None:
        if args.model is None:
            parser.error("the model file is required (or --latency-table SPEC.json --json TABLE.json)")
        return
    if args.model is not None:
        parser.error(f"give either a model ({args.model}) or --latency-table, not both")
    if not args.json:
        parser.error("--latency-table needs --json TABLE.json (where the table is written)")
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help", "latency_table", "json"):
            if getattr(args, action.dest) != action.default:
                parser.error(
                    f"{action.option_strings[0]} does not apply to --latency-table (the spec sets batch_size and threads)"
                )


def _measure_with_counter(spec: Dict[str, Any]) -> Dict[str, Any]:
    """measure_table with a one-line counter on stderr; the line is ended even when the timing
    fails, so the error that follows stays one line of its own."""
    shown = []

    def progress(done: int, total: int) -> None:
        sys.stderr.write(f"\r[latency-table] {done}/{total} layer timings")
        sys.stderr.flush()
        shown.append(done)

    try:
        return measure_table(spec, progress=progress)
    finally:
        if shown:
            sys.stderr.write("\n")


def _latency_table(args) -> int:
    _check_json_path(args.json)
    spec = load_spec(args.latency_table)
    table = _measure_with_counter(spec)
    _write_json(args.json, table)
    device = table["device"]
    print(
        f"latency table: {len(table['entries'])} distinct layers ({len(spec['layers'])} in the spec) timed in "
        f"{table['elapsed_s']:.1f} s at batch {table['batch_size']}, intra-op threads "
        f"{table['threads'] or 'default'}, on {device['cpu_model']} (onnxruntime {device['onnxruntime']}); "
        f"written to {args.json}"
    )
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_table_args(parser, args)
    if args.latency_table is not None:
        return run_command(lambda: _latency_table(args), prog=_PROG)

    def body() -> int:
        results, target = _run(args)
        _print(args, results)
        if target is not None:
            _log_to_run(args, target, results)
        return 0

    return run_command(body, prog=_PROG)


if __name__ == "__main__":
    sys.exit(main())
