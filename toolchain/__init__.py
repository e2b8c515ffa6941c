"""Deployment-oriented model compression: KD -> pruning -> ONNX -> onnxruntime benchmark."""

__version__ = "0.4.0"
