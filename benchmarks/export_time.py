"""What the dynamic batch axis costs at export time: the dynamo exporter with and without it, and the
torchscript exporter, timed in alternating rounds in one process (after one untimed warm-up export each).

    .venv/bin/python benchmarks/export_time.py                                   # mobilenet_v2 at 224
    .venv/bin/python benchmarks/export_time.py --model mobilenet_v3_small --size 32 --classes 10

Each variant goes through toolchain/onnx/export.py's export_onnx, as the export stage calls it
(`export.exporter`, `export.opset`, `export.dynamic_batch`); the parity check is not part of the time.
Prints each variant's median seconds and its ratio to the stage's default (dynamo, dynamic batch).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolchain.onnx.export import export_onnx  # noqa: E402
from toolchain.recipe import ExportConfig  # noqa: E402

VARIANTS = {
    "dynamo, dynamic batch (default)": {"exporter": "dynamo", "opset": 18, "dynamic_batch": True},
    "dynamo, fixed batch": {"exporter": "dynamo", "opset": 18, "dynamic_batch": False},
    "torchscript, dynamic batch": {"exporter": "torchscript", "opset": 17, "dynamic_batch": True},
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v2", help="a torchvision classification model")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    import torch
    import torchvision

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, num_classes=args.classes).eval()
    example = torch.randn(2, 3, args.size, args.size)
    seconds = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:

        def export(name: str) -> float:
            start = time.perf_counter()
            export_onnx(model, Path(tmp) / "model.onnx", example, ExportConfig(**VARIANTS[name]), {})
            return time.perf_counter() - start

        for name in VARIANTS:
            export(name)  # warm-up: the first export of a process also pays imports and registries
        for r in range(args.rounds):
            for name in VARIANTS if r % 2 == 0 else reversed(list(VARIANTS)):
                seconds[name].append(export(name))
    base = statistics.median(seconds[next(iter(VARIANTS))])
    print(
        f"{args.model} at {args.size}x{args.size}, torch {torch.__version__}, {args.threads} thread(s), "
        f"{args.rounds} alternating rounds"
    )
    for name, times in seconds.items():
        median = statistics.median(times)
        print(
            f"  {name:34s} {median:7.2f} s  (min {min(times):.2f}, max {max(times):.2f})  {base / median:5.2f}x the default's speed"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
