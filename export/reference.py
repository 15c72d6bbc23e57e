"""The Infini-attention compressive memory as pure functions (paper eq 7-10).

This is the one statement of the math. The model, the ONNX function of the memory-update node,
the Triton kernel and every engine are tested against it. Nothing here mutates its inputs,
and everything runs in float64 when given float64 tensors.

Shapes, per layer (B batch, Hkv KV heads, S segment tokens, dk/dv key/value head size):
    memory  M  (B, Hkv, dk, dv)
    norm    z  (B, Hkv, dk)
    k          (B, Hkv, S, dk)     raw keys, before sigma and before any rotary embedding
    v          (B, Hkv, S, dv)
    q          (B, Hkv, R, dk)     raw queries grouped by the KV head whose memory they read
                                   (R = query heads per KV head x S)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LINEAR, DELTA = "linear", "delta"


def sigma(x: torch.Tensor) -> torch.Tensor:
    """The feature map sigma(x) = ELU(x) + 1, element-wise and strictly positive."""
    return F.elu(x) + 1.0


def retrieve(sigma_q: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor,
             eps: float) -> torch.Tensor:
    """A_mem = sigma(Q) M / (sigma(Q) z), the denominator clamped at `eps`.  # eq 7

    sigma_q (B, H, R, dk), memory (B, H, dk, dv), norm (B, H, dk) -> (B, H, R, dv).
    An empty memory (M = 0, z = 0) retrieves exactly 0.
    """
    numerator = sigma_q @ memory                          # (B, H, R, dv)
    denominator = sigma_q @ norm.unsqueeze(-1)            # (B, H, R, 1)
    return numerator / denominator.clamp_min(eps)


def update_linear(memory: torch.Tensor, norm: torch.Tensor, sigma_k: torch.Tensor,
                  v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M_s = M + sigma(K)^T V,  z_s = z + sum_t sigma(K_t).  # eq 8"""
    return memory + sigma_k.transpose(-1, -2) @ v, norm + sigma_k.sum(dim=-2)


def update_delta(memory: torch.Tensor, norm: torch.Tensor, sigma_k: torch.Tensor,
                 v: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """M_s = M + sigma(K)^T (V - sigma(K) M / (sigma(K) z)), z as in eq 8.  # eq 9

    The subtracted term is what the memory already returns for these keys (eq 7 applied to K),
    read from M_{s-1} for every token of the segment.
    """
    v_old = retrieve(sigma_k, memory, norm, eps)          # (B, H, S, dv)
    return memory + sigma_k.transpose(-1, -2) @ (v - v_old), norm + sigma_k.sum(dim=-2)


def memory_update(memory: torch.Tensor, norm: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  rule: str, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole memory update of one layer: the op exported as one custom ONNX node.

    Takes raw keys; applies sigma; computes in the state's dtype (float32, or float64 for the
    reference) whatever the dtype of k and v. Returns (memory_out, norm_out).
    """
    sigma_k = sigma(k.to(memory.dtype))
    v = v.to(memory.dtype)
    if rule == LINEAR:
        return update_linear(memory, norm, sigma_k, v)
    if rule == DELTA:
        return update_delta(memory, norm, sigma_k, v, eps)
    raise ValueError(f"unknown update rule {rule!r}")


def gate(a_mem: torch.Tensor, a_dot: torch.Tensor, beta: torch.Tensor,
         present: torch.Tensor | None = None, heads_dim: int = 1) -> torch.Tensor:
    """A = sigmoid(beta) A_mem + (1 - sigmoid(beta)) A_dot, one beta per query head.  # eq 10

    a_mem, a_dot (B, H, S, dv), or (B, S, H, dv) with heads_dim=2; beta (H,). `present`
    (B, H) is the "bypass" empty-memory policy: where it is 0 the memory and the gate are
    skipped and A = A_dot.
    """
    shape = [1, 1, 1, 1]
    shape[heads_dim] = -1
    g = torch.sigmoid(beta).view(shape)
    if present is not None:
        shape[0] = present.shape[0]
        g = g * present.to(g.dtype).view(shape)
    return g * a_mem + (1.0 - g) * a_dot


def memory_present(norm: torch.Tensor, group_size: int) -> torch.Tensor:
    """1 for each query head whose KV head's memory has seen a token, else 0: (B, Hkv*group).

    z is a sum of strictly positive sigma(k), so it is non-zero exactly once something was
    written. Data, not control flow: the same test works inside an exported graph.
    """
    present = norm.amax(dim=-1) > 0                       # (B, Hkv)
    return present.repeat_interleave(group_size, dim=1)
