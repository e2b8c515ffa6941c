"""One INT8 conv, two kernels: MLAS's symmetric conv kernel vs its general QGEMM (AMX where present).

    .venv/bin/python benchmarks/gemm_route.py                 # 2 and 1 intra-op threads
    .venv/bin/python benchmarks/gemm_route.py --threads 2 --time 1

onnxruntime's QLinearConv takes MLAS's symmetric conv kernels when the int8 weight zero point is 0
and the general u8s8 QGEMM otherwise (toolchain/onnx/gemm_route.py). This times one NHWC
QLinearConv (com.microsoft, uint8 in and out, batch 1) per shape with weight zero point 0 and the
same weights shifted to zero point -1, interleaved in rounds, and prints the p50s and their ratio
(> 1: the general QGEMM is faster). The shapes are the pointwise and 3x3 convs of mobilenet_v2 and
resnet18 at 224; `K` is weights per output channel (input channels x kernel area), the quantity
`gemm_min_weights` thresholds. Torch-free.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import List, Optional, Tuple

import numpy as np

# (input channels, output channels, map side, kernel side); input == output channels with "dw": depthwise
SHAPES: List[Tuple[int, int, int, int]] = [
    (16, 96, 112, 1),
    (24, 144, 56, 1),
    (96, 24, 56, 1),
    (144, 24, 56, 1),
    (128, 32, 28, 1),
    (192, 32, 28, 1),
    (192, 64, 28, 1),
    (256, 64, 14, 1),
    (256, 256, 14, 1),
    (320, 96, 14, 1),
    (384, 64, 14, 1),
    (576, 96, 14, 1),
    (960, 160, 7, 1),
    (320, 1280, 7, 1),
    (64, 64, 56, 3),
    (128, 128, 28, 3),
    (256, 256, 14, 3),
    (512, 512, 7, 3),
]
DEPTHWISE: List[Tuple[int, int, int, int]] = [
    (32, 32, 112, 3),
    (144, 144, 56, 3),
    (192, 192, 28, 3),
    (576, 576, 14, 3),
    (960, 960, 7, 3),
]


def conv_model(cin: int, cout: int, side: int, k: int, zero_point: int, depthwise: bool = False) -> bytes:
    """One QLinearConv with random weights in the range the quantize stage gives them on this machine:
    7 bits where onnxruntime asks for reduce_range (x86 without VNNI, whose u8s8 kernels saturate int16
    pair sums at 8 bits, so the two zero points would compute different things), else 8."""
    from onnx import TensorProto, helper, numpy_helper

    from toolchain.bench.device import cpu_features, needs_reduce_range

    group = cin if depthwise else 1
    qmax = 64 if needs_reduce_range(cpu_features()) else 127
    w = np.random.default_rng(0).integers(-qmax, qmax + 1, (cout, cin // group, k, k)).astype(np.int16)
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
        numpy_helper.from_array(np.array(128, np.uint8), "xz"),
        numpy_helper.from_array((w + zero_point).astype(np.int8), "w"),  # w_q - zp is the same for both
        numpy_helper.from_array(np.full(cout, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.full(cout, zero_point, np.int8), "wz"),
        numpy_helper.from_array(np.array(0.05, np.float32), "ys"),
        numpy_helper.from_array(np.array(128, np.uint8), "yz"),
    ]
    node = helper.make_node(
        "QLinearConv",
        ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"],
        ["y"],
        domain="com.microsoft",
        channels_last=1,
        pads=[k // 2] * 4,
        group=group,
    )
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, side, side, cin])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
        inits,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)]
    ).SerializeToString()


def p50_pair(
    cin: int, cout: int, side: int, k: int, threads: int, seconds: float, rounds: int, depthwise: bool = False
) -> Tuple[float, float]:
    """p50 us of the symmetric (zero point 0) and the general (zero point -1) kernel, median over rounds."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sessions = [
        ort.InferenceSession(conv_model(cin, cout, side, k, zp, depthwise), opts, providers=["CPUExecutionProvider"])
        for zp in (0, -1)
    ]
    x = {"x": np.random.default_rng(1).integers(0, 256, (1, side, side, cin)).astype(np.uint8)}
    per_round: List[List[float]] = [[], []]
    for r in range(rounds):
        for i in (r % 2, 1 - r % 2):
            for _ in range(5):
                sessions[i].run(None, x)
            times, end = [], time.perf_counter() + seconds / rounds
            while time.perf_counter() < end or len(times) < 5:
                t = time.perf_counter()
                sessions[i].run(None, x)
                times.append(time.perf_counter() - t)
            per_round[i].append(float(np.median(times)) * 1e6)
    return statistics.median(per_round[0]), statistics.median(per_round[1])


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", default="2,1", help="intra-op thread counts, comma separated")
    p.add_argument("--time", type=float, default=1.0, help="timed seconds per conv and kernel (all rounds)")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    print(
        "| conv (in -> out, map, kernel) | K | "
        + " | ".join(f"{t} thr: sym / general us (ratio)" for t in threads)
        + " |"
    )
    print("|---|---|" + "---|" * len(threads))
    for depthwise, shapes in ((False, SHAPES), (True, DEPTHWISE)):
        for cin, cout, side, k in shapes:
            cells = []
            for t in threads:
                sym, gemm = p50_pair(cin, cout, side, k, t, args.time, args.rounds, depthwise)
                cells.append(f"{sym:.1f} / {gemm:.1f} ({sym / gemm:.2f}x)")
            kind, weights = ("dw ", k * k) if depthwise else ("", cin * k * k)
            print(
                f"| {kind}{cin} -> {cout}, {side}x{side}, {k}x{k} | {weights} | " + " | ".join(cells) + " |", flush=True
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
