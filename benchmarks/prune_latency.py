"""Does channel pruning make the model faster on onnxruntime CPU? Four variants side by side.

    python benchmarks/prune_latency.py                      # resnet18, mobilenet_v2, efficientnet_b0
    python benchmarks/prune_latency.py --models resnet18 --calls-bs1 200 --calls-bs32 20

Variants, all at 50% channel sparsity except the reference (random weights: latency
does not depend on the values; 10 classes, 32x32 input):
  unpruned        the registry model
  ours            toolchain engine: NNI L1 + dependency groups + channels aligned to 8
  nni-naive       NNI L1 per layer, no alignment, no dependency groups (NNI's plain use)
  torch-pruning   Torch-Pruning MagnitudeImportance(p=1), round_to=8 (the peer)

Each variant is exported to ONNX (TorchScript exporter, dynamic batch) and timed with
onnxruntime (all graph optimisations, one intra-op thread unless --threads, no spinning). Noise
on a shared machine is handled by interleaving call by call, in a freshly shuffled
order each round, so load bursts from other processes hit all variants alike; and by
4 trials that create the sessions in rotated order (a session's place in memory moved
batch-1 latency by ~5%). p50 is the median of each variant's calls over all trials. Prints a markdown table (MACs ratio = unpruned MACs / variant MACs;
speedup = unpruned p50 / variant p50) and the target checks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolchain.metrics import count_macs, count_params  # noqa: E402
from toolchain.models.registry import build_model  # noqa: E402
from toolchain.prune import prune_model  # noqa: E402
from toolchain.recipe import PruneConfig  # noqa: E402

VARIANTS = {
    "unpruned": None,
    "ours": dict(method="channel", pruner="l1", engine="nni", align=8, dependency_aware=True),
    "nni-naive": dict(method="channel", pruner="l1", engine="nni", align=1, dependency_aware=False),
    "torch-pruning": dict(method="channel", pruner="l1", engine="torch_pruning", align=8, dependency_aware=True),
}


def build_variant(name: str, variant: str, sparsity: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    if VARIANTS[variant] is None:
        return model
    cfg = PruneConfig(sparsity=sparsity, **VARIANTS[variant])
    return prune_model(model, cfg, torch.randn(2, 3, 32, 32)).model.eval()


def export(model: torch.nn.Module, path: Path) -> None:
    # The TorchScript exporter is deprecated but quick and exact for these CNNs; the
    # toolchain's own export stage uses the dynamo exporter.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.randn(2, 3, 32, 32),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )


def session(path: Path, threads: int, spin: bool) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if not spin:
        # Spinning workers fight other processes for the cores on a shared machine.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_parity(model: torch.nn.Module, sess: ort.InferenceSession) -> float:
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).numpy()
    return float(np.abs(sess.run(None, {"input": x.numpy()})[0] - ref).max())


def interleaved_samples(
    sessions: Dict[str, ort.InferenceSession], batch: int, calls: int, seed: int
) -> Dict[str, List[float]]:
    """Latencies (ms) per variant, timing one call of each variant in turn.

    Call-by-call interleaving means a burst of load from other processes lands on all
    variants alike, instead of on whichever was being timed. The order is shuffled
    every round, so no variant always runs right after the big unpruned model.
    """
    feed = {"input": np.random.default_rng(0).standard_normal((batch, 3, 32, 32), dtype=np.float32)}
    names = list(sessions)
    for name in names:  # warm-up: allocations, kernel selection
        for _ in range(3):
            sessions[name].run(None, feed)
    samples: Dict[str, List[float]] = {n: [] for n in names}
    rng = np.random.default_rng(seed)
    for _ in range(calls):
        for name in rng.permutation(names):
            start = time.perf_counter()
            sessions[name].run(None, feed)
            samples[name].append((time.perf_counter() - start) * 1000)
    return samples


def measure(paths: Dict[str, Path], args) -> Dict[str, Dict[str, float]]:
    """p50 and IQR/p50 per variant and batch size, pooled over len(paths) trials.

    Where a session sits in memory matters at batch 1: the session created second ran
    a fixed ~5% slower than the same graph created fourth. So each trial creates fresh
    sessions in a rotated order (every variant takes every position once).
    """
    names = list(paths)
    pooled = {(n, b): [] for n in names for b in (1, 32)}
    for trial in range(len(names)):
        order = names[trial:] + names[:trial]
        sessions = {n: session(paths[n], args.threads, args.spin) for n in order}
        for batch, calls in ((1, args.calls_bs1), (32, args.calls_bs32)):
            for n, times in interleaved_samples(sessions, batch, calls // len(names), seed=trial).items():
                pooled[(n, batch)] += times
        del sessions
    out: Dict[str, Dict[str, float]] = {n: {} for n in names}
    for (n, batch), times in pooled.items():
        q1, q2, q3 = statistics.quantiles(times, n=4)
        out[n][f"bs{batch}"], out[n][f"iqr_bs{batch}"] = q2, (q3 - q1) / q2
    return out


def bench_model(name: str, args, workdir: Path) -> List[dict]:
    rows, paths = [], {}
    for variant in VARIANTS:
        model = build_variant(name, variant, args.sparsity)
        paths[variant] = workdir / f"{name}-{variant}.onnx"
        export(model, paths[variant])
        parity = check_parity(model, session(paths[variant], args.threads, args.spin))
        assert parity < 1e-3, f"{name} {variant}: ONNX parity {parity}"
        rows.append(
            {
                "model": name,
                "variant": variant,
                "macs": count_macs(model, (1, 3, 32, 32)),
                "params": count_params(model),
            }
        )
    stats = measure(paths, args)
    for row in rows:
        row.update(stats[row["variant"]])
    return rows


def add_ratios(rows: List[dict]) -> None:
    ref = rows[0]
    for row in rows:
        row["macs_ratio"] = ref["macs"] / row["macs"]
        for b in ("bs1", "bs32"):
            row[f"speedup_{b}"] = ref[b] / row[b]
            row[f"eff_{b}"] = row[f"speedup_{b}"] / row["macs_ratio"]


def table(rows: List[dict]) -> str:
    head = (
        "| model | variant | MMACs | params | MACs ratio | bs1 p50 ms | bs1 speedup | bs32 p50 ms | bs32 speedup "
        "| speedup/MACs-ratio bs1 | speedup/MACs-ratio bs32 |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['macs'] / 1e6:.1f} | {r['params'] / 1e6:.2f}M | {r['macs_ratio']:.2f}x "
            f"| {r['bs1']:.3f} | {r['speedup_bs1']:.2f}x | {r['bs32']:.2f} | {r['speedup_bs32']:.2f}x "
            f"| {r['eff_bs1']:.2f} | {r['eff_bs32']:.2f} |"
        )
    return "\n".join(lines)


def _median_iqr(rows: List[dict]) -> float:
    return statistics.median([r[k] for r in rows for k in ("iqr_bs1", "iqr_bs32")])


def checks(rows: List[dict], noise: float) -> List[str]:
    """Targets: ours >= torch-pruning (within `noise`), and >= 1.8x at batch 32 for resnet18 / mobilenet_v2."""
    out = []
    by = {(r["model"], r["variant"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        ours, peer = by[(model, "ours")], by[(model, "torch-pruning")]
        for b in ("bs1", "bs32"):
            ok = ours[f"speedup_{b}"] >= peer[f"speedup_{b}"] * (1 - noise)
            out.append(
                f"{'PASS' if ok else 'MISS'} {model} {b}: ours {ours[f'speedup_{b}']:.2f}x vs torch-pruning {peer[f'speedup_{b}']:.2f}x"
            )
        if model in ("resnet18", "mobilenet_v2"):
            ok = ours["speedup_bs32"] >= 1.8
            out.append(f"{'PASS' if ok else 'MISS'} {model} bs32 speedup {ours['speedup_bs32']:.2f}x >= 1.8x")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "efficientnet_b0"])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--calls-bs1", type=int, default=600, help="timed calls per variant at batch 1 (interleaved)")
    p.add_argument("--calls-bs32", type=int, default=80, help="timed calls per variant at batch 32 (interleaved)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="onnxruntime intra-op threads. 1 by default: on a shared machine a multi-threaded pool "
        "waits on co-tenants and the ratios become noise (see docs/pruning.md)",
    )
    p.add_argument(
        "--spin",
        action="store_true",
        help="let onnxruntime's intra-op workers spin (its default; noisy on shared cores)",
    )
    p.add_argument("--noise", type=float, default=0.05, help="tolerance when comparing to torch-pruning")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # pruning/export only; keeps torch off the cores ORT is timed on
    started = time.time()
    rows: List[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model_rows = bench_model(name, args, Path(tmp))
            add_ratios(model_rows)
            rows += model_rows
    print(table(rows))
    print(
        f"\nonnxruntime {ort.__version__}, torch {torch.__version__}, intra-op threads {args.threads}, "
        f"{args.calls_bs1}/{args.calls_bs32} interleaved calls per variant at bs1/bs32, "
        f"median IQR/p50 {_median_iqr(rows):.0%}, {time.time() - started:.0f} s"
    )
    verdicts = checks(rows, args.noise)
    print("\n".join(verdicts))
    return 1 if args.strict and any(v.startswith("MISS") for v in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
