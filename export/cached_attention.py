"""Decoding attention as one ONNX Runtime node: com.microsoft `GroupQueryAttention` over caches
it writes in place (`export --decode-attention gqa`; ONNX Runtime only).

The portable decoding graph (`Attention.extend`) reads the caches, (B, Hkv, hd, W) keys
transposed and (B, Hkv, W, hd) values, and returns the new tokens' rows for the runner to
write: each layer's rotations, four matmuls, two masks, a softmax and the slices around it are
some 30 nodes, whose cost, node by node, was about a tenth of a decoded token's time on
`small` with a short cache. In the "gqa" variant each layer's local attention is one custom op,
`infini_trt::cached_attention`, which torch.export traces as one node and `translation()`
writes as one `GroupQueryAttention`: the raw q, k and v in, packed (one product of the
layer's packed weight), its own rotary embedding (the model's tables), and both caches
(B, Hkv, N, hd) as past and present at once. The runner binds each layer's present output to
the buffer of its past input, so the kernel writes the new rows in place (ONNX Runtime's
shared past/present buffer) and reads each sequence's first start + length slots only,
whatever N (runtime/kv_cache.py, `DecodeCaches` in place).

The memory path keeps the un-rotated queries (eq 7): only the local attention is fused.
Semantics, checked against this op's eager value and the float64 reference
(tests/export/test_cached_attention.py): row b's tokens are at segment positions start[b] ..;
the first length[b] are real and are written to slots start[b] .. start[b]+length[b]-1
(GroupQueryAttention's `query_seqlens`: right padding); each real token attends causally to
the slots before it and itself; the other rows' outputs mean nothing. Measured:
docs/design.md#decoding-attention-as-one-node.
"""
from __future__ import annotations

import torch

MS_DOMAIN = "com.microsoft"


@torch.library.custom_op("infini_trt::cached_attention", mutates_args=())
def cached_attention(qkv: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, start: torch.Tensor, length: torch.Tensor,
                     positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                     kv_heads: int, interleaved: bool, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (B, S, (H + 2 Hkv) hd): q, k and v side by side, the raw projections of tokens at segment
    positions start (B,) + 0 .. S-1, of which the first length (B,) are real; k_cache and
    v_cache (B, Hkv, N, hd): rotated keys and values, slots < start valid; positions (B, S):
    the rows of the rotary tables cos, sin (N, hd) (the model's, unscaled) to rotate each
    token by: start + 0 .. S-1, at most N - 1 (computed by the caller, so that the graph
    computes them once for all layers).
    -> (a_dot (B, S, H*hd), k_cache_out, v_cache_out): the caches with the real tokens'
    rotated keys and values written at their positions (copies here, in place in ONNX
    Runtime)."""
    from .model import apply_rope

    b, s, _ = qkv.shape
    hd = k_cache.shape[3]
    q, k, v = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
    style = "interleaved" if interleaved else "half"
    q = apply_rope(q.view(b, s, heads, hd).transpose(1, 2), cos[positions][:, None],
                   sin[positions][:, None], style)
    k = apply_rope(k.view(b, s, kv_heads, hd).transpose(1, 2), cos[positions][:, None],
                   sin[positions][:, None], style)
    v = v.view(b, s, kv_heads, hd).transpose(1, 2)
    k_out, v_out = k_cache.clone(), v_cache.clone()
    out = torch.zeros(b, heads, s, hd, dtype=q.dtype, device=q.device)
    group = heads // kv_heads
    for row in range(b):
        first, real = int(start[row]), int(length[row])
        k_out[row, :, first:first + real] = k[row, :, :real]
        v_out[row, :, first:first + real] = v[row, :, :real]
        keys = k_out[row, :, :first + real].repeat_interleave(group, 0)        # (H, T, hd)
        values = v_out[row, :, :first + real].repeat_interleave(group, 0)
        scores = scale * q[row, :, :real] @ keys.transpose(-1, -2)              # (H, Q, T)
        seen = torch.arange(first + real, device=q.device)[None, :] <= \
            (first + torch.arange(real, device=q.device))[:, None]
        scores = scores.masked_fill(~seen, float("-inf"))
        out[row, :, :real] = torch.softmax(scores.float(), -1).to(q.dtype) @ values
    return out.transpose(1, 2).reshape(b, s, heads * hd), k_out, v_out


@cached_attention.register_fake
def _(qkv, k_cache, v_cache, start, length, positions, cos, sin, heads, kv_heads,
      interleaved, scale):
    b, s, _ = qkv.shape
    a_dot = qkv.new_empty((b, s, heads * k_cache.shape[3]))
    return a_dot, torch.empty_like(k_cache), torch.empty_like(v_cache)


def group_query_attention(qkv, k_cache, v_cache, start, length, positions, cos, sin,
                          heads: int, kv_heads: int, interleaved: bool, scale: float):
    """ONNX ops (onnxscript, traced by the exporter) for `infini_trt::cached_attention`. What
    they compute from the graph's inputs (start, length, positions) is the same in every
    layer, and the stamped graphs compute it once (export/stamp.py merges repeats)."""
    from onnxscript import ir, opset18 as op
    from onnxscript.values import Op, Opset

    from .rotary import angle_caches, int64s

    attention = Op(Opset(MS_DOMAIN, 1), "GroupQueryAttention", _schema())
    int32 = ir.DataType.INT32
    seq = op.Shape(positions, start=1, end=2)                             # (1,) int64
    # T - 1 per row, at least 0: a row of length 0 at position 0 is idle (its outputs mean
    # nothing, nothing is written) but GroupQueryAttention wants T >= 1
    seqlens = op.Max(op.Sub(op.Add(start, length), int64s(1)), int64s(0))
    total = op.Max(op.Add(op.ReduceMax(seqlens, keepdims=1), int64s(1)), seq)  # >= S
    caches = angle_caches(cos, sin, interleaved)
    outputs = attention(
        qkv, None, None, k_cache, v_cache, op.Cast(seqlens, to=int32),
        op.Cast(op.Squeeze(total, int64s(0)), to=int32), *caches, positions,
        None, None, None, None, None, None, op.Cast(length, to=int32),
        num_heads=heads, kv_num_heads=kv_heads, do_rotary=1,
        rotary_interleaved=int(interleaved), scale=scale, _num_outputs=3)
    return tuple(outputs)


# GroupQueryAttention's inputs and outputs in ONNX Runtime's order (contrib_defs), up to the
# last one used here; "?": optional
_INPUTS = ("query", "key?", "value?", "past_key?", "past_value?", "seqlens_k:M",
           "total_sequence_length:M", "cos_cache?", "sin_cache?", "position_ids?:P",
           "attention_bias?", "head_sink?", "k_scale?", "v_scale?", "q_norm_weight?",
           "k_norm_weight?", "query_seqlens?:M")
_OUTPUTS = ("output", "present_key", "present_value")
_ATTRIBUTES = {"num_heads": "INT", "kv_num_heads": "INT", "do_rotary": "INT",
               "rotary_interleaved": "INT", "scale": "FLOAT"}


def _schema():
    """The op's schema as the exporter needs it to record a call (onnx has none of ONNX
    Runtime's contrib ops): the inputs, outputs and attributes used here."""
    from onnx.defs import OpSchema

    def parameter(spec: str):
        name, _, type_ = spec.partition(":")
        option = OpSchema.FormalParameterOption.Optional if name.endswith("?") else \
            OpSchema.FormalParameterOption.Single
        return OpSchema.FormalParameter(name.rstrip("?"), type_ or "T", param_option=option)

    return OpSchema(
        "GroupQueryAttention", MS_DOMAIN, 1,
        inputs=[parameter(p) for p in _INPUTS], outputs=[parameter(p) for p in _OUTPUTS],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""),
                          ("M", ["tensor(int32)"], ""), ("P", ["tensor(int64)"], "")],
        attributes=[OpSchema.Attribute(name, getattr(OpSchema.AttrType, kind), "",
                                       required=False) for name, kind in _ATTRIBUTES.items()])


def translation() -> dict:
    """torch.onnx.export's custom_translation_table: the custom op -> `group_query_attention`."""
    return {torch.ops.infini_trt.cached_attention.default: group_query_attention}
