"""Issue 31's benchmark: `prune.allocation` uniform against latency_aware under the same budgets.

    python benchmarks/budget.py demo --cache export/.cache        # accuracy over seeds (prune + KD fine-tune)
    python benchmarks/budget.py zoo                               # 224x224, random weights, latency only

demo: the demo's cached teacher and KD student (recipes/budget.yaml's sections; run `make demo` or
`python -m toolchain compress recipes/budget.yaml` once so the cache holds them) are loaded as
checkpoints; each (budget, allocation, seed) is one `python -m toolchain compress` process running
prune + the demo's KD fine-tune only. Printed per budget and allocation: the measured speedup with its
95% interval (the prune stage's own comparison), test accuracy mean +- sd over seeds, the paired
difference latency_aware - uniform with a 95% t-interval over seeds, and the prune stage's time.

zoo: the prune stage's decision alone (budget.choose / latency_aware.choose) on registry models at
224x224 with random weights (structure and latency do not depend on the values): met or not with the
interval, the cost model's predicted vs measured value (error %), the table's build time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _budgets(text: str):
    """'speedup=3@32,speedup=2@1' -> [('speedup', 3.0, 32), ('speedup', 2.0, 1)]"""
    out = []
    for item in text.split(","):
        kind, rest = item.split("=")
        value, _, batch = rest.partition("@")
        out.append((kind, float(value), int(batch or 1)))
    return out


# ---------------------------------------------------------------- demo: accuracy over seeds


def _cached_model(cache: Path, stage: str) -> Path:
    found = sorted(cache.glob(f"{stage}-*/model.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        sys.exit(f"no {stage} model under {cache}: run python -m toolchain compress recipes/budget.yaml first")
    return found[-1]


def _demo_recipe(
    base: dict, cache: Path, work: Path, kind, value, batch, allocation, seed, pruner=None, min_keep=None
) -> dict:
    r = {k: v for k, v in base.items() if k not in ("bench", "quantize", "package", "export")}
    floor = min_keep if allocation == "latency_aware" else None  # uniform keeps one ratio everywhere: no floor
    tag = (f"-{pruner}" if pruner else "") + (f"-mk{floor:g}" if floor else "")
    r["name"] = f"{kind}{value:g}-b{batch}-{allocation}{tag}-s{seed}"
    r["seed"] = seed
    r["output_dir"] = str(work / "export")
    r["tracking"] = {"uri": f"sqlite:///{work}/mlflow.db", "experiment": "budget-benchmark"}
    r["teacher"] = {"model": base["teacher"]["model"], "checkpoint": str(_cached_model(cache, "teacher"))}
    r["student"] = {**base["student"], "checkpoint": str(_cached_model(cache, "distill"))}
    r["distill"] = {**base["distill"], "epochs": 0}
    r["prune"] = {
        **{k: v for k, v in base["prune"].items() if k not in ("budget", "allocation")},
        "allocation": allocation,
        "budget": {kind: value, "batch_size": batch, "threads": 1},
        **({"pruner": pruner} if pruner else {}),
        **({"min_keep": floor} if floor else {}),
    }
    return r


def _t_interval(diffs):
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return mean, float("nan"), float("nan")
    half = T95.get(len(diffs) - 1, 2.0) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return mean, mean - half, mean + half


def demo(a) -> None:
    base = yaml.safe_load((ROOT / "recipes" / "budget.yaml").read_text())
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for kind, value, batch in _budgets(a.budgets):
        for seed in a.seeds:
            for allocation in a.allocations:
                recipe = _demo_recipe(
                    base, Path(a.cache), work, kind, value, batch, allocation, seed, a.pruner, a.min_keep
                )
                path = work / f"{recipe['name']}.yaml"
                path.write_text(yaml.safe_dump(recipe, sort_keys=False))
                started = time.perf_counter()
                done = subprocess.run(
                    [sys.executable, "-m", "toolchain", "compress", str(path)], capture_output=True, text=True
                )
                if done.returncode:
                    print(f"{recipe['name']}: failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
                    continue
                s = json.loads((work / "export" / recipe["name"] / "summary.json").read_text())
                p, f = s["stages"]["prune"]["metrics"], s["stages"]["finetune"]["metrics"]
                row = {
                    "speedup": p.get("prune.budget.value"),
                    "low": p.get("prune.budget.low"),
                    "high": p.get("prune.budget.high"),
                    "met": p.get("prune.budget.met"),
                    "sparsity": p.get("prune.sparsity_achieved"),
                    "accuracy": f["test_accuracy"],
                    "prune_s": p.get("stage_seconds"),
                    "run_s": time.perf_counter() - started,
                }
                rows[(kind, value, batch, allocation, seed)] = row
                print(f"{recipe['name']}: {json.dumps(row)}", flush=True)
    (work / "results.json").write_text(json.dumps({"|".join(map(str, k)): v for k, v in rows.items()}, indent=1))
    _demo_table(rows, a)


def _demo_table(rows, a) -> None:
    print(
        "\n| budget | allocation | measured speedup [95%] per seed | met | test acc mean +- sd | sparsity | prune s |"
    )
    print("|---|---|---|---|---|---|---|")
    for kind, value, batch in _budgets(a.budgets):
        for allocation in a.allocations:
            got = [rows[k] for k in rows if k[:4] == (kind, value, batch, allocation)]
            if not got:
                continue
            acc = [r["accuracy"] for r in got]
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            speed = "; ".join(f"{r['speedup']:.2f}x [{r['low']:.2f}, {r['high']:.2f}]" for r in got)
            print(
                f"| {kind} {value:g} @ batch {batch} | {allocation} | {speed} | {sum(r['met'] for r in got):.0f}/{len(got)} "
                f"| {statistics.mean(acc):.4f} +- {sd:.4f} | {statistics.mean(r['sparsity'] for r in got):.3f} "
                f"| {statistics.mean(r['prune_s'] for r in got):.0f} |"
            )
        diffs = [
            rows[(kind, value, batch, "latency_aware", s)]["accuracy"]
            - rows[(kind, value, batch, "uniform", s)]["accuracy"]
            for s in a.seeds
            if (kind, value, batch, "latency_aware", s) in rows and (kind, value, batch, "uniform", s) in rows
        ]
        if diffs:
            mean, low, high = _t_interval(diffs)
            print(
                f"| {kind} {value:g} @ batch {batch} | paired latency_aware - uniform | | | {mean:+.4f} [{low:+.4f}, {high:+.4f}] | | |"
            )


# ---------------------------------------------------------------- zoo: latency only, 224x224


def zoo(a) -> None:
    import torch

    from toolchain.models.resolve import architecture
    from toolchain.prune import budget as B
    from toolchain.prune import latency_aware as L
    from toolchain.prune import prune_model
    from toolchain.recipe import validate_dict

    torch.set_num_threads(1)
    print(
        "| model | budget | allocation | measured [95%] | met | predicted | error % | table-only error % "
        "| allocations | table s | table layers | total s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in a.models:
        for kind, value, batch in _budgets(a.budgets):
            for allocation in a.allocations:
                r = validate_dict(
                    {
                        "name": "zoo",
                        "student": {"model": name},
                        "distill": {"loss": "ce"},
                        "prune": {
                            "method": "channel",
                            "pruner": a.pruner,
                            "align": a.align,
                            "allocation": allocation,
                            "budget": {kind: value, "batch_size": batch, "threads": a.threads},
                        },
                    }
                )
                torch.manual_seed(0)
                model = architecture(r.student, a.classes).eval()
                x = torch.randn(2, 3, a.size, a.size)
                meter = B.make_meter(r.prune.budget, x)
                started = time.perf_counter()
                prune = lambda m, c, kept=None, x=x: prune_model(m, c, x, kept=kept)  # noqa: E731
                try:
                    if allocation == "uniform":
                        _, d = B.choose(model, r.prune, meter, prune)
                    else:
                        tables = L.local_tables(Path(a.work) / "latency-tables")
                        _, d = L.choose(model, r.prune, meter, prune, x, tables)
                finally:
                    meter.close()
                cm = d.cost_model
                err = f"{cm['error_pct']:+.1f}" if cm.get("error_pct") is not None else "-"
                first = d.history[0] if d.history and "predicted_table" in d.history[0] else None
                # the table alone (before any refit) on the first allocation, as error_pct is computed
                table_err = (
                    f"{100 * (first['predicted_table'] - first['value']) / first['value']:+.1f}" if first else "-"
                )
                print(
                    f"| {name} | {kind} {value:g} @ batch {batch} | {allocation} | {d.value:.2f} [{d.low:.2f}, {d.high:.2f}] "
                    f"| {'met' if d.met else 'NOT met'} | {d.predicted:.2f} | {err} | {table_err} | {len(d.history)} "
                    f"| {cm.get('table_s', '-')} "
                    f"| {cm.get('table_entries', '-')} | {time.perf_counter() - started:.0f} |",
                    flush=True,
                )


# ---------------------------------------------------------------- allocators: greedy vs knapsack


def allocators(a) -> None:
    """The two optimisers of issue 31 on the same cost model and target: kept importance (higher is
    better) and predicted cost. Greedy: costmodel.allocate. Knapsack (HALP's multiple-choice knapsack,
    prune/allocate.py): each group's options priced alone (neighbours at full width), the separable
    sum's error on the exact model removed by shrinking its budget until the exact prediction fits."""
    import torch

    from toolchain.metrics import count_macs
    from toolchain.models.resolve import architecture
    from toolchain.prune import allocate as K
    from toolchain.prune.costmodel import CostModel, allocate, count_cost, importance, layer_graph
    from toolchain.recipe import validate_dict

    print(
        "| model | MACs budget | greedy importance | knapsack importance | greedy / knapsack | greedy s | knapsack s |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in a.models:
        r = validate_dict(
            {
                "name": "a",
                "student": {"model": name},
                "distill": {"loss": "ce"},
                "prune": {"method": "channel", "align": a.align, "budget": {"macs": 0.5}},
            }
        )
        torch.manual_seed(0)
        model = architecture(r.student, 1000).eval()
        x = torch.randn(2, 3, a.size, a.size)
        graph = layer_graph(model, x, r.prune)
        cost = CostModel(graph, count_cost("macs"))
        full_macs = count_macs(model, (1, 3, a.size, a.size))
        cost.calibrate(full_macs)
        scores = importance(model, graph, "l1")
        for fraction in a.fractions:
            target = fraction * full_macs
            started = time.perf_counter()
            greedy = allocate(cost, scores, target)
            greedy_s = time.perf_counter() - started
            started = time.perf_counter()
            knap = _knapsack(K, cost, scores, target)
            knap_s = time.perf_counter() - started
            value = lambda kept, scores=scores: sum(float(s[:k].sum()) for s, k in zip(scores, kept))  # noqa: E731
            print(
                f"| {name} | {fraction:g} | {value(greedy):.1f} | {value(knap):.1f} | {value(greedy) / value(knap):.4f} "
                f"| {greedy_s:.2f} | {knap_s:.2f} |",
                flush=True,
            )


def _knapsack(K, cost, scores, target):
    full = cost.graph.full()
    tables = []
    for g, group in enumerate(cost.graph.groups):
        options = [K.Option(k, cost.delta(list(full), g, k), float(scores[g][:k].sum())) for k in group.options()]
        tables.append(K.GroupTable(group.name, options))
    budget = target - cost.cost(full)
    for _ in range(20):
        choice = K.allocate(tables, budget)
        if choice is None:
            return None
        kept = [choice.kept[group.name] for group in cost.graph.groups]
        over = cost.cost(kept) - target
        if over <= 0:
            return kept
        budget -= over
    return kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    d = sub.add_parser("demo", help="accuracy over seeds on the demo (prune + KD fine-tune)")
    d.add_argument("--cache", default="export/.cache", help="stage cache holding the demo's teacher and distill")
    d.add_argument("--budgets", default="speedup=3@32,speedup=2@1")
    d.add_argument("--seeds", type=lambda t: [int(s) for s in t.split(",")], default=[0, 1, 2])
    d.add_argument("--allocations", type=lambda t: t.split(","), default=["uniform", "latency_aware"])
    d.add_argument("--work", default="/tmp/budget-benchmark")
    d.add_argument("--pruner", default=None, help="prune.pruner for every run (default: recipes/budget.yaml's, taylor)")
    d.add_argument("--min-keep", type=float, default=None, help="prune.min_keep for the latency_aware runs")
    z = sub.add_parser("zoo", help="224x224 random weights, latency only")
    z.add_argument("--models", type=lambda t: t.split(","), default=["mobilenet_v2", "resnet18", "efficientnet_b0"])
    z.add_argument("--budgets", default="speedup=1.5@1,speedup=2@1")
    z.add_argument("--allocations", type=lambda t: t.split(","), default=["latency_aware"])
    z.add_argument("--size", type=int, default=224)
    z.add_argument("--classes", type=int, default=1000, help="the classifier's outputs (10: the demo's)")
    z.add_argument("--align", type=int, default=16)
    z.add_argument("--threads", type=int, default=1)
    # l1: random weights have no training batches for taylor, latency_aware's default with engine nni
    z.add_argument("--pruner", default="l1", help="prune.pruner (l1, l2, fpgm; taylor needs training data)")
    z.add_argument("--work", default="/tmp/budget-benchmark")
    k = sub.add_parser("allocators", help="greedy vs knapsack on the counted MACs model (no timing)")
    k.add_argument("--models", type=lambda t: t.split(","), default=["mobilenet_v2", "resnet18", "efficientnet_b0"])
    k.add_argument("--fractions", type=lambda t: [float(v) for v in t.split(",")], default=[0.3, 0.5, 0.7])
    k.add_argument("--size", type=int, default=224)
    k.add_argument("--align", type=int, default=16)
    a = p.parse_args()
    {"demo": demo, "zoo": zoo, "allocators": allocators}[a.mode](a)


if __name__ == "__main__":
    main()
