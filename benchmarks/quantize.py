"""Float vs onnxruntime's default INT8 vs the quantize stage's choice, in one run.

    .venv/bin/python benchmarks/quantize.py                    # demo model (needs `make demo` first) + random-weight models
    .venv/bin/python benchmarks/quantize.py --skip-demo --sizes 32
    .venv/bin/python benchmarks/quantize.py --skip-demo --sizes "" --trained efficientnet_b0,mobilenet_v2

For each model: export to ONNX (random weights where no trained model exists: latency does
not depend on the values), build every INT8 candidate of the stage's registry, time all of
them interleaved with the float model (p50, onnxruntime CPU), and measure accuracy where
data exists (the demo's pruned mobilenet_v2 on Fashion-MNIST). "default" is onnxruntime's
documented first choice (QDQ, s8 activations and weights, per-channel); "chosen" is what the
quantize stage would ship: the fastest candidate within 1 point of float validation accuracy
(accuracy-free for random weights) that is faster than float at every batch size.
Speedups are float p50 / candidate p50, the median over fresh-process replicates of paired
blocks with the 95% interval (bench/compare.py, docs/latency.md): ratios, not milliseconds, are
what a shared machine can compare, and only an interval says whether a second measurement agrees.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolchain.onnx.quantize import CANDIDATES, CalibrationReader, Measured, choose, preprocess, quantize  # noqa: E402

DEFAULT = "qdq_s8s8_per_channel"  # onnxruntime's documented first choice


def export_random(name: str, size: int, out: Path) -> Path:
    from toolchain.models.registry import build_model
    from toolchain.onnx.export import export_onnx
    from toolchain.recipe import ExportConfig

    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    export_onnx(model, out, torch.randn(2, 3, size, size), ExportConfig(), {})
    return out


def train_fmnist(name: str, size: int, images: int, epochs: int, out: Path):
    """`name` trained from scratch on Fashion-MNIST upscaled to size x size (a seeded subset of
    `images` training images, `epochs` epochs, plain cross-entropy), exported as the pipeline
    exports; returns (onnx path, calibration batches, val, test). Brief: real, not good, accuracy,
    which is what an INT8 decision within 1 point needs (random weights are all "as accurate")."""
    import dataclasses

    from toolchain.data.loaders import build_data
    from toolchain.models.registry import build_model
    from toolchain.onnx.export import export_onnx
    from toolchain.recipe import DataConfig, ExportConfig, TrainConfig
    from toolchain.train.loop import fit
    from toolchain.train.tasks import ClassificationTask

    torch.manual_seed(0)
    cfg = DataConfig(image_size=size, subset=images, test_subset=1000, batch_size=32, eval_batch_size=64)
    data = build_data(cfg, seed=0)
    model = build_model(name, 10)
    # lr 0.01: the study's setting for these students (at 0.05 efficientnet_b0 reached 0.28, recipes/study/fmnist.yaml)
    train = TrainConfig(epochs=epochs, lr=0.01, schedule="onecycle", channels_last=True)
    result = fit(model, ClassificationTask(), data.train, data.val, train, stage=f"{name}@{size}")
    print(
        f"  [{name}@{size}] trained: val acc {result.best_val_accuracy:.4f} ({result.seconds:.0f} s)", file=sys.stderr
    )
    export_onnx(model.eval(), out, data.example_batch(2), ExportConfig(), {})
    calib = dataclasses.replace(data.train, augment=False, shuffle=False)
    return out, calib, data.val, data.test


def random_batches(size: int, n: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, size, size, generator=g), torch.zeros(n, dtype=torch.int64))]


def measure(
    float_path: Path,
    work: Path,
    calib,
    batch_sizes,
    block_s: float,
    val=None,
    test=None,
    threads: int = 0,
    budget_s: float = 120.0,
) -> List[Dict]:
    """Every candidate built and compared with float (bench/compare.py: paired blocks, fresh-process
    replicates, 95% intervals); accuracy on val (choice) and test (report)."""
    from toolchain.bench.compare import Plan, Settings, compare
    from toolchain.onnx.export import onnx_accuracy
    from toolchain.onnx.sensitivity import search
    from toolchain.recipe import QuantizeConfig

    preprocess(float_path, work / "pre.onnx")
    files = {"float": float_path}
    settings = Settings(intra_op_threads=threads, block_s=block_s)
    section = QuantizeConfig(batch_sizes=list(batch_sizes))
    # no labels (random weights): every file is as accurate as float, so `auto` keeps float only what runs faster
    accuracy_of = (lambda p: onnx_accuracy(p, val)) if val else (lambda p: 0.0)
    for name in dict.fromkeys([DEFAULT, *section.candidates]):  # the stage's default search + ORT's advice
        files[name], candidate = work / f"{name}.onnx", CANDIDATES.get(name)
        reader = CalibrationReader(calib, "input", 512)
        if candidate.search:
            info = search(
                work / "pre.onnx", files[name], candidate, reader, False, accuracy_of, accuracy_of(float_path),
                section, settings, Plan(), work / "auto", progress=lambda line: print(f"  [auto] {line}", file=sys.stderr),
            )  # fmt: skip
            print(f"  [{float_path.stem}] {info['auto']['line']}", file=sys.stderr)
        else:
            quantize(work / "pre.onnx", files[name], candidate, reader)
    names = [n for n in files if n != "float"]
    c = compare(
        files,
        [("float", n) for n in names],
        batch_sizes,
        settings,
        Plan(budget_s=budget_s),
        progress=lambda line: print(f"  [{float_path.stem}] {line}", file=sys.stderr),
    )
    speedup = {n: {b: c.ratio("float", n, b) for b in batch_sizes} for n in names}
    p50 = {n: {r["batch_size"]: r["p50_ms"] for r in c.stats(n)} for n in files}
    val_acc = {n: onnx_accuracy(p, val) if val else None for n, p in files.items()}
    test_acc = {n: onnx_accuracy(p, test) if test else None for n, p in files.items()}
    chosen, _ = choose(
        val_acc["float"] or 0.0,
        [Measured(n, val_acc[n] or 0.0, speedup[n]) for n in names],
        0.01,
        QuantizeConfig().min_speedup,
    )
    one = {b: None for b in batch_sizes}
    rows = [
        {"variant": "float", "name": "float", "p50": p50["float"], "acc": test_acc["float"], "speedup": one},
        {
            "variant": "ORT default",
            "name": DEFAULT,
            "p50": p50[DEFAULT],
            "acc": test_acc[DEFAULT],
            "speedup": speedup[DEFAULT],
        },
        {
            "variant": "chosen",
            "name": chosen.name if chosen else "float (none clears the gate)",
            "p50": p50[chosen.name] if chosen else p50["float"],
            "acc": test_acc[chosen.name] if chosen else test_acc["float"],
            "speedup": speedup[chosen.name] if chosen else one,
        },
    ]
    for name in names:  # every candidate, for the record
        if name != DEFAULT:
            rows.append(
                {
                    "variant": "candidate",
                    "name": name,
                    "p50": p50[name],
                    "acc": test_acc[name],
                    "speedup": speedup[name],
                }
            )
    print(f"  [{float_path.stem}] {len(c.replicates)} replicates, stopped: {c.stopped}", file=sys.stderr)
    return rows


def demo_data():
    """The demo recipe's data: calibration from train (eval preprocessing), val, test."""
    import dataclasses

    from toolchain.data.loaders import build_data
    from toolchain.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "mobilenet.yaml")
    data = build_data(recipe.data, recipe.seed)
    calib = dataclasses.replace(data.train, augment=False, shuffle=False)
    return calib, data.val, data.test


def print_rows(model: str, size: int, rows: List[Dict], batch_sizes) -> None:
    for r in rows:
        acc = "-" if r["acc"] is None else f"{r['acc']:.4f}"
        p50 = " / ".join(f"{r['p50'][b]:.3f}" for b in batch_sizes)
        speed = " / ".join(r["speedup"][b].text() if r["speedup"][b] else "1" for b in batch_sizes)
        print(f"| {model} | {size} | {r['variant']} | {r['name']} | {acc} | {p50} | {speed} |", flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet18,mobilenet_v2,efficientnet_b0")
    p.add_argument("--sizes", default="32,224", help="input sizes for the random-weight models")
    p.add_argument("--skip-demo", action="store_true", help="skip the demo's trained, pruned model")
    p.add_argument("--block", type=float, default=0.05, help="seconds one side runs per block of the comparison")
    p.add_argument(
        "--threads",
        default="0",
        help="onnxruntime intra-op threads, a comma list measured one after the other on the same files "
        "(0: one per physical core)",
    )
    p.add_argument(
        "--large-batch",
        type=int,
        default=8,
        help="the second batch size at inputs larger than 64x64 (8: 224 x 32 takes minutes per candidate here)",
    )
    p.add_argument(
        "--trained",
        default="",
        help="models to train briefly on Fashion-MNIST at --trained-size and measure with real accuracy "
        "(e.g. efficientnet_b0,mobilenet_v2)",
    )
    p.add_argument("--trained-size", type=int, default=224)
    p.add_argument(
        "--trained-images", type=int, default=3000, help="training images (a seeded subset; 10%% validation)"
    )
    p.add_argument("--trained-epochs", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    print("| model | input | variant | candidate | test acc | p50 ms (bs1 / bsN) | speedup vs float |")
    print("|---|---|---|---|---|---|---|")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        demo = ROOT / "export" / "mobilenet-fmnist" / "model.onnx"
        threads = [int(t) for t in args.threads.split(",")]

        def each_thread_count(label: str, path: Path, size: int, batch_sizes, calib, val=None, test=None) -> None:
            for t in threads:
                rows = measure(path, work, calib, batch_sizes, args.block, val=val, test=test, threads=t)
                print_rows(f"{label}, {t or 'default'} thr", size, rows, batch_sizes)

        if not args.skip_demo and demo.is_file():
            calib, val, test = demo_data()
            each_thread_count("demo pruned mobilenet_v2 (trained)", demo, 32, [1, 32], calib, val, test)
        for name in [m for m in args.trained.split(",") if m]:
            size = args.trained_size
            batch_sizes = [1, 32] if size <= 64 else [1, args.large_batch]
            path, calib, val, test = train_fmnist(
                name, size, args.trained_images, args.trained_epochs, work / f"{name}-{size}-trained.onnx"
            )
            each_thread_count(f"{name} (trained on Fashion-MNIST)", path, size, batch_sizes, calib, val, test)
        for size in [int(s) for s in args.sizes.split(",") if s]:
            batch_sizes = [1, 32] if size <= 64 else [1, args.large_batch]
            for name in args.models.split(","):
                path = export_random(name, size, work / f"{name}-{size}.onnx")
                each_thread_count(f"{name} (random weights)", path, size, batch_sizes, random_batches(size, 64))
    print(f"\n{time.perf_counter() - t0:.0f} s; batch sizes: 1/32 at 32x32, 1/{args.large_batch} above 64x64")
    return 0


if __name__ == "__main__":
    sys.exit(main())
