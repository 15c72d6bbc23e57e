"""Training data for the bundled passkey model: the word-level tokenizer and seeded batches.

The prompts themselves come from `infini_trt.runtime.passkey_data` (the same generator the
`infini-trt passkey` evaluation uses); this file adds what only training needs: the tokenizer
file, the loss weights, and the per-segment write weights of the long-context augmentation
(see `parallel.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from infini_trt.runtime.passkey_data import (ANSWER_TOKEN, KEY_TOKEN, UNKNOWN, PasskeyGenerator,
                                             vocabulary)


def build_tokenizer():
    """A `tokenizers` WordLevel tokenizer over the task's words, digits split one per token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)   # words joined by spaces
    return tok


def save_tokenizer(path: str | Path) -> Path:
    build_tokenizer().save(str(path))
    return Path(path)


def generator(segment_len: int) -> PasskeyGenerator:
    tok = build_tokenizer()
    return PasskeyGenerator(lambda text: tok.encode(text, add_special_tokens=False).ids,
                            segment_len)


@dataclass
class Batch:
    ids: torch.Tensor            # (B, T) int64 inputs
    targets: torch.Tensor        # (B, T) int64 next tokens (-100 where none)
    answer: torch.Tensor         # (B, T) bool: the target is an answer digit
    lm_mask: torch.Tensor        # (B, T) bool: the target counts in the LM loss
    write_weights: torch.Tensor  # (B, T) float: how many times each token's write counts


def make_batch(gen: PasskeyGenerator, rng: np.random.Generator, count: int, length: int,
               weights: tuple[float, float] = (1.0, 1.0), weight: float | None = None) -> Batch:
    """`count` prompts of `length` tokens (a multiple of segment_len), random keys and depths.

    Every token but the key sentence's gets one write weight per sequence, log-uniform in
    `weights` (lo, hi): with hi = 10,000 the memory carries as much filler as a sequence
    10,000 times longer; lo, hi < 1 make the key stand out. The first occurrence of the key's
    digits is random, so it is kept out of the LM loss. A given `weight` replaces the random
    one (evaluation).
    """
    prompts = gen.batch(rng, count, length)
    ids = np.stack([p.ids for p in prompts])
    kinds = np.stack([p.kinds for p in prompts])
    targets = np.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    target_kinds = np.full_like(kinds, 255)
    target_kinds[:, :-1] = kinds[:, 1:]
    answer = target_kinds == ANSWER_TOKEN
    lm_mask = (targets >= 0) & ~answer
    for row, p in enumerate(prompts):             # the key's first digits: unpredictable
        digits = p.key_start + 4                  # "The pass key is" precede them
        lm_mask[row, digits - 1:digits - 1 + len(p.key)] = False
    if weight is None:
        lo, hi = np.log(weights[0]), np.log(weights[1])
        weight = np.exp(rng.uniform(lo, hi, size=(count, 1)))
    write_weights = np.where(kinds == KEY_TOKEN, 1.0, weight)
    assert (kinds == KEY_TOKEN).any(axis=1).all()
    as_t = torch.from_numpy
    return Batch(as_t(ids), as_t(targets), as_t(answer), as_t(lm_mask),
                 as_t(write_weights).float())
