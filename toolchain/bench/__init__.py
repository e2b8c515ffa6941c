"""Latency: torch-free onnxruntime bench (ort.py, `python -m toolchain.bench`) and PyTorch eager timing (torch_eager.py)."""
