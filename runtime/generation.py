"""Generation: feed a batch of prompts of any lengths into a Session, then decode token by
token, choosing each token from the logits of the one before (runtime/sampling.py).

The session reads the prompts segment by segment (runtime/session.py) and decoding feeds one
token per sequence per call: a token costs O(segment length), whatever the context length,
and memory stays constant. The logits equal those of the sequence forward (tests/runtime).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from infini_trt.export.errors import InfiniTrtError, InputError

from .resources import peak_rss_bytes
from .runners.base import Runner
from .sampling import SamplingConfig, next_tokens
from .session import Session
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


def generate(target: Runner | Session, prompts: list[list[int]] | list[np.ndarray],
             cfg: SamplingConfig, tokenizer=None,
             on_text: Callable[[int, str], None] | None = None,
             progress: bool | None = None, feed_last: bool = False,
             text_context: list | None = None) -> GenerationResult:
    """Generate up to cfg.max_new_tokens after each prompt (token ids), batched.

    `target`: a runner (each prompt starts a new sequence), or a Session whose rows continue
    from where they are (a loaded context): the prompts are fed after what the rows hold, and
    a row given an empty prompt generates from its last logits. feed_last: feed each row's
    last generated token too, so that the session holds the whole answer (to save it).
    text_context[b]: ids before row b's new text (a context's `text_tail`), decoded with it.
    With a tokenizer, `on_text(b, text)` is called with each piece of sequence b's text as it
    becomes final (streaming; `text_stream.TextStream`): the pieces add up to the sequence's
    `text`. Stops a sequence at cfg.eos_id or where a stop string appears (the text ends
    before it)."""
    if cfg.stop and tokenizer is None:
        raise InputError("stop strings need a tokenizer")
    prompts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
    session = target if isinstance(target, Session) else Session(target, len(prompts))
    if len(prompts) != session.batch:
        raise InputError(f"give one prompt for each of the session's {session.batch} rows")
    if any(len(p) == 0 and session.last[b] is None for b, p in enumerate(prompts)):
        raise InputError("every prompt needs at least one token (or a context to continue)")
    runner, batch = session.runner, session.batch
    vocab = runner.config.vocab_size
    generator = np.random.default_rng(cfg.seed)          # fresh entropy when seed is None
    sequences = [Sequence(prompt_tokens=len(p)) for p in prompts]
    streams = [TextStream(tokenizer, cfg.stop, text_context[b] if text_context else ())
               if tokenizer is not None else None for b in range(batch)]

    def emit(b: int, text: str) -> None:
        if text and on_text is not None:
            on_text(b, text)

    t0 = time.perf_counter()
    logits = session.feed(prompts, progress)
    t_prefill = time.perf_counter() - t0
    _check_finite(logits, runner, "the prompt")
    seen = np.zeros((batch, vocab), dtype=bool)
    if cfg.repetition_penalty != 1.0:
        for b, p in enumerate(prompts):
            seen[b, p] = True
    active = np.ones(batch, dtype=bool)
    ttft, t_decode, decoded = 0.0, time.perf_counter(), 0
    for i in range(cfg.max_new_tokens):
        tokens = next_tokens(logits, cfg, seen, generator)
        if i == 0:
            ttft = time.perf_counter() - t0
            t_decode = time.perf_counter()
        else:
            decoded += int(active.sum())
        tokens_np = np.asarray(tokens, dtype=np.int64)
        chosen = active.copy()
        for b in np.flatnonzero(active):
            token = int(tokens_np[b])
            sequences[b].token_ids.append(token)
            seen[b, token] = True
            eos = cfg.eos_id is not None and token == cfg.eos_id
            if streams[b] is not None and not eos:        # the end token is no text
                emit(int(b), streams[b].push(token))
            reason = ("eos" if eos else
                      "stop" if streams[b] is not None and streams[b].stopped else None)
            if reason:
                sequences[b].finish_reason = reason
                active[b] = False
        last_round = not active.any() or i == cfg.max_new_tokens - 1
        if last_round and not feed_last:
            break
        logits = session.decode(tokens_np, chosen if feed_last else active)
        if last_round:
            break
        _check_finite(logits, runner, f"decoded token {i + 1}")
    t_end = time.perf_counter()
    for b, (sequence, stream) in enumerate(zip(sequences, streams)):
        if stream is not None:
            emit(b, stream.finish())
            sequence.text = stream.text
    return GenerationResult(runner.description, sequences, t_prefill, ttft,
                            t_end - t_decode if decoded else 0.0, decoded,
                            peak_rss_bytes() / 2**20)


def _check_finite(logits: np.ndarray, runner: Runner, where: str) -> None:
    if not np.isfinite(logits).all():
        raise InfiniTrtError(f"{runner.description} produced NaN or infinite logits after "
                             f"{where}; the model or its export is broken (check it with "
                             f"`infini-trt validate`)")
