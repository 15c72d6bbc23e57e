"""The ONNX Runtime runner: the exported graphs with IO binding and ping-pong state buffers,
so that the state never makes a round trip through host memory.

Every bound buffer is a torch tensor on the session's device (CPU or CUDA): memory and norm
(and the decoding caches) stay where they are between calls, each call writing the other
buffer of a pair, and the logits come back as a torch tensor without a copy.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from infini_trt.export.errors import InfiniTrtError, MissingDependencyError
from infini_trt.export.io_spec import EXTEND, FOLD, SEGMENT
from infini_trt.export.manifest import read_manifest

from .base import Runner

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16, "int64": torch.int64, "bool": torch.bool}


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


def element_type(dtype: torch.dtype):
    """What IO binding takes as the element type of a torch dtype (bf16 has no numpy type)."""
    if dtype == torch.bfloat16:
        from onnx import TensorProto

        return TensorProto.BFLOAT16
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
            torch.bool: np.bool_}[dtype]


class OrtRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, export_dir: str | Path, device: str | None = None,
                 threads: int | None = None):
        self._ort = import_onnxruntime()
        self.manifest = read_manifest(export_dir)
        self.config = self.manifest.config
        self.dtype = self.manifest.dtype
        self.providers, self.device = providers_for(self._ort, device)
        self.threads = threads
        if self.dtype == "bfloat16" and self.device == "cpu":
            raise InfiniTrtError("onnxruntime's CPU provider has no bfloat16 kernels; export "
                                 "with --dtype fp32 or fp16 for onnxruntime on the CPU, or run "
                                 "this export with --backend tensorrt")
        self.torch_device = torch.device(self.device)
        self.sessions: dict = {}
        self.session(SEGMENT)                       # fail early on a bad file
        self.io = None

    @property
    def description(self) -> str:
        return f"onnxruntime-{self.device} ({self.dtype})"

    def session(self, graph: str):
        """The InferenceSession of one graph, loaded on first use."""
        if graph not in self.sessions:
            path = self.manifest.graph_file(graph)
            try:
                self.sessions[graph] = self._ort.InferenceSession(
                    os.fspath(path), session_options(self._ort, self.threads),
                    providers=self.providers)
            except Exception as exc:  # onnxruntime raises its own exception types
                raise InfiniTrtError(f"onnxruntime cannot load {path}: {exc}") from None
        return self.sessions[graph]

    def _run(self, graph: str, inputs: dict[str, torch.Tensor],
             outputs: dict[str, torch.Tensor]) -> None:
        """Run one graph with every input and output bound to a torch tensor (zero-copy)."""
        io = self.session(graph).io_binding()
        for names, bind in ((inputs, io.bind_input), (outputs, io.bind_output)):
            for name, tensor in names.items():
                bind(name, self.device, 0, element_type(tensor.dtype), list(tensor.shape),
                     tensor.data_ptr())
        self.session(graph).run_with_iobinding(io)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.torch_device)

    def _logits(self, ids: np.ndarray) -> torch.Tensor:
        return torch.empty((*ids.shape, self.config.vocab_size), device=self.torch_device)

    # state ---------------------------------------------------------------------------------
    def _reset(self, batch: int) -> None:
        cfg, device = self.config, self.torch_device
        self.memory = [torch.zeros(cfg.memory_shape(batch), device=device) for _ in "ab"]
        self.norm = [torch.zeros(cfg.norm_shape(batch), device=device) for _ in "ab"]
        self.current = 0
        self.caches = None            # decoding: allocated on first extend

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        return (self.memory[self.current].cpu().numpy().copy(),
                self.norm[self.current].cpu().numpy().copy())

    def set_state(self, memory: np.ndarray, norm: np.ndarray) -> None:
        self.check_state(memory, norm)
        self.memory[self.current].copy_(torch.as_tensor(memory, dtype=torch.float32))
        self.norm[self.current].copy_(torch.as_tensor(norm, dtype=torch.float32))

    # graphs --------------------------------------------------------------------------------
    def _step(self, ids: np.ndarray) -> torch.Tensor:
        cur, nxt = self.current, 1 - self.current
        logits = self._logits(ids)
        self._run(SEGMENT,
                  {"input_ids": self._tensor(ids), "memory": self.memory[cur],
                   "norm": self.norm[cur]},
                  {"logits": logits, "memory_out": self.memory[nxt], "norm_out": self.norm[nxt]})
        self.current = nxt
        return logits

    def _extend(self, ids: np.ndarray, start: np.ndarray, length: np.ndarray) -> torch.Tensor:
        if self.caches is None:
            spec = self.manifest.graph(EXTEND).input("k_cache")
            shape = spec.shape({"batch": self.batch})
            dtype = TORCH_DTYPES[spec.dtype]
            self.caches = [[torch.zeros(shape, dtype=dtype, device=self.torch_device)
                            for _ in "kv"] for _ in "ab"]
            self.cache_current = 0
        (k_in, v_in), (k_out, v_out) = (self.caches[self.cache_current],
                                        self.caches[1 - self.cache_current])
        logits = self._logits(ids)
        self._run(EXTEND,
                  {"input_ids": self._tensor(ids), "start": self._tensor(start),
                   "length": self._tensor(length), "k_cache": k_in, "v_cache": v_in,
                   "memory": self.memory[self.current], "norm": self.norm[self.current]},
                  {"logits": logits, "k_cache_out": k_out, "v_cache_out": v_out})
        self.cache_current = 1 - self.cache_current
        return logits

    def _fold(self, mask: np.ndarray) -> None:
        cur, nxt = self.current, 1 - self.current
        k_cache, v_cache = self.caches[self.cache_current]
        self._run(FOLD,
                  {"k_cache": k_cache, "v_cache": v_cache, "memory": self.memory[cur],
                   "norm": self.norm[cur], "fold": self._tensor(mask)},
                  {"memory_out": self.memory[nxt], "norm_out": self.norm[nxt]})
        self.current = nxt
