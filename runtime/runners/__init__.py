"""One runner contract for every backend (PyTorch, ONNX Runtime, TensorRT).

    with open_runner("model_or_export_dir", "onnxruntime") as runner:
        runner.reset(batch=1)
        logits = runner.step(segment_ids)      # (B, S) -> (B, S, V), state carried inside

The streaming loop, `score`, `run`, `validate` and `bench` take any runner.
"""
from .base import Runner, open_runner

__all__ = ["Runner", "open_runner"]
