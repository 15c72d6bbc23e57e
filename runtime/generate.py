"""Generation: prefill a batch of prompts of any lengths, then decode token by token.

Prefill streams the prompts segment by segment: full segments that all prompts share go
through the prefill graph (the segment step with the last token's logits only, `advance`); the
rest of each prompt continues through the K/V cache (`extend`) with completed segments folded
into memory (`fold`). Decoding then feeds one token per
sequence per call: the cost of a token is O(segment length), whatever the context length, and
memory stays constant. The logits equal those of the sequence forward (tests/runtime).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from infini_trt.export.errors import InfiniTrtError, InputError

from .loop import progress_bar
from .resources import peak_rss_bytes
from .runners.base import Runner
from .sampling import SamplingConfig, next_tokens
from .text_stream import TextStream


@dataclass
class Sequence:
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str = "length"          # "length" | "eos" | "stop"


@dataclass
class GenerationResult:
    backend: str
    sequences: list[Sequence]
    prefill_seconds: float
    time_to_first_token: float
    decode_seconds: float
    decoded_tokens: int                   # tokens produced by decode steps (after the first)
    peak_rss_mb: float

    @property
    def prompt_tokens(self) -> int:
        return sum(s.prompt_tokens for s in self.sequences)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decoded_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def to_dict(self) -> dict:
        return {"backend": self.backend, "sequences": [asdict(s) for s in self.sequences],
                "timings": {"prefill_s": self.prefill_seconds,
                            "prefill_tokens_per_s": self.prefill_tokens_per_s,
                            "time_to_first_token_s": self.time_to_first_token,
                            "decode_s": self.decode_seconds,
                            "decode_tokens_per_s": self.decode_tokens_per_s},
                "peak_rss_mb": self.peak_rss_mb}


def prefill(runner: Runner, prompts: list[np.ndarray], progress: bool | None = None
            ) -> tuple[torch.Tensor, np.ndarray]:
    """Run every prompt into the runner's state and caches.

    -> (logits of each prompt's last token (B, V), segment position of each sequence (B,)).
    """
    n = runner.config.segment_len
    batch = len(prompts)
    lengths = np.array([len(p) for p in prompts])
    if (lengths < 1).any():
        raise InputError("every prompt needs at least one token")
    runner.reset(batch)
    last = [None] * batch
    shared = int(lengths.min()) // n                       # full segments every prompt has
    with progress_bar(int(lengths.sum()), "prefill", progress) as bar:
        if shared:
            common = np.stack([p[:shared * n] for p in prompts])
        for r in range(shared):
            logits = runner.advance(common[:, r * n:(r + 1) * n])      # last token's only
            bar.update(batch * n)
            for b in np.flatnonzero(lengths == (r + 1) * n):
                last[b] = logits[b]
        done = np.full(batch, shared * n)
        position = np.zeros(batch, dtype=np.int64)
        while (done < lengths).any():
            take = np.minimum(lengths - done, n - position)
            ids = np.zeros((batch, int(take.max())), dtype=np.int64)
            for b in range(batch):
                ids[b, :take[b]] = prompts[b][done[b]:done[b] + take[b]]
            logits = runner.extend(ids, position, take)
            bar.update(int(take.sum()))
            done += take
            for b in np.flatnonzero((take > 0) & (done == lengths)):
                last[b] = logits[b, take[b] - 1]
            position += take
            full = position == n
            runner.fold(full)
            position[full] = 0
    return torch.stack(last), position


def generate(runner: Runner, prompts: list[list[int]] | list[np.ndarray], cfg: SamplingConfig,
             tokenizer=None, on_text: Callable[[int, str], None] | None = None,
             progress: bool | None = None) -> GenerationResult:
    """Generate up to cfg.max_new_tokens for each prompt (token ids), batched.

    With a tokenizer, `on_text(b, text)` is called with each piece of sequence b's text as it
    becomes final (streaming; `text_stream.TextStream`): the pieces add up to the sequence's
    `text`. Stops a sequence at cfg.eos_id or where a stop string appears (the text ends
    before it)."""
    if cfg.stop and tokenizer is None:
        raise InputError("stop strings need a tokenizer")
    prompts = [np.asarray(p, dtype=np.int64) for p in prompts]
    vocab = runner.config.vocab_size
    for p in prompts:
        if p.size and (p.min() < 0 or p.max() >= vocab):
            raise InputError(f"prompt token ids must be in [0, {vocab})")
    batch = len(prompts)
    n = runner.config.segment_len
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    sequences = [Sequence(prompt_tokens=len(p)) for p in prompts]
    streams = [TextStream(tokenizer, cfg.stop) if tokenizer is not None else None
               for _ in prompts]

    def emit(b: int, text: str) -> None:
        if text and on_text is not None:
            on_text(b, text)

    t0 = time.perf_counter()
    logits, position = prefill(runner, prompts, progress)
    t_prefill = time.perf_counter() - t0
    _check_finite(logits, runner, "the prompt")
    seen = torch.zeros((batch, vocab), dtype=torch.bool, device=logits.device)
    if cfg.repetition_penalty != 1.0:
        for b, p in enumerate(prompts):
            seen[b, torch.from_numpy(p).to(logits.device)] = True
    active = np.ones(batch, dtype=bool)
    ttft, t_decode, decoded = 0.0, time.perf_counter(), 0
    for i in range(cfg.max_new_tokens):
        tokens = next_tokens(logits, cfg, seen, generator)
        if i == 0:
            ttft = time.perf_counter() - t0
            t_decode = time.perf_counter()
        else:
            decoded += int(active.sum())
        tokens_np = tokens.cpu().numpy()
        for b in np.flatnonzero(active):
            token = int(tokens_np[b])
            sequences[b].token_ids.append(token)
            seen[b, token] = True
            if streams[b] is not None:
                emit(int(b), streams[b].push(token))
            reason = ("eos" if cfg.eos_id is not None and token == cfg.eos_id else
                      "stop" if streams[b] is not None and streams[b].stopped else None)
            if reason:
                sequences[b].finish_reason = reason
                active[b] = False
        if not active.any() or i == cfg.max_new_tokens - 1:
            break
        ids = np.where(active, tokens_np, 0)[:, None].astype(np.int64)
        logits = runner.extend(ids, position, active.astype(np.int64))[:, 0]
        _check_finite(logits, runner, f"decoded token {i + 1}")
        position += active
        full = position == n
        runner.fold(full)
        position[full] = 0
    t_end = time.perf_counter()
    for b, (sequence, stream) in enumerate(zip(sequences, streams)):
        if stream is not None:
            emit(b, stream.finish())
            sequence.text = stream.text
    return GenerationResult(runner.description, sequences, t_prefill, ttft,
                            t_end - t_decode if decoded else 0.0, decoded,
                            peak_rss_bytes() / 2**20)


def _check_finite(logits: torch.Tensor, runner: Runner, where: str) -> None:
    if not bool(torch.isfinite(logits).all()):
        raise InfiniTrtError(f"{runner.description} produced NaN or infinite logits after "
                             f"{where}; the model or its export is broken (check it with "
                             f"`infini-trt validate`)")
