"""The rotary embedding (RoPE) of the exported graphs as one ONNX node, from opset 23.

`model.apply_rope` is a few element-wise ops (split, negate, concatenate, two products and a
sum: six nodes for each of q and k in every layer). Inside `rotation_nodes(opset)` while
torch.onnx exports at opset 23 or later, a rotation at positions is one custom op,
`infini_trt::rotary`, which torch.export traces as one node and `TRANSLATION` writes as
ONNX's `RotaryEmbedding` (opset 23): ONNX Runtime runs it as one kernel, TensorRT(-RTX) parses
it into its rotary embedding layer. Below opset 23 the graphs keep the element-wise form.
One node instead of six measured 1.034x for a decoded token of `small` (fp32, 512 cached
slots) and 1.057x for a prefill segment (docs/design.md#the-rotation-as-one-node).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

ROTARY_OPSET = 23                      # ONNX's RotaryEmbedding

_EMIT = contextvars.ContextVar("emit_rotary_nodes", default=False)


@contextlib.contextmanager
def rotation_nodes(opset: int) -> Iterator[None]:
    """Write the rotations as RotaryEmbedding nodes while exporting inside this block, where
    `opset` has the op."""
    token = _EMIT.set(opset >= ROTARY_OPSET)
    try:
        yield
    finally:
        _EMIT.reset(token)


def emitting() -> bool:
    """Whether a rotation exported now becomes one `infini_trt::rotary` node."""
    return _EMIT.get() and torch.onnx.is_in_onnx_export()


@torch.library.custom_op("infini_trt::rotary", mutates_args=())
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
           interleaved: bool) -> torch.Tensor:
    """x (B, H, S, hd) rotated to `positions` (B, S), int64 rows of the tables cos, sin
    (P, hd) that `model.rope_tables` makes (each angle twice: the halves repeated, or each
    pair's two entries when `interleaved`); the tables may carry a scale."""
    from .model import apply_rope

    style = "interleaved" if interleaved else "half"
    return apply_rope(x, cos[positions][:, None], sin[positions][:, None], style)


@rotary.register_fake
def _(x, cos, sin, positions, interleaved):
    return torch.empty_like(x)


def rotary_embedding(x, cos, sin, positions, interleaved: bool):
    """ONNX ops (onnxscript, traced by the exporter) for `infini_trt::rotary`: the tables'
    distinct angles, (P, hd/2), are RotaryEmbedding's caches."""
    from onnxscript import opset23 as op

    return op.RotaryEmbedding(x, *angle_caches(cos, sin, interleaved), positions,
                              interleaved=int(interleaved))


def angle_caches(cos, sin, interleaved: bool) -> list:
    """ONNX ops: the distinct angles of the model's tables cos, sin (P, hd) (each angle is
    there twice), (P, hd/2): the cos/sin caches of ONNX's and ONNX Runtime's rotary ops."""
    from onnxscript import opset18 as op

    half = int(cos.shape[1]) // 2
    if interleaved:                          # entries 0, 2, 4, ... of each row
        return [op.Slice(t, int64s(0), int64s(2 * half), int64s(1), int64s(2))
                for t in (cos, sin)]
    return [op.Slice(t, int64s(0), int64s(half), int64s(1)) for t in (cos, sin)]   # first half


def int64s(*values: int):
    """ONNX ops: a constant int64 vector."""
    from onnxscript import ir, opset18 as op      # (angle_caches is written below opset 23 too)

    return op.Constant(value=ir.tensor(list(values), dtype=ir.DataType.INT64))


def translation() -> dict:
    """torch.onnx.export's custom_translation_table: the custom op -> `rotary_embedding`."""
    return {torch.ops.infini_trt.rotary.default: rotary_embedding}
