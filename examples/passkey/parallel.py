"""A training-only formulation of `InfiniLM.forward` that runs all segments at once.

For the linear rule (eq 8) the memory before segment s is a sum over the earlier segments:

    M_{s-1} = sum_{r < s} sigma(K_r)^T V_r,     z_{s-1} = sum_{r < s} sum_t sigma(K_r,t)

so every segment's (M_{s-1}, z_{s-1}) is an exclusive cumulative sum of the per-segment
writes, and a layer processes the whole sequence as a batch of segments: one big batched
matmul instead of a Python loop over segments. It uses the model's own modules and
`export/reference.py`, and equals `InfiniLM.forward` (tested in float64 in
tests/examples/test_passkey_training.py); the weights it trains load into the plain model.

`write_weights` (B, T) is a training augmentation, not part of the model: token t's write
sigma(k_t)^T v_t (and sigma(k_t) in z) is counted `write_weights[b, t]` times, as if the
sequence held that many copies of it. With weights > 1 on filler a short sequence puts on M and
z the load of a long one; with weights < 1 the key stands out (an easier start).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from infini_trt.export import reference
from infini_trt.export.model import InfiniLM, apply_rope, expand_kv, rope_tables


def exclusive_cumsum(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """out[s] = sum_{r < s} x[r] along `dim` (out[0] = 0)."""
    shifted = torch.cat((torch.zeros_like(x.narrow(dim, 0, 1)), x.narrow(dim, 0, x.shape[dim] - 1)),
                        dim=dim)
    return shifted.cumsum(dim)


def parallel_forward(model: InfiniLM, input_ids: torch.Tensor,
                     write_weights: torch.Tensor | None = None):
    """input_ids (B, T) with T a multiple of segment_len -> (logits (B, T, V), memory
    (L, B, Hkv, dk, dv), norm (L, B, Hkv, dk)): the final state, as `InfiniLM.forward`."""
    cfg = model.cfg
    if cfg.update_rule != "linear" or cfg.empty_memory != "zero":
        raise ValueError("the parallel form covers the linear rule with empty_memory='zero'")
    b, t = input_ids.shape
    n = cfg.segment_len
    if t % n:
        raise ValueError(f"sequence length {t} is not a multiple of segment_len {n}")
    s = t // n
    hkv, hd, group = cfg.n_kv_heads, cfg.head_dim, cfg.group_size
    x = model.embed(input_ids).view(b * s, n, cfg.d_model)                 # segments as batch
    cos, sin = rope_tables(0, n, hd, cfg.rope_theta, cfg.rope_style, x.dtype, x.device)
    state_dtype = model.state_dtype
    memories, norms = [], []
    for block in model.layers:
        attn = block.attn
        q, k, v = attn.project(block.attn_norm(x))          # (BS, H, N, hd), (BS, Hkv, N, hd)

        # local causal attention with RoPE, positions from 0 in each segment  # eq 6
        a_dot = F.scaled_dot_product_attention(
            apply_rope(q, cos, sin, cfg.rope_style),
            expand_kv(apply_rope(k, cos, sin, cfg.rope_style), group), expand_kv(v, group),
            is_causal=True)

        # every segment's write, then M_{s-1} and z_{s-1} as exclusive sums  # eq 8
        sigma_k = reference.sigma(k.to(state_dtype))                      # (BS, Hkv, N, hd)
        if write_weights is not None:
            sigma_k = sigma_k * write_weights.to(state_dtype).view(b * s, 1, n, 1)
        writes = (sigma_k.transpose(-1, -2) @ v.to(state_dtype)).view(b, s, hkv, hd, hd)
        counts = sigma_k.sum(dim=-2).view(b, s, hkv, hd)
        memory = exclusive_cumsum(writes)                                  # (B, S, Hkv, hd, hd)
        norm = exclusive_cumsum(counts)                                    # (B, S, Hkv, hd)
        memories.append(memory[:, -1] + writes[:, -1])
        norms.append(norm[:, -1] + counts[:, -1])

        # retrieval from M_{s-1}, gate and output projection, as the model does  # eq 7, 10, 11
        x = x + attn.combine(q, a_dot, memory.view(b * s, hkv, hd, hd), norm.view(b * s, hkv, hd))
        x = x + block.mlp(block.mlp_norm(x))
    logits = model.lm_head(model.final_norm(x)).view(b, t, cfg.vocab_size)
    return logits, torch.stack(memories), torch.stack(norms)
