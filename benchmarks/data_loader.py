"""The image-folder data path vs torchvision's ImageFolder + DataLoader, in one run.

    .venv/bin/python benchmarks/data_loader.py                   # 96 and 224, N = 512 and 4N
    .venv/bin/python benchmarks/data_loader.py --sizes 96 --n 256

Writes a generated ImageFolder of JPEG photos (640x480, 10 classes) to a temp folder, then
for each image size:

- the toolchain's path: decode once into the uint8 cache (timed on its own: a one-time cost
  per dataset and size), then one training epoch of batches (RandomResizedCrop + flip +
  normalise) read from the cache, in the training process (num_workers 0) and with 2
  loader workers;
- the baseline: torchvision ImageFolder + DataLoader(num_workers=2) with the standard
  RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize, decoding every JPEG every epoch;
- training images/s of mobilenet_v2 (SGD, batch 32) fed by each loader;
- peak RSS of one epoch of the toolchain's path at N and 4N images (fresh processes).

Ratios are measured in the same run (the machine is shared and noisy); absolute rates say
little elsewhere.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional  # noqa: F401  (imported before any timing)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH = 64
TRAIN_BATCH = 32


def write_folder(root: Path, n: int, classes: int = 10) -> Path:
    """n training JPEGs (and n/4 test) of smooth colour fields with noise: decoding cost like a photo's."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
    for split, count in (("train", n), ("test", max(classes, n // 4))):
        for i in range(count):
            path = root / split / f"c{i % classes}" / f"{i:06d}.jpg"
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            a, b, c = rng.uniform(0.005, 0.03, 3)
            base = np.stack([np.sin(xx * a), np.cos(yy * b), np.sin((xx + yy) * c)], axis=-1) * 100 + 128
            pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
    return root


def toolchain_data(root: Path, size: int, cache: Path, workers: int, subset=None):
    from toolchain.data.loaders import build_data
    from toolchain.recipe import DataConfig

    cfg = DataConfig(
        name="imagefolder",
        root=str(root),
        image_size=size,
        batch_size=BATCH,
        val_fraction=0.05,
        cache_dir=str(cache),
        num_workers=workers,
        subset=subset,
    )
    return build_data(cfg, seed=0)


def torchvision_loader(root: Path, size: int, batch: int = BATCH):
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    return torch.utils.data.DataLoader(
        datasets.ImageFolder(str(root / "train"), tf),
        batch_size=batch,
        shuffle=True,
        num_workers=2,
        persistent_workers=True,
    )


def loader_rate(batches, epochs: int = 1) -> float:
    seen, start = 0, time.perf_counter()
    for epoch in range(epochs):
        if hasattr(batches, "set_epoch"):
            batches.set_epoch(epoch)
        for x, _ in batches:
            seen += len(x)
    return seen / (time.perf_counter() - start)


def train_rate(batches, seconds: float) -> float:
    """mobilenet_v2 SGD steps fed by `batches` for about `seconds` (after 2 warm-up steps)."""
    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    model = mobilenet_v2(num_classes=10).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    seen, start, steps = 0, None, 0
    while start is None or time.perf_counter() - start < seconds:
        for x, y in batches:
            x, y = x[:TRAIN_BATCH].contiguous(memory_format=torch.channels_last), y[:TRAIN_BATCH]
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if steps == 2:
                start = time.perf_counter()
            elif start is not None:
                seen += len(x)
                if time.perf_counter() - start >= seconds:
                    break
    return seen / (time.perf_counter() - start)


def peak_rss_mb(root: Path, size: int, cache: Path, subset: int) -> float:
    """One epoch of the toolchain's path in a fresh process (cache already built): its peak RSS."""
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child forked from this big
    # benchmark process would report the parent's peak
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r});"
        f"from data_loader import toolchain_data, loader_rate; from pathlib import Path;"
        f"d = toolchain_data(Path({str(root)!r}), {size}, Path({str(cache)!r}), 0, {subset});"
        f"loader_rate(d.train); loader_rate(d.val);"
        f"print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1]) / 1024  # kB -> MB


def run_size(root: Path, size: int, n: int, cache: Path, train_s: float) -> dict:
    row = {"size": size, "images": n}
    start = time.perf_counter()
    data = toolchain_data(root, size, cache, 0, subset=n)
    row["cache_build_s"] = time.perf_counter() - start
    row["cache_decode_img_s"] = n * 1.25 / row["cache_build_s"]  # train + test files, decoded once
    row["toolchain_img_s"] = loader_rate(data.train, epochs=2)
    row["toolchain_2workers_img_s"] = loader_rate(toolchain_data(root, size, cache, 2, subset=n).train, epochs=2)
    baseline = torchvision_loader(root, size)
    row["torchvision_img_s"] = loader_rate(baseline, epochs=2)
    row["train_toolchain_img_s"] = train_rate(data.train, train_s)
    row["train_torchvision_img_s"] = train_rate(baseline, train_s)
    row["loader_vs_torchvision"] = row["toolchain_img_s"] / row["torchvision_img_s"]
    row["loader_vs_training"] = row["toolchain_img_s"] / row["train_toolchain_img_s"]
    toolchain_data(root, size, cache, 0, subset=n // 4)  # its cache, so both RSS runs measure epochs only
    row["rss_n_mb"] = peak_rss_mb(root, size, cache, n // 4)
    row["rss_4n_mb"] = peak_rss_mb(root, size, cache, n)
    row["rss_growth"] = row["rss_4n_mb"] / row["rss_n_mb"] - 1
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[96, 224])
    p.add_argument("--n", type=int, default=2048, help="training images (the RSS check compares n/4 and n)")
    p.add_argument("--train-seconds", type=float, default=20.0)
    p.add_argument(
        "--work", type=Path, default=None, help="folder for the generated images and the cache (default: a temp folder)"
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="toolchain-loader-bench-"))
    root = write_folder(work / "images", args.n)
    print(f"torch threads {torch.get_num_threads()}; images in {root}", flush=True)
    rows = [run_size(root, size, args.n, work / f"cache-{size}", args.train_seconds) for size in args.sizes]
    print(
        "\n| size | cache build (once) | toolchain loader | toolchain, 2 workers | torchvision, 2 workers | vs torchvision "
        "| train img/s (toolchain / torchvision) | loader / training | peak RSS N/4 -> N |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} | {r['cache_build_s']:.1f} s ({r['cache_decode_img_s']:.0f} img/s) | {r['toolchain_img_s']:.0f} img/s "
            f"| {r['toolchain_2workers_img_s']:.0f} img/s | {r['torchvision_img_s']:.0f} img/s | {r['loader_vs_torchvision']:.2f}x "
            f"| {r['train_toolchain_img_s']:.1f} / {r['train_torchvision_img_s']:.1f} | {r['loader_vs_training']:.1f}x "
            f"| {r['rss_n_mb']:.0f} -> {r['rss_4n_mb']:.0f} MB ({r['rss_growth']:+.0%}) |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
