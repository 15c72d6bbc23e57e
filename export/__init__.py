"""The PyTorch side of infini-trt: the model, its reference math, checkpoints and ONNX export.

Names are imported lazily, so that `infini_trt.export.errors` (and with it the CLI's --help)
does not pay for importing torch.
"""
import importlib

_EXPORTS = {
    "InfiniConfig": "config", "PRESETS": "config", "preset": "config",
    "InfiniLM": "model", "init_weights": "model",
    "load_checkpoint": "checkpoint", "read_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "InfiniTrtError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
