"""The ONNX Runtime runner: the exported segment graph with IO binding and two ping-pong
state buffers, so that the state never makes a round trip through host memory.

Every bound buffer is a torch tensor on the session's device (CPU or CUDA): the state stays
where it is between segments, and the logits come back as a torch tensor without a copy.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from infini_trt.export.errors import InfiniTrtError, MissingDependencyError
from infini_trt.export.io_spec import SEGMENT
from infini_trt.export.manifest import read_manifest

from .base import Runner


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("onnxruntime", "the onnxruntime backend",
                                     "pip install onnxruntime (or onnxruntime-gpu)") from None
    return onnxruntime


def session_options(ort, threads: int | None = None):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return so


def providers_for(ort, device: str | None) -> tuple[list[str], str]:
    """(providers, device) for 'cpu', 'cuda' or None (CUDA when onnxruntime has it)."""
    available = ort.get_available_providers()
    if device in (None, "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda"
    if device == "cuda":
        raise InfiniTrtError("this onnxruntime has no CUDA provider; "
                             "pip install onnxruntime-gpu, or use --device cpu")
    return ["CPUExecutionProvider"], "cpu"


class OrtRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, export_dir: str | Path, device: str | None = None,
                 threads: int | None = None):
        ort = import_onnxruntime()
        self.manifest = read_manifest(export_dir)
        self.config = self.manifest.config
        self.dtype = self.manifest.dtype
        self.spec = self.manifest.graph(SEGMENT)
        providers, self.device = providers_for(ort, device)
        path = self.manifest.graph_file(SEGMENT)
        try:
            self.session = ort.InferenceSession(os.fspath(path), session_options(ort, threads),
                                                providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise InfiniTrtError(f"onnxruntime cannot load {path}: {exc}") from None
        self.torch_device = torch.device(self.device)
        self.io = None

    @property
    def description(self) -> str:
        return f"onnxruntime-{self.device} ({self.dtype})"

    def _bind(self, name: str, tensor: torch.Tensor, output: bool = False) -> None:
        """Bind a torch tensor's memory (CPU or CUDA) to a graph input or output, zero-copy."""
        bind = self.io.bind_output if output else self.io.bind_input
        element = {torch.int64: np.int64, torch.float32: np.float32}[tensor.dtype]
        bind(name, self.device, 0, element,
             list(tensor.shape), tensor.data_ptr())

    def _reset(self, batch: int) -> None:
        cfg, device = self.config, self.torch_device
        self.memory = [torch.zeros(cfg.memory_shape(batch), device=device) for _ in "ab"]
        self.norm = [torch.zeros(cfg.norm_shape(batch), device=device) for _ in "ab"]
        self.current = 0
        self.io = self.session.io_binding()

    def _step(self, ids: np.ndarray) -> torch.Tensor:
        cur, nxt = self.current, 1 - self.current
        tokens = torch.from_numpy(ids).to(self.torch_device)
        logits = torch.empty((*ids.shape, self.config.vocab_size), device=self.torch_device)
        self._bind("input_ids", tokens)
        self._bind("memory", self.memory[cur])
        self._bind("norm", self.norm[cur])
        self._bind("logits", logits, output=True)
        self._bind("memory_out", self.memory[nxt], output=True)
        self._bind("norm_out", self.norm[nxt], output=True)
        self.session.run_with_iobinding(self.io)
        self.current = nxt
        return logits

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        return (self.memory[self.current].cpu().numpy().copy(),
                self.norm[self.current].cpu().numpy().copy())

    def set_state(self, memory: np.ndarray, norm: np.ndarray) -> None:
        self.check_state(memory, norm)
        self.memory[self.current].copy_(torch.as_tensor(memory, dtype=torch.float32))
        self.norm[self.current].copy_(torch.as_tensor(norm, dtype=torch.float32))
