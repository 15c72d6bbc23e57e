"""The memory-update call site of the model: the reference in eager mode.

Kept apart from the model so that the ONNX exporter can turn each call into one custom node.
"""
from __future__ import annotations

import torch

from . import reference


def memory_update(memory: torch.Tensor, norm: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  rule: str, eps: float, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, z, raw K, V) -> (M_s, z_s) for one layer; see `reference.memory_update`."""
    return reference.memory_update(memory, norm, k, v, rule, eps)
