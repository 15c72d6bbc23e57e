"""The model's one memory-update call site.

In eager PyTorch it is the reference math. Inside `plugin_nodes()` while torch.onnx exports,
each call becomes ONE custom ONNX node (the op of `plugins/memory_update/contract.py`); the
exporter then attaches the op's ONNX function so that any runtime can still run it. Outside
that context ("portable" export) the reference is traced into plain ONNX ops.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

from infini_trt.plugins.memory_update import contract

from . import reference

_EMIT_PLUGIN_NODES = contextvars.ContextVar("emit_plugin_nodes", default=False)
LAYER_METADATA = "infini_trt.layer"     # metadata_props key naming the node's layer


@contextlib.contextmanager
def plugin_nodes() -> Iterator[None]:
    """Emit the memory update as custom nodes while exporting inside this block."""
    token = _EMIT_PLUGIN_NODES.set(True)
    try:
        yield
    finally:
        _EMIT_PLUGIN_NODES.reset(token)


def memory_update(memory: torch.Tensor, norm: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  rule: str, eps: float, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, z, raw K, V) -> (M_s, z_s) for one layer; see `reference.memory_update`."""
    if _EMIT_PLUGIN_NODES.get() and torch.onnx.is_in_onnx_export():
        memory_out, norm_out = torch.onnx.ops.symbolic_multi_out(
            f"{contract.NAMESPACE}::{contract.op_type(rule)}", (memory, norm, k, v),
            attrs=contract.attributes(rule, eps),
            dtypes=(memory.dtype, norm.dtype), shapes=(memory.shape, norm.shape),
            version=int(contract.VERSION), metadata_props={LAYER_METADATA: str(layer)})
        return memory_out, norm_out
    return reference.memory_update(memory, norm, k, v, rule, eps)
