"""How `bench` measures one runner at one context length: the timed prefill and decode loop,
latency percentiles and the process's peak memory; and the cost per token at every length in
alternation (`interleaved`)."""
from __future__ import annotations

import threading
import time
from typing import NamedTuple

import numpy as np

from .resources import cuda_torch, peak_gpu_bytes
from .session import Session


class PeakMemory:
    """Peak resident memory of this process between `reset()` and `peak()`: the kernel's
    high-water mark (VmHWM, reset through /proc/self/clear_refs) on Linux, else a sampling
    thread. Also torch's peak CUDA allocation when CUDA is in use."""

    def reset(self) -> None:
        self._stop = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.mode = "VmHWM"
        except OSError:
            self.mode, self._max = "sampled", 0
            self._stop = threading.Event()
            threading.Thread(target=self._sample, daemon=True).start()
        torch = cuda_torch()
        if torch is not None:
            torch.cuda.reset_peak_memory_stats()

    def _sample(self) -> None:
        import psutil

        process = psutil.Process()
        while not self._stop.is_set():
            self._max = max(self._max, process.memory_info().rss)
            self._stop.wait(0.002)

    def peak(self) -> int:
        if self._stop is not None:
            self._stop.set()
            return self._max
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return kib * 1024


class Timed:
    """A runner whose step/advance/extend(_checked) calls are timed (seconds, in order); all
    else passes through."""

    def __init__(self, runner):
        self.runner, self.seconds, self.tokens = runner, [], []

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def _time(self, fn, *args, **options) -> np.ndarray:
        t = time.perf_counter()
        out = fn(*args, **options)       # host logits: the device's work is done
        self.seconds.append(time.perf_counter() - t)
        self.tokens.append(int(np.asarray(args[0]).size))
        return out

    def step(self, ids):
        return self._time(self.runner.step, ids)

    def advance(self, ids):
        return self._time(self.runner.advance, ids)

    def extend(self, ids, start, length, last_only: bool = False):
        return self._time(self.runner.extend, ids, start, length, last_only=last_only)

    def extend_checked(self, ids, start, length, last_only: bool = False):
        return self._time(self.runner.extend_checked, ids, start, length, last_only=last_only)


def percentiles(seconds: list[float]) -> dict[str, float]:
    """p50/p95/p99 (and min, mean, max, count) of latencies, in milliseconds."""
    if not seconds:
        return {"count": 0}
    ms = np.asarray(seconds) * 1e3
    return {"count": int(ms.size), "min": float(ms.min()), "mean": float(ms.mean()),
            "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "max": float(ms.max())}


GOLDEN_RATIO = (5 ** 0.5 - 1) / 2         # positions r * this mod 1 fill [0, 1) evenly


class KeptState(NamedTuple):
    """The state a prompt left in a runner of this model (memory, norm: host arrays, valid in
    any process) and the first token decoded after it: what `interleaved` restores. Another
    kind of kept state (peer_genai.KeptContext) has the same `token` and `restore`."""

    memory: np.ndarray
    norm: np.ndarray
    token: np.ndarray

    def restore(self, runner) -> None:
        runner.set_state(self.memory, self.norm)


def _decode(session: Session, token: np.ndarray, count: int) -> list[float]:
    """Decode `count` greedy tokens per sequence from `token` (the session folds where a
    segment completes) -> the seconds of each token."""
    seconds = []
    for _ in range(count):
        t = time.perf_counter()
        out = session.decode(token)
        token = out.argmax(-1)
        seconds.append(time.perf_counter() - t)
    return seconds


def measure(runner, length: int, batch: int, decode_tokens: int, seed: int,
            states: dict | None = None) -> dict:
    """Prefill `batch` random prompts of `length` tokens, then decode `decode_tokens` tokens
    per sequence (greedy) -> one point: timings, latencies, peak memory. When `states` is
    given and the prompts end on a segment boundary, the state they leave is kept there under
    `length`, with the first decoded token (for `interleaved`)."""
    cfg = runner.config
    n = cfg.segment_len
    prompts = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length))
    if hasattr(runner, "capacity"):                      # the full-attention cache
        runner.capacity = length + decode_tokens + 1
    memory, timed = PeakMemory(), Timed(runner)
    memory.reset()
    t0 = time.perf_counter()
    session = Session(timed, batch)
    logits = session.feed(list(prompts), progress=False)
    t_prefill = time.perf_counter() - t0
    token = logits.argmax(-1)
    ttft = time.perf_counter() - t0
    calls = len(timed.seconds)                           # the prompt's (decode's follow)
    if states is not None and not session.position.any():
        states[length] = KeptState(*(np.array(a) for a in runner.state()), token)
    itl = _decode(session, token, decode_tokens)
    decode_s = float(sum(itl))
    gpu = peak_gpu_bytes()
    segments, between = percentiles(timed.seconds[:calls]), percentiles(itl)
    full = [t for t, ids in zip(timed.seconds[:calls], timed.tokens) if ids == batch * n]
    return {"length": length, "batch": batch, "prefill_s": t_prefill,
            "prefill_tokens_per_s": batch * length / t_prefill,
            # robust to a busy machine: a full segment's tokens over its median latency
            "prefill_tokens_per_s_p50": (batch * n / float(np.median(full))) if full else None,
            "segment_latency_ms": segments, "ttft_s": ttft,
            "decode_tokens": batch * decode_tokens, "decode_s": decode_s,
            "decode_tokens_per_s": batch * decode_tokens / decode_s if decode_s else None,
            "decode_tokens_per_s_p50": batch * 1e3 / between["p50"] if itl else None,
            "inter_token_latency_ms": between,
            "peak_rss_mb": memory.peak() / 2**20, "rss_measure": memory.mode,
            "peak_gpu_mb": gpu / 2**20 if gpu is not None else None}


def interleaved(runners: dict, states: dict, rounds: int, segments: int, decode_tokens: int,
                seed: int, min_seconds: float = 10.0, matmul_s: float = 1.0) -> dict:
    """The cost per token of several runners at several context lengths, measured in
    alternation, with the machine's matmul rate among them.

    A shared machine drifts between speeds for minutes at a time, and `measure` visits the
    subjects and lengths one after the other, so drift reads as a difference between them. An
    Infini state has the same size at every length, so the states that `measure` kept
    (states[name] = {length: KeptState(memory, norm, first token)}) can be taken up in turn;
    a peer that cannot hand out its state but keeps a prompt's context and rewinds to it
    (onnxruntime-genai: peer_genai.KeptContext, made by `replay_prompt` in this process) is
    taken up the same way, through the kept state's `restore(runner)`. Each round
    visits every (runner, length) pair in a new random order, restores its state, runs one
    segment untimed (the runner's weights back in the caches after the others'), restores the
    state again and times `segments` full segments through the prefill graph (the next
    segments of a longer prompt; from length 0, the empty context of `empty_context`, each
    segment is read from the restored empty context: a one-segment prompt, the first
    segment of every prompt, where a peer's attention is shortest) and `decode_tokens`
    decoded tokens (after a reset to the same
    state, from the round's segment position: 0 in the first round, then spread over the
    segment by the golden ratio, the same for every pair of the round; the tokens before it
    are put into the cache untimed by one extend call). A token reads the cache slots before
    it, so its cost grows along the segment; the rounds' median is that of the positions
    visited, and a fold where the tokens complete a segment is timed as decoding meets it.
    Among the visits of each round is one to the machine: an fp32 n^3 matmul in torch (best
    of 3; n as `roofline.matmul_probe` sizes it for `matmul_s` seconds, so that a visit takes
    at most about 1.5 x matmul_s on any machine), so that efficiencies are taken against the
    rate of the same minutes.
    At least `rounds` rounds, and more while they take less than `min_seconds` (a small model
    gets enough samples).

    -> {"rounds", "segments", "decode_tokens", "decode_positions" (the rounds'),
    "matmul_fp32_flops_per_s" (the median of the rounds'), "matmul_n", "points": {name:
    [{length, segment_ms (p50 ...), prefill_tokens_per_s (a segment over its median),
    decode_token_ms, decode_tokens_per_s (over the median)}]}}"""
    from .roofline import matmul_probe

    matmul_rate = matmul_probe(None, matmul_s)          # fp32
    pairs = [(name, length) for name in runners for length in sorted(states[name])]
    rng = np.random.default_rng(seed)
    segment_s = {pair: [] for pair in pairs}
    token_s = {pair: [] for pair in pairs}
    rates, positions = [], []
    r, t_end = 0, time.perf_counter() + min_seconds
    while pairs and (r < rounds or time.perf_counter() < t_end):
        spread = (r * GOLDEN_RATIO) % 1.0                  # this round's decode position
        positions.append(spread)
        for i in rng.permutation(len(pairs) + 1):
            if i == len(pairs):
                rates.append(matmul_rate(0.0))
                continue
            name, length = pairs[i]
            runner = runners[name]
            kept = states[name][length]
            token = kept.token
            batch, n = len(token), runner.config.segment_len
            runner.reset(batch)
            kept.restore(runner)
            runner.advance(rng.integers(0, runner.config.vocab_size, (batch, n)))   # warm
            kept.restore(runner)
            for _ in range(segments):
                if length == 0:
                    kept.restore(runner)                  # each the first segment
                ids = rng.integers(0, runner.config.vocab_size, (batch, n))
                t = time.perf_counter()
                runner.advance(ids)
                segment_s[name, length].append(time.perf_counter() - t)
            session = Session(runner, batch)
            kept.restore(runner)
            session.feed(list(rng.integers(0, runner.config.vocab_size,      # the segment so
                                           (batch, int(spread * n)))), progress=False)  # far
            token_s[name, length] += _decode(session, token, decode_tokens)
        r += 1
    points = {name: [] for name in runners}
    for name, length in pairs:
        batch, n = len(states[name][length].token), runners[name].config.segment_len
        seg, tok = percentiles(segment_s[name, length]), percentiles(token_s[name, length])
        points[name].append({
            "length": length, "segment_ms": seg,
            "prefill_tokens_per_s": batch * n * 1e3 / seg["p50"],
            "decode_token_ms": tok, "decode_tokens_per_s": batch * 1e3 / tok["p50"]})
    n = next(iter(runners.values())).config.segment_len if runners else 0
    return {"rounds": r, "segments": segments, "decode_tokens": decode_tokens,
            "decode_positions": [int(f * n) for f in positions],
            "matmul_fp32_flops_per_s": float(np.median(rates)) if rates else None,
            "matmul_n": matmul_rate.size,
            "points": points}


def empty_context(runner, batch: int, seed: int, room: int):
    """The state of an empty context (nothing read yet) and a random first token, kept as
    `measure` keeps a prompt's state (a context-keeping peer: its cache made for `room`
    tokens) -> `interleaved`'s length 0."""
    token = np.random.default_rng(seed).integers(0, runner.config.vocab_size, batch)
    runner.reset(batch)
    if hasattr(runner, "keep"):
        runner.capacity = room
        return runner.keep(token)
    return KeptState(*(np.array(a) for a in runner.state()), token)


def replay_prompt(runner, length: int, batch: int, seed: int, room: int):
    """Read a prompt of `length` random tokens again, untimed, in a runner that keeps contexts
    (`runner.keep`; its cache made for `room` more tokens) -> its kept context, for
    `interleaved`."""
    cfg = runner.config
    runner.capacity = length + room
    prompts = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length))
    session = Session(runner, batch)
    token = session.feed(list(prompts), progress=False).argmax(-1)
    return runner.keep(token)


def warm_up(runner, batch: int) -> None:
    """Load and run every graph that `measure` uses once: a segment (prefill graph), a
    continuation that fills the next one (extend), and one decoded token that completes it
    (a fold)."""
    n = runner.config.segment_len
    if hasattr(runner, "capacity"):
        runner.capacity = 2 * n + 2
    session = Session(runner, batch)
    logits = session.feed(list(np.zeros((batch, 2 * n - 1), dtype=np.int64)), progress=False)
    session.decode(logits.argmax(-1))              # completes a segment: a fold
