"""The peers that `bench` runs beside Infini-attention, behind the runner contract so that the
same prefill/decode loop times them all.

- `FullAttentionRunner`: the quadratic baseline, a transformer of the same size (the same
  weights: embedding, projections, MLP, head) whose attention reads every earlier token of the
  whole context from a growing K/V cache (rotated keys, RoPE at absolute positions), with no
  compressive memory. Prefill cost per token and cache memory grow with the context.
- `LucidrainsRunner`: `infini-transformer-pytorch` (lucidrains) eager, what a user of that
  package runs today, at the same shape in its own conventions (random weights: only its
  speed is measured). Prefill is its segment loop with `return_new_memories=True`; decoding
  follows its `generate`: one token per call against its K/V cache, memories compressed when
  a segment completes.

Both take equal-length batches only (that is what `bench` feeds them).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from infini_trt.export.config import InfiniConfig
from infini_trt.export.errors import InputError, MissingDependencyError
from infini_trt.export.model import InfiniLM, apply_rope, rope_tables

from .runners.base import Runner, select_rows


def _equal_lengths(ids: np.ndarray, length: np.ndarray, who: str) -> None:
    if not (length == ids.shape[1]).all():
        raise InputError(f"the {who} baseline takes equal-length batches without padding")


class FullAttentionRunner(Runner):
    """Full causal attention over the whole context with a K/V cache of `capacity` tokens."""

    backend = "full-attention"

    def __init__(self, model: InfiniLM, capacity: int, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        self.config, self.capacity = model.cfg, capacity
        self.device = torch.device(device)
        self.dtype = str(model.embed.weight.dtype).removeprefix("torch.")
        self.k_cache = self.v_cache = None

    @property
    def description(self) -> str:
        return f"full-attention KV cache, torch ({self.dtype})"

    def _reset(self, batch: int) -> None:
        cfg = self.config
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, self.capacity, cfg.head_dim)
        weight = self.model.embed.weight
        self.k_cache = self.v_cache = None       # release the old caches first
        # empty, not zeros: pages are touched (and counted in RSS) as the context grows
        self.k_cache = torch.empty(shape, dtype=weight.dtype, device=self.device)
        self.v_cache = torch.empty(shape, dtype=weight.dtype, device=self.device)
        self.length = 0

    @torch.inference_mode()
    def _forward(self, ids: np.ndarray, last_only: bool = False) -> torch.Tensor:
        """Tokens at positions length .. length+S-1 -> logits (B, S, V), or (B, V) of the
        last token if last_only; extends the cache."""
        cfg, model = self.config, self.model
        pos, s = self.length, ids.shape[1]
        if pos + s > self.capacity:
            raise InputError(f"the full-attention cache holds {self.capacity} tokens")
        x = model.embed(torch.from_numpy(ids).to(self.device))
        cos, sin = rope_tables(pos, s, cfg.head_dim, cfg.rope_theta, cfg.rope_style, x.dtype,
                               x.device)
        mask = None
        if s > 1:                                    # query i sees keys 0 .. pos + i
            keys = torch.arange(pos + s, device=x.device)
            mask = keys[None, :] <= (pos + torch.arange(s, device=x.device))[:, None]
        for i, block in enumerate(model.layers):
            attn = block.attn
            q, k, v = attn.project(block.attn_norm(x))           # (B, H|Hkv, S, hd)
            self.k_cache[i, :, :, pos:pos + s] = apply_rope(k, cos, sin, cfg.rope_style)
            self.v_cache[i, :, :, pos:pos + s] = v
            a = F.scaled_dot_product_attention(
                apply_rope(q, cos, sin, cfg.rope_style), self.k_cache[i, :, :, :pos + s],
                self.v_cache[i, :, :, :pos + s], attn_mask=mask,
                enable_gqa=cfg.group_size > 1)
            x = x + attn.o_proj(a.transpose(1, 2).reshape(x.shape[0], s, -1))
            x = x + block.mlp(block.mlp_norm(x))
        self.length += s
        if last_only:
            x = x[:, -1]
        return model.lm_head(model.final_norm(x)).float()

    def _step(self, ids: np.ndarray) -> torch.Tensor:
        return self._forward(ids)

    def _advance(self, ids: np.ndarray) -> torch.Tensor:
        return self._forward(ids, last_only=True)

    def _extend(self, ids: np.ndarray, start: np.ndarray, length: np.ndarray,
                rows: np.ndarray) -> torch.Tensor:
        _equal_lengths(ids, length, "full-attention")
        return select_rows(self._forward(ids), rows)

    def _fold(self, mask: np.ndarray) -> None:
        """Nothing to fold: the cache keeps every token."""


def lucidrains_shape(cfg: InfiniConfig) -> dict:
    """InfiniTransformer keyword arguments for the shape of `cfg`: its feed-forward width is
    int(ff_mult * dim * 2/3), and it has no grouped-query attention (one K/V head per head)."""
    return {"num_tokens": cfg.vocab_size, "dim": cfg.d_model, "depth": cfg.n_layers,
            "dim_head": cfg.head_dim, "heads": cfg.n_heads,
            "ff_mult": cfg.ffn_dim * 3 / (2 * cfg.d_model),
            "use_mem_delta_rule": cfg.update_rule == "delta"}


class LucidrainsRunner(Runner):
    """`infini_transformer_pytorch.InfiniTransformer` eager, at the shape of `cfg`."""

    backend = "infini-transformer-pytorch"

    def __init__(self, cfg: InfiniConfig, seed: int = 0, device: str | torch.device = "cpu"):
        try:
            from infini_transformer_pytorch import InfiniTransformer
        except ImportError:
            raise MissingDependencyError("infini-transformer-pytorch", "the lucidrains peer",
                                         "pip install infini-transformer-pytorch") from None
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.model = InfiniTransformer(**lucidrains_shape(cfg)).to(self.device).eval()
        self.config, self.dtype = cfg, "float32"
        self.parameters = sum(p.numel() for p in self.model.parameters())

    @property
    def description(self) -> str:
        return "infini-transformer-pytorch eager (float32)"

    def _reset(self, batch: int) -> None:
        self.memories = self.cached_kv = self.pending = None

    def _tokens(self, ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(ids).to(self.device)

    @torch.inference_mode()
    def _step(self, ids: np.ndarray) -> torch.Tensor:
        logits, _, self.memories = self.model(self._tokens(ids), past_memories=self.memories,
                                              return_new_memories=True)
        self.cached_kv = None
        return logits.float()

    @torch.inference_mode()
    def _extend(self, ids: np.ndarray, start: np.ndarray, length: np.ndarray,
                rows: np.ndarray) -> torch.Tensor:
        _equal_lengths(ids, length, "infini-transformer-pytorch")
        if self.cached_kv is not None and ids.shape[1] != 1:
            raise InputError("infini-transformer-pytorch continues a cache one token at a time")
        completes = bool((start + length == self.config.segment_len).all())
        logits, cached_kv, memories = self.model(
            self._tokens(ids), cached_kv=self.cached_kv, past_memories=self.memories,
            return_new_memories=completes)
        if completes:                            # its generate(): compress, drop the cache
            self.pending, self.cached_kv = memories, None
        else:
            self.cached_kv = cached_kv
        return select_rows(logits.float(), rows)

    def _fold(self, mask: np.ndarray) -> None:
        if not mask.all() or self.pending is None:
            raise InputError("infini-transformer-pytorch folds whole batches at a segment end")
        self.memories, self.pending = self.pending, None
