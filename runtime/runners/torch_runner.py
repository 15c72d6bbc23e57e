"""The PyTorch runner: eager `InfiniLM.step`, state kept as device tensors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from infini_trt.export.checkpoint import (WEIGHTS_FILE, dtype_from_name, dtype_name,
                                          load_checkpoint)
from infini_trt.export.errors import InputError
from infini_trt.export.model import InfiniLM

from ..kv_cache import cache_window, empty_caches, write_cache

from .base import Runner


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, model: InfiniLM, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.config = model.cfg
        self.dtype = dtype_name(model.embed.weight.dtype)
        self.memory = self.norm = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu",
                        dtype: str | None = None) -> "TorchRunner":
        from ..artifacts import file_sha256

        cast = dtype_from_name(dtype) if dtype else None
        runner = cls(load_checkpoint(path, device=device, dtype=cast), device)
        runner.weights_sha256 = file_sha256(Path(path) / WEIGHTS_FILE)
        return runner

    def _reset(self, batch: int) -> None:
        self.memory, self.norm = self.model.init_state(batch, self.device)
        self.k_cache = self.v_cache = None

    @torch.inference_mode()
    def _extend(self, ids: np.ndarray, start: np.ndarray, length: np.ndarray,
                rows: np.ndarray) -> torch.Tensor:
        self._cache_tensors(0)
        tokens, begin, picked = (torch.from_numpy(a).to(self.device) for a in (ids, start, rows))
        window = cache_window(int(start.max()), self.config.segment_len)   # the slots read
        logits, k_new, v_new = self.model.extend(tokens, begin, self.memory, self.norm,
                                                 self.k_cache[..., :window],    # as the graph
                                                 self.v_cache[:, :, :, :window],  # runners do
                                                 picked)
        write_cache(self.k_cache, self.v_cache, k_new, v_new, start, length)
        return logits.float()

    @torch.inference_mode()
    def _fold(self, mask: np.ndarray) -> None:
        if self.k_cache is None:
            raise InputError("fold() needs a segment in the K/V cache: call extend() first")
        self.memory, self.norm = self.model.fold_cache(
            self.k_cache, self.v_cache, self.memory, self.norm,
            torch.from_numpy(mask).to(self.device))

    @torch.inference_mode()
    def _step(self, ids: np.ndarray, last_only: bool = False) -> torch.Tensor:
        tokens = torch.from_numpy(ids).to(self.device)
        logits, self.memory, self.norm = self.model.step(tokens, self.memory, self.norm,
                                                         last_only=last_only)
        return logits.float()

    def _advance(self, ids: np.ndarray) -> torch.Tensor:
        return self._step(ids, last_only=True)

    @torch.inference_mode()
    def read_row(self, b: int, position: int):
        return super().read_row(b, position)

    @torch.inference_mode()                  # the state is made in inference mode: write there
    def write_row(self, b: int, row) -> None:
        super().write_row(b, row)

    def _state_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.memory, self.norm

    def _cache_tensors(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k_cache is None:
            self.k_cache, self.v_cache = empty_caches(self.config, self.batch,
                                                      self.model.embed.weight.dtype, self.device)
        return self.k_cache, self.v_cache

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        return self.memory.cpu().numpy(), self.norm.cpu().numpy()

    def set_state(self, memory: np.ndarray, norm: np.ndarray) -> None:
        self.check_state(memory, norm)
        dtype = self.model.state_dtype
        self.memory = torch.as_tensor(memory, dtype=dtype, device=self.device).clone()
        self.norm = torch.as_tensor(norm, dtype=dtype, device=self.device).clone()
