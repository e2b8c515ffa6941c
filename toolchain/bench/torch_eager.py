"""PyTorch eager latency, measured exactly like bench.benchmark so the two can be compared.

API:
    torch_eager_latency(model, input_shape_chw, batch_sizes, warmup, iterations, time_budget_s,
                        threads=None) -> {"environment": {...}, "results": [row, ...]}
        Rows have provider "torch_eager", batch_size, input_shape and the same STAT_KEYS as
        bench.benchmark (p50_ms ... throughput_img_s, iterations, total_s), so
        bench.format_table(ort_results, reference=torch_results) prints the ORT speed-up.
        Runs in eval mode under torch.inference_mode on the model's device (CUDA calls are
        synchronised so the time covers the kernels); `threads` sets torch's intra-op threads
        for the measurement only. The model's train/eval mode and thread count are restored.
"""

from __future__ import annotations

import platform
from typing import Any, Dict, Optional, Sequence

import torch

from .ort import cpu_model, latency_stats, time_calls


def _forward_fn(model: torch.nn.Module, x: torch.Tensor):
    if x.device.type == "cuda":

        def run():
            model(x)
            torch.cuda.synchronize(x.device)  # CUDA launches are async: time the work, not the launch

        return run
    return lambda: model(x)


def torch_eager_latency(
    model: torch.nn.Module,
    input_shape_chw: Sequence[int],
    batch_sizes: Sequence[int],
    warmup: int,
    iterations: int,
    time_budget_s: float,
    threads: Optional[int] = None,
) -> Dict[str, Any]:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training, old_threads = model.training, torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    model.eval()
    rows = []
    try:
        with torch.inference_mode():
            for bs in batch_sizes:
                shape = (int(bs), *[int(d) for d in input_shape_chw])
                x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
                times = time_calls(_forward_fn(model, x), warmup, iterations, time_budget_s)
                rows.append(
                    {
                        "provider": "torch_eager",
                        "batch_size": int(bs),
                        "input_shape": list(shape),
                        **latency_stats(times, int(bs)),
                    }
                )
        env = {
            "torch": torch.__version__,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "cpu_model": cpu_model(),
            "python": platform.python_version(),
        }
    finally:
        torch.set_num_threads(old_threads)
        model.train(was_training)
    return {"environment": env, "results": rows}
