"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

Small pure functions on (B, V) float logits; randomness only through the torch.Generator that
the caller seeds, so that a seed reproduces a generation exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from infini_trt.export.errors import InfiniTrtError


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0                    # 0: no top-k
    top_p: float = 1.0                # 1: no nucleus filtering
    repetition_penalty: float = 1.0   # 1: none; > 1 discourages tokens already in the text
    seed: int | None = None
    eos_id: int | None = None
    stop: tuple[str, ...] = ()        # stop strings (need a tokenizer to decode)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise InfiniTrtError("max_new_tokens must be at least 1")
        if not self.greedy and self.temperature <= 0:
            raise InfiniTrtError("temperature must be positive (or use greedy decoding)")
        if self.top_k < 0:
            raise InfiniTrtError("top_k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise InfiniTrtError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise InfiniTrtError("repetition_penalty must be positive")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """CTRL-style penalty: for tokens seen (B, V bool), divide positive logits by `penalty`
    and multiply negative ones by it."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row, -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs          # mass of strictly better tokens
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,)."""
    logits = apply_repetition_penalty(logits.float(), seen, cfg.repetition_penalty)
    if cfg.greedy:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / cfg.temperature, cfg.top_k), cfg.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
