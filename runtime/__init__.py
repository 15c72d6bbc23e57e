"""Running and checking exported Infini-attention models; the Python API.

    from infini_trt.runtime import load, Session, Context, generate, SamplingConfig, tokenizer_of

Names are imported on first use, so that importing this package (and the CLI's --help) does
not pay for torch or ONNX Runtime.
"""
import importlib

_API = {
    "load": "runners", "open_runner": "runners", "prepare": "runners", "Runner": "runners",
    "Session": "session", "Context": "context",
    "generate": "generation", "SamplingConfig": "sampling", "score": "scoring",
    "tokenizer_of": "tokenizer", "bundled_model": "models",
}
__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
