"""One runner contract for every backend (PyTorch, ONNX Runtime, TensorRT).

    with load("model_or_export_dir", "onnxruntime") as runner:
        runner.reset(batch=1)
        logits = runner.step(segment_ids)      # (B, S) -> (B, S, V), state carried inside

Sessions (runtime/session.py) drive any runner; `score`, `run`, `validate` and `bench` too.
"""
from .base import Runner, RowState
from .opening import BACKENDS, load, open_runner, prepare

__all__ = ["BACKENDS", "Runner", "RowState", "load", "open_runner", "prepare"]
