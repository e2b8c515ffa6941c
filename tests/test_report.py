"""`report EXPERIMENT`: table (markdown + CSV) and plots from MLflow parent runs.

A synthetic experiment (runs written with known numbers) checks that every value comes
from the right run and metric; a tiny real sweep with export + bench checks the whole way.
"""

import csv
import json
import statistics

import mlflow
import pytest
import torch
import yaml
from conftest import FAST_LATENCY

from toolchain.cli import run
from toolchain.report import CSV_COLUMNS, ReportError, make_report, method_comparison, pareto_front

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("acc_vs_params.png", "acc_vs_latency.png", "pe_by_method.png")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000, path


# ---------------------------------------------------------------- a synthetic experiment


def make_run(
    client,
    exp_id,
    name,
    tags=None,
    metrics=None,
    params=None,
    status="FINISHED",
    start=None,
    parent=None,
    stage="compress",
):
    all_tags = {"toolchain.stage": stage, "toolchain.run_name": name, **(tags or {})}
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    r = client.create_run(exp_id, run_name=name if stage == "compress" else stage, tags=all_tags, start_time=start)
    for key, value in (metrics or {}).items():
        client.log_metric(r.info.run_id, key, value)
    for key, value in (params or {}).items():
        client.log_param(r.info.run_id, key, value)
    client.set_terminated(r.info.run_id, status)
    return r.info.run_id


def variant_metrics(acc, nonzero, macs, p50, pe):
    return {
        "final.test_accuracy": acc,
        "final.params": 1000,
        "final.nonzero_params": nonzero,
        "final.macs": macs,
        "latency_p50_ms.cpu.bs1": p50,
        "latency_p50_ms.cpu.bs32": p50 * 20,
        "speedup_vs_student.cpu.bs1": 0.5 / p50,
        "speedup_vs_teacher.cpu.bs1": 2.0 / p50,
        "speedup_vs_student.cpu.bs1_lo": 0.45 / p50,
        "speedup_vs_student.cpu.bs1_hi": 0.55 / p50,
        "int8.speedup.bs1": 1.5,
        "int8.speedup.bs1_lo": 1.4,
        "int8.speedup.bs1_hi": 1.6,
        "final.vs_teacher.retention": acc / 0.9,
        "final.vs_student.retention": acc / 0.8,
        "final.vs_teacher.pe_params": pe,
        "final.vs_teacher.pe_macs": pe / 2,
        "vs_teacher.pe_latency": pe / 3,
        "final.vs_student.pe_params": pe / 4,
        "final.vs_student.pe_macs": pe / 5,
        "vs_student.pe_latency": pe / 6,
    }


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """One store for the module: creating an MLflow SQLite schema takes seconds."""
    tmp_path = tmp_path_factory.mktemp("synthetic")
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    (tmp_path / "mlruns").mkdir()
    client = mlflow.MlflowClient(uri)
    exp_id = client.create_experiment("syn", artifact_location=(tmp_path / "mlruns" / "artifacts").as_uri())
    runs = {  # name -> (student, method, metrics)
        "s-a-weight": ("arch_a", "weight", variant_metrics(0.78, 200, 5000, 0.52, 0.70)),
        "s-a-channel": ("arch_a", "channel", variant_metrics(0.70, 260, 2400, 0.30, 0.60)),
        "s-b-weight": ("arch_b", "weight", variant_metrics(0.75, 150, 3000, 0.41, 0.65)),
        "s-b-channel": ("arch_b", "channel", variant_metrics(0.74, 120, 1500, 0.20, 0.68)),
    }
    ids = {}
    for i, (name, (student, method, metrics)) in enumerate(runs.items()):
        tags = {
            "dataset": "fashion_mnist",
            "teacher": "big",
            "student": student,
            "prune.method": method,
            "prune.sparsity": "0.8" if method == "weight" else "0.5",
        }
        ids[name] = make_run(client, exp_id, name, tags, metrics, {"finetune.loss": "kd"}, start=1000 + i)
        make_run(
            client,
            exp_id,
            name,
            tags,
            {"test_accuracy": 0.9, "params": 5000, "nonzero_params": 5000, "macs": 9000},
            parent=ids[name],
            stage="teacher",
        )
        make_run(
            client,
            exp_id,
            name,
            tags,
            {
                "test_accuracy": 0.8 if student == "arch_a" else 0.79,
                "params": 1000,
                "nonzero_params": 1000,
                "macs": 5000,
            },
            parent=ids[name],
            stage="distill",
        )
    # not reported: an older run of a reported name, a failed run, a killed one
    make_run(
        client,
        exp_id,
        "s-a-weight",
        {"student": "arch_a", "prune.method": "weight"},
        variant_metrics(0.1, 1, 1, 1, -1),
        start=1,
    )
    make_run(
        client,
        exp_id,
        "s-c-weight",
        {"student": "arch_c", "prune.method": "weight"},
        variant_metrics(0.2, 1, 1, 1, -1),
        status="FAILED",
    )
    make_run(
        client,
        exp_id,
        "s-d-weight",
        {"student": "arch_d", "prune.method": "weight"},
        variant_metrics(0.2, 1, 1, 1, -1),
        status="KILLED",
    )
    return uri, client, exp_id, runs, ids


def test_report_values_are_the_runs_values(synthetic, tmp_path):
    uri, client, exp_id, runs, ids = synthetic
    files = make_report("syn", tmp_path / "out", uri)
    rows = read_csv(files["csv"])
    assert [r["run_name"] for r in rows] == list(runs)  # newest per name, FINISHED only, in start order
    assert list(rows[0]) == list(CSV_COLUMNS)
    for row in rows:
        m = client.get_run(row["run_id"]).data.metrics
        assert row["run_id"] == ids[row["run_name"]]
        for column, metric in (
            ("test_accuracy", "final.test_accuracy"),
            ("params", "final.params"),
            ("nonzero_params", "final.nonzero_params"),
            ("macs", "final.macs"),
            ("latency_p50_ms", "latency_p50_ms.cpu.bs1"),
            ("speedup_vs_student", "speedup_vs_student.cpu.bs1"),
            ("vs_teacher.pe_params", "final.vs_teacher.pe_params"),
            ("vs_teacher.pe_macs", "final.vs_teacher.pe_macs"),
            ("vs_teacher.pe_latency", "vs_teacher.pe_latency"),
            ("vs_student.pe_params", "final.vs_student.pe_params"),
            ("vs_student.pe_macs", "final.vs_student.pe_macs"),
            ("vs_student.pe_latency", "vs_student.pe_latency"),
            ("vs_teacher.retention", "final.vs_teacher.retention"),
        ):
            assert float(row[column]) == m[metric], (row["run_name"], column)
        for end in ("lo", "hi"):  # every speedup with its interval
            assert float(row[f"speedup_vs_student_{end}"]) == m[f"speedup_vs_student.cpu.bs1_{end}"]
            assert float(row[f"int8_speedup_{end}"]) == m[f"int8.speedup.bs1_{end}"]
        assert row["latency_batch"] == "1" and row["finetune_loss"] == "kd" and row["dataset"] == "fashion_mnist"
    assert rows[1]["method"] == "channel" and float(rows[1]["sparsity"]) == 0.5

    refs = read_csv(files["references_csv"])
    teacher = [r for r in refs if r["role"] == "teacher"]
    assert len(teacher) == 1 and teacher[0]["runs"] == "4" and float(teacher[0]["latency_p50_ms"]) == pytest.approx(2.0)
    students = {r["model"]: r for r in refs if r["role"] == "KD student"}
    assert set(students) == {"arch_a", "arch_b"} and float(students["arch_a"]["test_accuracy"]) == 0.8
    assert float(students["arch_b"]["latency_p50_ms"]) == pytest.approx(0.5)

    md = files["markdown"].read_text()
    assert (
        "| s-b-channel | fashion_mnist | big | arch_b | channel | 0.5 | kd | - | 0.7400 | 1.00k | 120 | 1.50k | - | - | 1 | 0.200 | 2.50x [2.25, 2.75] | 1.50x [1.40, 1.60] |"
        in md
    )
    assert "s-c-weight" not in md and "s-d-weight" not in md
    assert "| fashion_mnist | arch_a | kd | 0.700 | 0.600 |" in md  # weight vs channel, pe_params
    for name in PLOTS:
        assert_png(tmp_path / "out" / name)
        assert f"]({name})" in md


def test_report_is_logged_to_mlflow(synthetic, tmp_path):
    uri, client, exp_id, *_ = synthetic
    query = "tags.`toolchain.stage` = 'report'"
    before = {r.info.run_id for r in client.search_runs([exp_id], query)}
    make_report("syn", tmp_path / "out", uri)
    reports = [r for r in client.search_runs([exp_id], query) if r.info.run_id not in before]
    assert len(reports) == 1 and reports[0].info.run_name == "report" and reports[0].info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(reports[0].info.run_id, "report")}
    assert {f"report/{n}" for n in ("report.md", "report.csv", "references.csv", *PLOTS)} <= logged
    make_report("syn", tmp_path / "out2", uri, log_to_mlflow=False)  # a report run is never read back as a compress run
    assert len(read_csv(tmp_path / "out2" / "report.csv")) == 4


def test_report_cli_errors_are_one_line(synthetic, tmp_path, capsys):
    uri = synthetic[0]
    assert run(["report", "nope", "--tracking_uri", uri, "--out", str(tmp_path / "o")]) == 2
    assert "experiment 'nope' not found; experiments: " in capsys.readouterr().err
    assert run(["report", "syn", "--tracking_uri", f"sqlite:///{tmp_path}/absent.db"]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    empty = mlflow.MlflowClient(uri).create_experiment("empty")
    assert empty
    with pytest.raises(ReportError, match="no finished compress runs"):
        make_report("empty", tmp_path / "o", uri)


def test_pareto_front():
    points = [
        (1.0, 0.70, "a"),
        (2.0, 0.80, "b"),
        (1.5, 0.65, "c"),
        (3.0, 0.79, "d"),
        (0.5, 0.60, "e"),
        (2.0, 0.75, "f"),
    ]
    assert [p[2] for p in pareto_front(points)] == ["e", "a", "b"]


def test_method_comparison_picks_the_higher_pe():
    rows = [
        {
            "dataset": "d",
            "student": "s",
            "finetune_loss": "kd",
            "method": "weight",
            "vs_teacher.pe_params": 0.7,
            "vs_teacher.pe_macs": 0.0,
            "vs_teacher.pe_latency": None,
        },
        {
            "dataset": "d",
            "student": "s",
            "finetune_loss": "kd",
            "method": "channel",
            "vs_teacher.pe_params": 0.6,
            "vs_teacher.pe_macs": 0.4,
            "vs_teacher.pe_latency": 0.3,
        },
        {"dataset": "d", "student": "t", "finetune_loss": "kd", "method": "weight", "vs_teacher.pe_params": 0.1},
    ]
    (entry,) = method_comparison(rows)  # student t has no channel run: no comparison
    assert (
        entry["pe_params winner"] == "weight"
        and entry["pe_macs winner"] == "channel"
        and entry["pe_latency winner"] == "-"
    )


# ---------------------------------------------------------------- a real tiny sweep


@pytest.mark.slow  # a three-variant sweep with export and bench (default tier: the report of synthetic stores)
def test_report_of_a_tiny_sweep(tiny_recipe, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: two threads per process are several times slower
    try:
        # the report is under test, not the exporter (dynamo: tests/test_export.py); torchscript halves the time
        path = tiny_recipe(
            prune={"method": "weight", "sparsity": 0.5},
            finetune={"epochs": 1, "lr": 0.01, "loss": "kd"},
            export={"exporter": "torchscript", "opset": 17},
            bench={
                "batch_sizes": [1, 4],
                "warmup": 1,
                "iterations": 5,
                "time_budget_s": 0.2,
                "compare_torch": False,
                "latency": FAST_LATENCY,
            },
        )
        recipe = yaml.safe_load(path.read_text())
        recipe["data"].update(subset=96, test_subset=32)
        recipe["teacher"]["model"] = "mobilenet_v3_small"
        recipe["student"]["model"] = "mobilenet_v3_small"
        recipe["matrix"] = {
            "axes": {"prune.method": ["weight", "channel"]},
            "rules": [{"when": {"prune.method": "channel"}, "set": {"prune.sparsity": 0.5}}],
        }
        path.write_text(yaml.safe_dump(recipe))
        assert run(["sweep", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    uri = recipe["tracking"]["uri"]
    assert run(["report", "tests", "--tracking_uri", uri, "--out", str(tmp_path / "report")]) == 0
    rows = {r["run_name"]: r for r in read_csv(tmp_path / "report" / "report.csv")}
    assert set(rows) == {"tiny-weight", "tiny-channel"}
    for name, row in rows.items():
        summary = json.loads((tmp_path / "export" / name / "summary.json").read_text())
        final = summary["stages"]["finetune"]["metrics"]
        bench = summary["stages"]["bench"]["metrics"]
        assert float(row["test_accuracy"]) == final["test_accuracy"] and float(row["macs"]) == final["macs"]
        assert float(row["nonzero_params"]) == final["nonzero_params"]
        assert float(row["vs_teacher.pe_params"]) == pytest.approx(final["vs_teacher.pe_params"])
        assert float(row["vs_student.pe_latency"]) == pytest.approx(bench["vs_student.pe_latency"])
        assert float(row["latency_p50_ms"]) == pytest.approx(bench["latency_p50_ms.cpu.bs1"])
    assert float(rows["tiny-channel"]["macs"]) < float(rows["tiny-weight"]["macs"])
    assert float(rows["tiny-weight"]["nonzero_params"]) < float(rows["tiny-weight"]["params"])
    for name in PLOTS:
        assert_png(tmp_path / "report" / name)


# ---------------------------------------------------------------- repeats over seeds


def test_spread_and_paired_interval_by_hand():
    from toolchain.stats import paired, spread

    s = spread([0.80, 0.82, 0.84, None])
    assert s.n == 3 and s.mean == pytest.approx(0.82) and s.std == pytest.approx(0.02)
    assert spread([0.5]).std is None and spread([None]) is None
    # differences 1, 2, 3 (key 9 unpaired): mean 2, sd 1, t(0.975, df 2) = 4.3027 from a t table
    d = paired({0: 11, 1: 12, 2: 13, 9: 50}, {0: 10, 1: 10, 2: 10})
    half = 4.302652729911275 / 3**0.5
    assert (d.n, d.mean) == (3, 2) and d.low == pytest.approx(2 - half) and d.high == pytest.approx(2 + half)
    assert d.verdict == "not resolved (interval spans 0)"
    assert paired({0: 3.0, 1: 3.1, 2: 2.9}, {0: 1.0, 1: 1.0, 2: 1.0}).verdict == "a higher"
    assert paired({0: 1.0}, {0: 2.0}).verdict == "one pair: no interval"


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """3 seeds x {weight, channel, none} for one student, with known numbers."""
    tmp_path = tmp_path_factory.mktemp("seeded")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    exp_id = client.create_experiment("seeds", artifact_location=(tmp_path / "artifacts").as_uri())
    acc = {"weight": [0.80, 0.81, 0.82], "channel": [0.78, 0.78, 0.81], "none": [0.83, 0.84, 0.82]}
    zipped = {"weight": 2.0e6, "channel": 3.0e6, "none": 8.0e6}
    for seed in range(3):
        for method in ("weight", "channel", "none"):
            name = f"st-seed{seed}-a-{method}"
            metrics = {
                **variant_metrics(acc[method][seed], 100, 100, 0.5, 0.6 + seed / 100),
                "onnx_zip_bytes": zipped[method] + seed,
            }
            if method == "channel" and seed == 0:
                metrics["int8.zip_bytes"] = 1.0e6
            tags = {"dataset": "fashion_mnist", "teacher": "big", "student": "arch_a", "prune.method": method}
            make_run(
                client,
                exp_id,
                name,
                tags,
                metrics,
                {"finetune.loss": "kd", "seed": str(seed)},
                start=seed * 10 + len(method),
            )
    return uri, acc


def test_seed_tables_are_the_runs_statistics(seeded, tmp_path):
    uri, acc = seeded
    files = make_report("seeds", tmp_path / "out", uri, log_to_mlflow=False)
    cells = {r["method"]: r for r in read_csv(files["seeds.csv"])}
    assert set(cells) == {"weight", "channel", "none"} and cells["weight"]["seeds"] == "3"
    assert float(cells["channel"]["test_accuracy.mean"]) == pytest.approx(sum(acc["channel"]) / 3)
    assert float(cells["channel"]["test_accuracy.std"]) == pytest.approx(statistics.stdev(acc["channel"]))
    assert float(cells["weight"]["onnx_zip_bytes.mean"]) == pytest.approx(2.0e6 + 1)
    assert cells["channel"]["int8_shipped"] == "1/3" and cells["weight"]["int8_shipped"] == "0/3"

    pairs = {r["comparison"]: r for r in read_csv(files["paired.csv"])}
    assert set(pairs) == {"weight - channel", "weight - none", "channel - none"}
    wc = pairs["weight - channel"]
    diffs = [w - c for w, c in zip(acc["weight"], acc["channel"])]  # 0.02, 0.03, 0.01
    assert float(wc["test_accuracy.diff"]) == pytest.approx(0.02)
    half = 4.302652729911275 * statistics.stdev(diffs) / 3**0.5
    assert float(wc["test_accuracy.low"]) == pytest.approx(0.02 - half) and float(
        wc["test_accuracy.high"]
    ) == pytest.approx(0.02 + half)
    assert float(wc["onnx_zip_bytes.diff"]) == pytest.approx(-1.0e6)  # identical per-seed offsets cancel: std 0
    assert float(wc["onnx_zip_bytes.low"]) == pytest.approx(-1.0e6)

    text = files["markdown"].read_text()
    assert "## Mean ± standard deviation over seeds" in text and "## Weight vs channel pruning, paired by seed" in text
    assert "0.8100 ± 0.0100" in text  # weight accuracy
    assert "**-1.00 MB** [-1.00, -1.00]" in text  # size difference resolved: bold
    assert "## Weight vs channel pruning (PE vs teacher)" not in text  # the one-run table would show one seed
    assert_png(files["seeds"])
