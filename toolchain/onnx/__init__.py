"""ONNX: export with metadata, checker, parity gate, ONNX accuracy, MLflow model logging."""
