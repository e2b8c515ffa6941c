"""`python -m toolchain report EXPERIMENT`: one table and three plots from MLflow runs.

Reads the finished compress runs (parent runs, tag toolchain.stage=compress) of an
experiment (the newest run per run name), and their teacher / unpruned-student child
runs as references. Writes into --out:
    report.md, report.csv      one row per run: accuracy, params, nonzero params, MACs,
                               ORT latency p50 (smallest batch), PE against the teacher
                               and against the unpruned KD student
    acc_vs_params.png          test accuracy vs nonzero parameters
    acc_vs_latency.png         test accuracy vs ORT p50 latency, Pareto front marked
    pe_by_method.png           PE (params, MACs, latency) by method and architecture
  and when cells repeat over seeds (or a `none` same-budget control ran):
    seeds.csv, paired.csv      mean +/- std per cell; weight - channel and method - control
                               paired by seed, with 95% t intervals (toolchain/stats.py)
    acc_size_by_method.png     accuracy and deflated ONNX size, mean and std over seeds
and logs them to MLflow as the artifacts of a run named `report` in the experiment.
Every number is read from the runs; nothing is recomputed.

The package's face (what `python -m toolchain report` and the tests import) and the command itself,
make_report / log_report; the code is in
    runs.py     reading MLflow: the experiment, its compress runs and their references, as rows
    tables.py   cell formats, Markdown and CSV tables, weight vs channel, seeds and paired differences,
                the per-block table of the `auto` INT8 candidate (read from its quantize run's candidates.json)
    plots.py    the PNG plots (matplotlib is imported only when one is drawn)
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from ..fsutil import atomic_write_text, ensure_dir
from ..tracking import TAG_PREFIX, retry
from .plots import (
    MARKERS,
    pareto_front,
    plot_acc_vs_latency,
    plot_acc_vs_params,
    plot_pe,
    plot_seeds,
)
from .runs import (
    COLUMNS,
    CSV_COLUMNS,
    INTERVAL_COLUMNS,
    PE_KEYS,
    REF_COLUMNS,
    REFS,
    Ratio,
    ReportError,
    child_runs,
    client_for,
    collect,
    find_experiment,
    int8_blocks,
    parent_runs,
    reference_rows,
    run_row,
    smallest_batch,
)
from .tables import (
    CONTROL,
    PAIRED_METRICS,
    SEED_METRICS,
    _repeated,
    fmt,
    fmt_stat,
    int8_block_sections,
    markdown_report,
    markdown_table,
    method_comparison,
    paired_table,
    seed_sections,
    seed_table,
    stat_csv_rows,
    write_csv,
)

__all__ = [
    "COLUMNS",
    "CONTROL",
    "CSV_COLUMNS",
    "INTERVAL_COLUMNS",
    "MARKERS",
    "PAIRED_METRICS",
    "PE_KEYS",
    "REFS",
    "REF_COLUMNS",
    "Ratio",
    "ReportError",
    "SEED_METRICS",
    "child_runs",
    "client_for",
    "collect",
    "find_experiment",
    "fmt",
    "fmt_stat",
    "int8_block_sections",
    "int8_blocks",
    "log_report",
    "make_report",
    "markdown_report",
    "markdown_table",
    "method_comparison",
    "paired_table",
    "parent_runs",
    "pareto_front",
    "plot_acc_vs_latency",
    "plot_acc_vs_params",
    "plot_pe",
    "plot_seeds",
    "reference_rows",
    "run_row",
    "seed_sections",
    "seed_table",
    "smallest_batch",
    "stat_csv_rows",
    "write_csv",
]


def make_report(
    experiment: str, out: str | Path = "docs/report", tracking_uri: Optional[str] = None, log_to_mlflow: bool = True
) -> Dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    exp, rows, refs, uri = collect(experiment, tracking_uri)
    out = ensure_dir(out, "--out")
    files = {
        "acc_vs_params": out / "acc_vs_params.png",
        "acc_vs_latency": out / "acc_vs_latency.png",
        "pe_by_method": out / "pe_by_method.png",
    }
    plot_acc_vs_params(rows, refs, files["acc_vs_params"], experiment)
    plot_acc_vs_latency(rows, refs, files["acc_vs_latency"], experiment)
    plot_pe(rows, files["pe_by_method"], experiment)
    plots = [files[k] for k in ("acc_vs_params", "acc_vs_latency", "pe_by_method")]
    if _repeated(rows):
        files["seeds"] = out / "acc_size_by_method.png"
        plot_seeds(rows, files["seeds"], experiment)
        plots.append(files["seeds"])
        for name, table in (
            ("seeds.csv", seed_table(rows)),
            (
                "paired.csv",
                [
                    e
                    for a, b in (("weight", "channel"), ("weight", CONTROL), ("channel", CONTROL))
                    for e in paired_table(rows, a, b)
                ],
            ),
        ):
            flat, columns = stat_csv_rows(table)
            files[name] = out / name
            write_csv(files[name], flat, columns)
    files["csv"] = out / "report.csv"
    files["references_csv"] = out / "references.csv"
    files["markdown"] = out / "report.md"
    write_csv(files["csv"], rows, CSV_COLUMNS)
    write_csv(files["references_csv"], refs, REF_COLUMNS)
    int8 = int8_blocks(experiment, tracking_uri)  # the auto INT8 candidate's per-block search, where one ran
    atomic_write_text(files["markdown"], markdown_report(experiment, rows, refs, plots, int8))
    if log_to_mlflow:
        files_run = log_report(uri, exp.experiment_id, list(files.values()), len(rows))
        print(f"[report] logged to MLflow run {files_run} (experiment {experiment})")
    print(f"[report] {len(rows)} runs -> {files['markdown']}, {files['csv']} and {len(plots)} plots in {out}")
    return files


def log_report(uri: str, experiment_id: str, files: List[Path], n_runs: int) -> str:
    """A run named `report` (tag toolchain.stage=report) holding the report files as artifacts."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    run = retry(
        client.create_run,
        experiment_id,
        run_name="report",
        tags={f"{TAG_PREFIX}stage": "report", f"{TAG_PREFIX}report_runs": str(n_runs)},
    )
    try:
        for path in files:
            retry(client.log_artifact, run.info.run_id, str(path), "report")
    except BaseException:
        retry(client.set_terminated, run.info.run_id, "FAILED")
        raise
    retry(client.set_terminated, run.info.run_id, "FINISHED")
    return run.info.run_id
