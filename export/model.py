"""An Infini-attention decoder LM of the Llama family, built on `reference.py`.

    logits, memory, norm = model.step(input_ids, memory, norm)   # one segment, pure in the state
    logits, memory, norm = model(input_ids)                      # any length: the definition
    logits, k_new, v_new = model.extend(ids, start, memory, norm, k_caches, v_caches)
    # the caller writes k_new, v_new into its caches (runtime/kv_cache.py: write_cache)
    memory, norm = model.fold_cache(k_cache, v_cache, memory, norm, fold)

`step` is the per-segment recurrent graph that is exported; `forward` splits a sequence into
segments of `segment_len` tokens from its start and loops `step`, which defines the logits that
every other path (ONNX Runtime, TensorRT, token-by-token decoding) must reproduce. `extend` and
`fold_cache` are the decoding path: tokens continue the current segment from a K/V cache of its
keys (rotated at their position) and values (cost O(segment length) per token; the graph only
reads the caches and returns the new rows), and a completed segment is folded into the memory
(keys rotated back first).

Per block: x += attn(norm(x)); x += mlp(norm(x)). Attention is local causal softmax attention
inside the segment (RoPE, positions restart at 0 in each segment) gated with a retrieval from
the compressive memory (un-rotated q), after which the segment's un-rotated keys and values
are written into the memory (retrieve, then update).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import memory_op, reference, rotary
from .cached_attention import cached_attention
from .config import InfiniConfig
from .split_attention import QUERY_BLOCKS


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """M and z are float32 whatever the weights' dtype (z grows with every token and overflows
    fp16); float64 weights keep a float64 state, for the reference."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


class Norm(nn.Module):
    """RMSNorm ('rms') or the L2 form ('l2': x / max(|x|, eps) * sqrt(d)), computed in fp32."""

    def __init__(self, dim: int, kind: str, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.kind, self.eps = kind, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if self.kind == "rms":
            h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)   # ORT fuses this form
        else:
            h = F.normalize(h, dim=-1, eps=self.eps) * math.sqrt(h.shape[-1])
        return self.weight * h.to(x.dtype)


def rope_tables(start: int, length: int, head_dim: int, theta: float, style: str,
                dtype: torch.dtype, device: torch.device):
    """cos, sin (length, head_dim) for positions start .. start+length-1."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=work, device=device) / head_dim)
    positions = torch.arange(length, dtype=work, device=device) + start
    angles = positions[:, None] * inv_freq[None, :]                  # (S, hd/2)
    if style == "half":
        angles = torch.cat((angles, angles), dim=-1)
    else:
        angles = angles.repeat_interleave(2, dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate x (..., S, hd) by the angles of cos/sin (S, hd)."""
    if style == "half":
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    else:
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos + rotated * sin


def rotate_at(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str,
              scale: float = 1.0, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate x (B, H, S, hd) to `positions` (B, S), rows of the tables cos, sin (P, hd), and
    scale it; without `positions` the tables' rows are positions 0 .. S-1. One
    RotaryEmbedding node in a graph exported at opset 23 or later (export/rotary.py)."""
    if rotary.emitting():
        if positions is None:
            b, _, s, _ = x.shape
            positions = torch.arange(s, device=x.device)[None].expand(b, s)
        cos, sin = (cos * scale, sin * scale) if scale != 1.0 else (cos, sin)
        return rotary.rotary(x, cos, sin, positions, style != "half")
    if positions is not None:
        cos, sin = cos[positions][:, None], sin[positions][:, None]       # (B, 1, S, hd)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return apply_rope(x, cos, sin, style)


def expand_kv(t: torch.Tensor, group: int) -> torch.Tensor:
    """(B, Hkv, T, d) -> (B, Hkv*group, T, d): query head h reads KV head h // group."""
    if group == 1:
        return t
    b, h, n, d = t.shape
    return t[:, :, None].expand(b, h, group, n, d).reshape(b, h * group, n, d)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     group: int) -> torch.Tensor:
    """Local causal softmax attention over one segment (eq 6): q (B, H, S, hd) rotated and
    already scaled by 1/sqrt(hd) (`Attention` scales the rotation tables, which spares a
    pass over q), rotated k and v (B, Hkv, S, hd) -> (B, H, S, hd).

    Eager PyTorch runs its fused kernel. While torch.onnx exports, it is one custom op
    (`exported_attention`) that the exporter writes into the graph in blocks of queries
    (export/split_attention.py): the plain-op form that torch.onnx writes for SDPA builds an
    S x S mask per layer and computes every score above the diagonal too; the split form
    computes fewer scores, and ran faster in ONNX Runtime than that form, opset 23's
    `Attention` and com.microsoft GroupQueryAttention
    (docs/design.md#causal-attention-in-blocks-of-queries).
    """
    if torch.onnx.is_in_onnx_export():
        return exported_attention(q, k, v, q.shape[-2], group, QUERY_BLOCKS)
    return F.scaled_dot_product_attention(q, expand_kv(k, group), expand_kv(v, group),
                                          is_causal=True, scale=1.0)


@torch.library.custom_op("infini_trt::causal_attention", mutates_args=())
def exported_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: int,
                       group: int, blocks: int) -> torch.Tensor:
    """eq 6 as one op for torch.export (`causal_attention`'s arguments, and `seq`, the
    segment length, and the number of query blocks, for the graph): torch.export traces it
    as one node of q's shape, and export/split_attention.py writes it into ONNX ops. Its
    eager value is `causal_attention`'s."""
    return F.scaled_dot_product_attention(q, expand_kv(k, group), expand_kv(v, group),
                                          is_causal=True, scale=1.0)


@exported_attention.register_fake
def _(q, k, v, seq, group, blocks):
    return torch.empty_like(q)


class PartedLinear(nn.Linear):
    """A linear layer whose output is used in parts (q/k/v, gate/up) -> a tuple of the parts.
    Eager PyTorch computes one product and the parts are views of it; the ONNX graphs get one
    product per part: splitting one product copies every part, and in ONNX Runtime those
    Split nodes cost more than separate products do
    (docs/design.md#one-product-per-projection-part)."""

    def __init__(self, in_features: int, sizes: list[int], bias: bool):
        super().__init__(in_features, sum(sizes), bias=bias)
        self.sizes = list(sizes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not torch.onnx.is_in_onnx_export():
            return super().forward(x).split(self.sizes, dim=-1)
        biases = self.bias.split(self.sizes) if self.bias is not None else [None] * len(self.sizes)
        return tuple(F.linear(x, w, b) for w, b in zip(self.weight.split(self.sizes), biases))


class Attention(nn.Module):
    """Local causal attention gated with the compressive memory (eq 7, 10, 11)."""

    def __init__(self, cfg: InfiniConfig):
        super().__init__()
        self.cfg = cfg
        hd, h, hkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        self.qkv_proj = PartedLinear(cfg.d_model, [h * hd, hkv * hd, hkv * hd], cfg.attn_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.attn_out_bias)
        self.beta = nn.Parameter(torch.full((cfg.n_heads,), float(cfg.gate_init)))

    def project(self, x: torch.Tensor):
        """x (B, S, d) -> raw q (B, H, S, hd), k and v (B, Hkv, S, hd)."""
        b, s, _ = x.shape
        hd = self.cfg.head_dim
        return tuple(part.view(b, s, -1, hd).transpose(1, 2) for part in self.qkv_proj(x))

    def combine(self, q: torch.Tensor, a_dot: torch.Tensor, memory: torch.Tensor,
                norm: torch.Tensor, heads_dim: int = 1) -> torch.Tensor:
        """Read M_{s-1} with the un-rotated queries (eq 7), gate it with the local attention
        a_dot (B, H, S, hd) (eq 10) and project the heads (eq 11) -> (B, S, d).

        heads_dim=2: q and a_dot are (B, S, H, hd), as the fused attention op gives them
        (`extend_in_place`); the gate mixes them there and only the retrieval's queries and
        result are transposed, so that with the retrieval skipped (the memory empty,
        export/empty_memory.py) no head is moved: two Transposes a layer fewer a token."""
        cfg = self.cfg
        rows = heads_dim == 2
        q_heads = q.transpose(1, 2) if rows else q
        b, h, s, hd = q_heads.shape
        hkv, group = cfg.n_kv_heads, cfg.group_size
        sigma_q = reference.sigma(q_heads.to(memory.dtype))                # state dtype
        sigma_q = sigma_q.reshape(b, hkv, group * s, hd)                    # grouped by KV head
        a_mem = reference.retrieve(sigma_q, memory, norm, cfg.memory_eps)   # eq 7
        a_mem = a_mem.reshape(b, h, s, hd).to(a_dot.dtype)
        if rows:
            a_mem = a_mem.transpose(1, 2)
        present = reference.memory_present(norm, group) if cfg.empty_memory == "bypass" else None
        a = reference.gate(a_mem, a_dot, self.beta.to(a_dot.dtype), present,  # eq 10
                           heads_dim)
        if not rows:
            a = a.transpose(1, 2)
        return self.o_proj(a.reshape(b, s, h * hd))                          # eq 11

    def forward(self, x: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]):
        """One segment. x (B, S, d); memory (B, Hkv, dk, dv); norm (B, Hkv, dk); rope: cos,
        sin (S, hd) for positions 0 .. S-1.

        Returns (out (B, S, d), k, v): k and v (B, Hkv, S, hd) are the raw keys and values of
        the segment, for the memory update.
        """
        group, style = self.cfg.group_size, self.cfg.rope_style
        q, k, v = self.project(x)
        cos, sin = rope
        scale = self.cfg.head_dim ** -0.5                 # in the tables: no pass over q
        q_rot = rotate_at(q, cos, sin, style, scale)
        k_rot = rotate_at(k, cos, sin, style)
        a_dot = causal_attention(q_rot, k_rot, v, group)                     # eq 6
        return self.combine(q, a_dot, memory, norm), k, v

    def extend(self, x: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor,
               rope: tuple[torch.Tensor, torch.Tensor], k_cache: torch.Tensor,
               v_cache: torch.Tensor, start: torch.Tensor):
        """Continue a segment from a cache (decoding). x (B, S, d): tokens at segment positions
        start .. start+S-1; k_cache (B, Hkv, hd, W): the rotated keys of slots 0 .. start-1,
        transposed; v_cache (B, Hkv, W, hd); rope: cos, sin (N, hd) for positions 0 .. N-1.
        The caches are only read, and only their first W slots are given: any W from the
        largest start up to N (slots >= start are ignored).

        Returns (out (B, S, d), k_new, v_new): the new tokens' rotated keys and values
        (B, Hkv, S, hd), for the caller to write into the caches (`write_cache`). Each token
        attends to the cache and to the new tokens up to itself: two matmuls over the cache as
        it lies, no copy of it, one softmax over both (eq 6).
        """
        cfg = self.cfg
        group, style = cfg.group_size, cfg.rope_style
        q, k, v = self.project(x)
        b, h, s, hd = q.shape
        hkv, n = cfg.n_kv_heads, v_cache.shape[2]
        cos, sin = rope
        positions = (start[:, None] + torch.arange(s, device=x.device)).clamp(
            max=cfg.segment_len - 1)
        k_new = rotate_at(k, cos, sin, style, positions=positions)          # (B, Hkv, S, hd)
        # scaled in the tables: with a Mul on q, ONNX Runtime fuses the scale into the matmul
        # over the cached keys (com.microsoft FusedMatMul), which reads the caches slower than
        # a plain MatMul with one query row per head
        # (docs/design.md#the-query-scale-in-the-rotation-tables)
        q_rot = rotate_at(q, cos, sin, style, hd ** -0.5, positions)
        q_rot = q_rot.reshape(b, hkv, group * s, hd)                       # grouped by KV head
        old = torch.arange(n, device=x.device)[None, :] < start[:, None]    # (B, N)
        new_token = torch.arange(s, device=x.device)
        causal = (new_token[None, :] <= new_token[:, None]).repeat(group, 1)   # (G*S, S)
        # masks added to the scores (0 or the dtype's minimum), made at their own small
        # shapes: a Where over the scores is much slower for a prompt's many tokens
        # (docs/design.md#causal-attention-in-blocks-of-queries)
        zero = torch.zeros((), dtype=q_rot.dtype, device=x.device)
        neg = torch.finfo(q_rot.dtype).min
        scores_old = q_rot @ k_cache + zero.masked_fill(~old[:, None, None, :], neg)
        scores_new = q_rot @ k_new.transpose(-1, -2) + zero.masked_fill(~causal, neg)
        weights = torch.softmax(torch.cat((scores_old, scores_new), dim=-1).float(), dim=-1)
        weights = weights.to(v.dtype)
        a_dot = weights[..., :n] @ v_cache + weights[..., n:] @ v          # (B, Hkv, G*S, hd)
        a_dot = a_dot.reshape(b, h, s, hd)
        return self.combine(q, a_dot, memory, norm), k_new, v

    def extend_in_place(self, x: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor,
                        rope: tuple[torch.Tensor, torch.Tensor], k_cache: torch.Tensor,
                        v_cache: torch.Tensor, start: torch.Tensor, length: torch.Tensor):
        """`extend` for the ONNX Runtime-only decoding graph (export/cached_attention.py):
        k_cache and v_cache (B, Hkv, N, hd), the rotated keys and values of slots < start;
        of the tokens x (B, S, d), the first length[b] are real. The local attention is one
        op that writes the real tokens' rows into the caches and reads them there.

        Returns (out (B, S, d), k_cache_out, v_cache_out): the caches with the rows written."""
        cfg = self.cfg
        b, s, _ = x.shape
        # one product for q, k and v (the op takes them packed): one GEMV a token instead
        # of three (docs/design.md#decoding-attention-as-one-node)
        qkv = F.linear(x, self.qkv_proj.weight, self.qkv_proj.bias)
        q = qkv[..., :cfg.n_heads * cfg.head_dim]
        cos, sin = rope
        positions = (start[:, None] + torch.arange(s, device=x.device)).clamp(
            max=cfg.segment_len - 1)
        a_dot, k_cache, v_cache = cached_attention(
            qkv, k_cache, v_cache, start, length, positions, cos, sin, cfg.n_heads,
            cfg.n_kv_heads, cfg.rope_style == "interleaved", cfg.head_dim ** -0.5)
        a_dot = a_dot.view(b, s, cfg.n_heads, cfg.head_dim)
        q = q.view(b, s, cfg.n_heads, cfg.head_dim)
        return self.combine(q, a_dot, memory, norm, heads_dim=2), k_cache, v_cache


class MLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: InfiniConfig):
        super().__init__()
        self.gate_up_proj = PartedLinear(cfg.d_model, [cfg.ffn_dim] * 2, cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.mlp_bias)
        self.activation = cfg.ffn_activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x)
        if self.activation == "silu":
            gate = F.silu(gate)
        else:
            gate = F.gelu(gate, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.down_proj(gate * up)


class Block(nn.Module):
    def __init__(self, cfg: InfiniConfig):
        super().__init__()
        self.attn_norm = Norm(cfg.d_model, cfg.norm_kind, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = Norm(cfg.d_model, cfg.norm_kind, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, memory, norm, rope):
        """One segment -> (x, k, v): the block's output and the segment's raw keys/values."""
        a, k, v = self.attn(self.attn_norm(x), memory, norm, rope)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), k, v

    def extend(self, x, memory, norm, rope, k_cache, v_cache, start):
        """Continue a segment from a cache -> (x, k_new, v_new)."""
        a, k_new, v_new = self.attn.extend(self.attn_norm(x), memory, norm, rope, k_cache,
                                           v_cache, start)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), k_new, v_new

    def extend_in_place(self, x, memory, norm, rope, k_cache, v_cache, start, length):
        """Continue a segment from caches that the attention writes -> (x, k_cache_out,
        v_cache_out); see `Attention.extend_in_place`."""
        a, k_cache, v_cache = self.attn.extend_in_place(self.attn_norm(x), memory, norm, rope,
                                                        k_cache, v_cache, start, length)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), k_cache, v_cache


class InfiniLM(nn.Module):
    """The decoder LM. State is data: (memory, norm) go in and come out of every call."""

    def __init__(self, cfg: InfiniConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = Norm(cfg.d_model, cfg.norm_kind, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    # ----------------------------------------------------------------------------- state
    @property
    def state_dtype(self) -> torch.dtype:
        return state_dtype(self.embed.weight.dtype)

    def init_state(self, batch: int, device: torch.device | str | None = None):
        """M_0 = 0, z_0 = 0: memory (L, B, Hkv, dk, dv) and norm (L, B, Hkv, dk)."""
        device = self.embed.weight.device if device is None else device
        memory = torch.zeros(self.cfg.memory_shape(batch), dtype=self.state_dtype, device=device)
        norm = torch.zeros(self.cfg.norm_shape(batch), dtype=self.state_dtype, device=device)
        return memory, norm

    # ----------------------------------------------------------------------------- graphs
    # Each graph is made of these pieces alone: the embedding, one call per layer, the LM
    # head. The stamping exporter (export/stamp.py) traces each piece once and repeats the
    # layer's per layer, so a graph computes nothing outside them.
    def rope(self, length: int, dtype: torch.dtype, device: torch.device):
        """cos, sin (length, hd) for segment positions 0 .. length-1, shared by all layers."""
        cfg = self.cfg
        return rope_tables(0, length, cfg.head_dim, cfg.rope_theta, cfg.rope_style, dtype,
                           device)

    def embed_segment(self, input_ids: torch.Tensor):
        """input_ids (B, S) -> (x (B, S, d), rope for positions 0 .. S-1)."""
        x = self.embed(input_ids)
        return x, self.rope(input_ids.shape[1], x.dtype, x.device)

    def layer_step(self, i: int, x: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor,
                   rope: tuple[torch.Tensor, torch.Tensor]):
        """Layer i over one segment: x (B, S, d), its memory (B, Hkv, dk, dv) and norm
        (B, Hkv, dk) -> (x, memory_out, norm_out): the block, then the segment's raw keys and
        values written into the memory (eq 8 or 9; retrieve, then update)."""
        x, k, v = self.layers[i](x, memory, norm, rope)
        memory_out, norm_out = memory_op.memory_update(memory, norm, k, v, self.cfg.update_rule,
                                                       self.cfg.memory_eps, layer=i)
        return x, memory_out, norm_out

    def layer_extend(self, i: int, x: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor,
                     rope: tuple[torch.Tensor, torch.Tensor], k_cache: torch.Tensor,
                     v_cache: torch.Tensor, start: torch.Tensor):
        """Layer i continuing a segment from its caches -> (x, k_new, v_new); see `extend`."""
        return self.layers[i].extend(x, memory, norm, rope, k_cache, v_cache, start)

    def layer_extend_in_place(self, i: int, x: torch.Tensor, memory: torch.Tensor,
                              norm: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                              k_cache: torch.Tensor, v_cache: torch.Tensor, start: torch.Tensor,
                              length: torch.Tensor):
        """Layer i continuing a segment from caches it writes -> (x, k_cache_out,
        v_cache_out); see `extend_in_place`."""
        return self.layers[i].extend_in_place(x, memory, norm, rope, k_cache, v_cache, start,
                                              length)

    def layer_fold(self, i: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   memory: torch.Tensor, norm: torch.Tensor, fold: torch.Tensor,
                   rope: tuple[torch.Tensor, torch.Tensor]):
        """Layer i's full segment in its caches, k_cache (B, Hkv, hd, N) and v_cache
        (B, Hkv, N, hd), written into its memory where fold[b] is true -> (memory_out,
        norm_out). The cached keys are rotated back (by minus their angle) first: one
        RotaryEmbedding node at opset 23, where `apply_rope` makes six passes over them (the
        fold of a 1K segment of `small`: 2.8 ms of ONNX Runtime kernels against 12.5; Intel
        Xeon, 2 threads, 2026-12-07)."""
        cos, sin = rope
        keys = rotate_at(k_cache.transpose(-1, -2), cos, -sin, self.cfg.rope_style)
        memory_new, norm_new = memory_op.memory_update(memory, norm, keys, v_cache,
                                                       self.cfg.update_rule,
                                                       self.cfg.memory_eps, layer=i)
        mask = fold.to(torch.bool)
        return (torch.where(mask[:, None, None, None], memory_new, memory),
                torch.where(mask[:, None, None], norm_new, norm))

    def head_logits(self, x: torch.Tensor, last_only: bool = False,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
        """The final norm and LM head: x (B, S, d) -> logits (B, S, V), or (B, V) of the last
        token with last_only, or (B, R, V) of the tokens rows (B, R) (indices into S)."""
        if last_only:      # kept 3-D: the LM head is then the MatMul of the other graphs, on
            # the same transposed weight (one copy in the export's weights file), not a Gemm
            return self.lm_head(self.final_norm(x[:, -1:]))[:, 0]
        if rows is not None:
            x = torch.gather(x, 1, rows[:, :, None].expand(-1, -1, x.shape[-1]))
        return self.lm_head(self.final_norm(x))

    def step(self, input_ids: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor,
             last_only: bool = False):
        """One segment: input_ids (B, S) with S <= segment_len, memory (L, B, Hkv, dk, dv),
        norm (L, B, Hkv, dk) -> (logits (B, S, V), memory_out, norm_out).

        last_only: logits of the last token only, (B, V): a prompt being read needs no
        others, and the LM head is a third of a segment's FLOPs at a 32K vocabulary."""
        x, rope = self.embed_segment(input_ids)
        memories, norms = [], []
        for i in range(self.cfg.n_layers):
            x, m, z = self.layer_step(i, x, memory[i], norm[i], rope)
            memories.append(m)
            norms.append(z)
        return self.head_logits(x, last_only), torch.stack(memories), torch.stack(norms)

    # ------------------------------------------------------------------------- decoding
    def extend(self, input_ids: torch.Tensor, start: torch.Tensor, memory: torch.Tensor,
               norm: torch.Tensor, k_caches, v_caches, logit_rows: torch.Tensor | None = None):
        """Continue the current segment of each sequence from its caches (decoding).

        input_ids (B, S): tokens at segment positions start[b] .. start[b]+S-1 (start + S may
        pass N only for padding, whose outputs mean nothing); memory/norm are read, not
        written; k_caches, v_caches: per layer (B, Hkv, hd, W) and (B, Hkv, W, hd), read only:
        the first W slots of the segment, max(start) <= W <= N (runtime/kv_cache.py: `cache_window`).
        -> (logits (B, S, V), k_new, v_new (L, B, Hkv, S, hd)): the new tokens' rotated keys
        and values, which the caller puts into its caches (`write_cache`). Decoding is S = 1.
        logit_rows (B, R): the logits of those tokens only (indices into S), (B, R, V).
        """
        x = self.embed(input_ids)
        rope = self.rope(self.cfg.segment_len, x.dtype, x.device)
        k_out, v_out = [], []
        for i in range(self.cfg.n_layers):
            x, k, v = self.layer_extend(i, x, memory[i], norm[i], rope, k_caches[i],
                                        v_caches[i], start)
            k_out.append(k)
            v_out.append(v)
        return (self.head_logits(x, rows=logit_rows), torch.stack(k_out),
                torch.stack(v_out))

    def extend_in_place(self, input_ids: torch.Tensor, start: torch.Tensor,
                        length: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor,
                        k_caches, v_caches, logit_rows: torch.Tensor | None = None):
        """`extend` as the ONNX Runtime-only decoding graph computes it
        (export/cached_attention.py): k_caches and v_caches per layer (B, Hkv, N, hd), both
        in the values' layout; of input_ids (B, S) the first length[b] are real.
        -> (logits, k_caches_out, v_caches_out): the caches (lists, per layer) with the real
        tokens' rotated keys and values written at their positions."""
        x = self.embed(input_ids)
        rope = self.rope(self.cfg.segment_len, x.dtype, x.device)
        k_out, v_out = [], []
        for i in range(self.cfg.n_layers):
            x, k, v = self.layer_extend_in_place(i, x, memory[i], norm[i], rope, k_caches[i],
                                                 v_caches[i], start, length)
            k_out.append(k)
            v_out.append(v)
        return self.head_logits(x, rows=logit_rows), k_out, v_out

    def fold_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor, memory: torch.Tensor,
                   norm: torch.Tensor, fold: torch.Tensor):
        """Write each full segment held in the caches (`kv_cache.empty_caches` layout) into memory, where
        fold[b] is true (others keep their state) -> (memory_out, norm_out). The memory takes
        un-rotated keys: the cached ones are rotated back (by minus their angle) first."""
        rope = self.rope(self.cfg.segment_len, k_cache.dtype, k_cache.device)
        memories, norms = [], []
        for i in range(self.cfg.n_layers):
            m, z = self.layer_fold(i, k_cache[i], v_cache[i], memory[i], norm[i], fold, rope)
            memories.append(m)
            norms.append(z)
        return torch.stack(memories), torch.stack(norms)

    def forward(self, input_ids: torch.Tensor, memory: torch.Tensor | None = None,
                norm: torch.Tensor | None = None):
        """The semantics of a sequence: input_ids (B, T) split into segments of N tokens from
        its start (the last may be partial), each run by `step` on the state the previous one
        left. -> (logits (B, T, V), memory, norm)."""
        if memory is None or norm is None:
            memory, norm = self.init_state(input_ids.shape[0], input_ids.device)
        outputs = []
        for segment in input_ids.split(self.cfg.segment_len, dim=1):
            logits, memory, norm = self.step(segment, memory, norm)
            outputs.append(logits)
        return torch.cat(outputs, dim=1), memory, norm


def init_weights(model: InfiniLM, seed: int) -> InfiniLM:
    """Random weights, reproducible from `seed`: normal(0, 0.02) for projections and
    embeddings, residual output projections scaled by 1/sqrt(2L), norms 1, beta = gate_init."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("beta"):
                p.fill_(cfg.gate_init)
            elif "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                std = 0.02
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    std /= math.sqrt(2 * cfg.n_layers)
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
    return model
