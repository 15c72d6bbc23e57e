"""The local causal attention (eq 6) of the exported graphs, in blocks of queries.

While torch.onnx exports, `model.causal_attention` is one custom op,
`infini_trt::causal_attention` (export/model.py), which torch.export traces as one node of q's
shape; `TRANSLATION`, given to torch.onnx.export, writes that node into ONNX ops here. Block i
of the n blocks of queries (positions ceil(S*i/n) .. ceil(S*(i+1)/n)) reads the keys up to
its own end, so that of the S x S scores only (n+1)/(2n) are computed; the plain-op form that
torch.onnx writes for SDPA builds an S x S mask per layer and computes every score above the
diagonal too (docs/design.md#causal-attention-in-blocks-of-queries).

The bounds of the blocks are computed in the graph (Mul, Add, Div on the segment length)
rather than by torch.export: written in torch, 4 blocks' symbolic bounds cost torch.export
about 10 s of sympy on `small` (attention alone, 2 cores: 14.6 s against 5.0 s this way).
"""
from __future__ import annotations

import torch

# blocks of queries: 8 ran faster than 4, 12 and 16, and 4 faster than 2 (fewer scores
# computed, against more slices) docs/design.md#causal-attention-in-blocks-of-queries
QUERY_BLOCKS = 8

# torch dtype of each ONNX float type the graphs compute in (for the mask's minimum)
_TORCH_DTYPES = {"FLOAT": torch.float32, "FLOAT16": torch.float16,
                 "BFLOAT16": torch.bfloat16, "DOUBLE": torch.float64}


def causal_attention(q, k, v, seq, group: int, blocks: int):
    """ONNX ops (onnxscript, traced by the exporter) for `infini_trt::causal_attention`:
    q (B, H, S, hd) rotated and scaled, rotated k and v (B, Hkv, S, hd), `seq` S as an int64
    value that the graph reads from its input (the same value in every layer, so that a
    stamped graph computes the bounds and masks once for all layers) -> (B, H, S, hd).
    Query heads stay grouped by KV head (no copies of k and v per group); masked scores are
    the dtype's minimum, added to the scores (a broadcast Where over the scores is slower),
    and the softmax runs in at least float32."""
    from onnxscript import opset18 as op

    heads, head_dim = int(q.shape[1]), int(q.shape[3])        # fixed by the config
    length = op.Reshape(seq, _ints(1))
    queries = op.Reshape(q, _ints(0, heads // group, group, -1, head_dim))   # (B, Hkv, G, S, hd)
    keys_t = op.Unsqueeze(op.Transpose(k, perm=[0, 1, 3, 2]), _ints(2))  # (B, Hkv, 1, hd, S)
    values = op.Unsqueeze(v, _ints(2))                                 # (B, Hkv, 1, S, hd)
    bounds = [_ints(0), *(op.Div(op.Add(op.Mul(length, _ints(i)), _ints(blocks - 1)),
                                 _ints(blocks)) for i in range(1, blocks)), length]
    parts = []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        last = i == blocks - 1                        # reads every key: no slice (a copy)
        keys = keys_t if last else op.Slice(keys_t, _ints(0), hi, _ints(4))
        scores = op.MatMul(op.Slice(queries, lo, hi, _ints(3)), keys)
        weights = _softmax(op.Add(scores, _causal_mask(lo, hi, q.dtype)), q.dtype)
        parts.append(op.MatMul(weights, values if last else
                               op.Slice(values, _ints(0), hi, _ints(3))))
    return op.Reshape(op.Concat(*parts, axis=-2), _ints(0, heads, -1, head_dim))


def _causal_mask(lo, hi, dtype):
    """(hi - lo, hi): 0 where query lo + row may read key col (col <= lo + row), else the
    dtype's minimum."""
    from onnxscript import ir, opset18 as op

    rows = op.Unsqueeze(op.Range(op.Squeeze(lo), op.Squeeze(hi), _int(1)), _ints(1))
    cols = op.Unsqueeze(op.Range(_int(0), op.Squeeze(hi), _int(1)), _ints(0))
    torch_dtype = _TORCH_DTYPES[dtype.name]
    lowest = torch.tensor(torch.finfo(torch_dtype).min, dtype=torch_dtype)
    return op.Where(op.Greater(cols, rows), op.Constant(value=ir.tensor(lowest)),
                    op.Constant(value=ir.tensor(torch.zeros((), dtype=torch_dtype))))


def _softmax(scores, dtype):
    """Softmax over the last axis, in float32 for fp16/bf16 scores."""
    from onnxscript import ir, opset18 as op

    if dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
        return op.Cast(op.Softmax(op.Cast(scores, to=ir.DataType.FLOAT), axis=-1), to=dtype)
    return op.Softmax(scores, axis=-1)


def _ints(*values: int):
    from onnxscript import ir, opset18 as op

    return op.Constant(value=ir.tensor(list(values), dtype=ir.DataType.INT64))


def _int(value: int):
    from onnxscript import ir, opset18 as op

    return op.Constant(value=ir.tensor(value, dtype=ir.DataType.INT64))


def translation() -> dict:
    """torch.onnx.export's custom_translation_table: the custom op -> `causal_attention`."""
    from . import model  # noqa: F401  (registers the op)

    return {torch.ops.infini_trt.causal_attention.default: causal_attention}
