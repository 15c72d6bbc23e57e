"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

Small pure functions on (B, V) float numpy logits; randomness only through the
numpy Generator that the caller seeds, so that a seed reproduces a generation exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray | None,
                             penalty: float) -> np.ndarray:
    """CTRL-style penalty: for tokens seen (B, V bool), divide positive logits by `penalty`
    and multiply negative ones by it."""
    if penalty == 1.0:
        return logits
    penalized = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen, penalized, logits)


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits of each row, -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[..., -k, None]        # each row's k-th largest
    return np.where(logits < kth, -np.inf, logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Over the last axis, in float64 (-inf logits get probability 0)."""
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of tokens whose probability mass reaches p (at least one)."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, axis=-1, kind="stable")
    probs = softmax(np.take_along_axis(logits, order, axis=-1))
    mass_before = np.cumsum(probs, axis=-1) - probs           # mass of strictly better tokens
    drop = np.empty(logits.shape, dtype=bool)
    np.put_along_axis(drop, order, mass_before >= p, axis=-1)
    return np.where(drop, -np.inf, logits)


def next_tokens(logits: np.ndarray, cfg: SamplingConfig, seen: np.ndarray | None,
                generator: np.random.Generator | None) -> np.ndarray:
    """logits (B, V) -> token ids (B,) int64. Sampling draws one uniform number per row from
    `generator` (a fresh, unseeded one if None) and takes the token where the cumulative
    probability first reaches it."""
    logits = apply_repetition_penalty(np.asarray(logits, dtype=np.float32), seen,
                                      cfg.repetition_penalty)
    if cfg.greedy:
        return logits.argmax(axis=-1)
    logits = top_p_filter(top_k_filter(logits / cfg.temperature, cfg.top_k), cfg.top_p)
    cumulative = np.cumsum(softmax(logits), axis=-1)
    rng = generator if generator is not None else np.random.default_rng()
    # in (0, 1], so that the token reached has a probability above 0
    target = (1.0 - rng.random(logits.shape[0]))[:, None] * cumulative[:, -1:]
    return np.minimum((cumulative < target).sum(axis=-1), logits.shape[-1] - 1)
