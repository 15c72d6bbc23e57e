"""The limits a benchmark is measured against: model FLOPs and bytes per token (formulas), and
the machine's matmul rate and memory bandwidth (measured in the same run).

FLOPs count multiply-adds as 2 and only the matrix products (the convention of model-FLOPs
utilisation): element-wise work, softmax, norms and the embedding lookup are left out. Per
token, with L layers, H query heads, Hkv KV heads, hd = dk = dv the head size, d the model
width, F the feed-forward width and V the vocabulary:

    linear    = 2 * P,  P = L * (d*(H + 2*Hkv)*hd + H*hd*d + 3*d*F) + d*V   (matmul weights)
    attention = 4 * L * H * hd * c       c keys attended (scores 2*hd, values 2*hd per key)
    memory    = L * H * (2*dk*dv + 2*dk)         retrieval, eq 7 (Infini only)
              + L * Hkv * 2*dk*dv                linear update, eq 8
              + L * Hkv * (2*dk*dv + 2*dk)       delta rule, eq 9: the extra retrieval

In a causal segment of S tokens token t attends to t keys, so a segment costs
S * (linear + memory) + 4*L*H*hd * S(S+1)/2 ("useful" FLOPs; `dense=True` counts the full S x S
square that a dense kernel computes, which is what torch's FLOP counter sees). The
full-attention baseline attends to every earlier token of the whole context instead, and has
no memory terms.

Decoding reads every matmul weight once per call (shared by the batch) plus, per sequence, c
slots of the K/V cache of the current segment (the window the runner gives the extend graph:
the slots before the token, rounded up as `cache_window` does) and the memory state:

    bytes/token = P * bytes_per_weight / B + 2*L*Hkv*c*hd * bytes_per_cache_value
                  + 4 * L * Hkv * (dk*dv + dk)                 (memory state, Infini only)
"""
from __future__ import annotations

import os
import platform
import time

from infini_trt.export.config import InfiniConfig

from .cpu import cpu_features, cpu_summary


# ----------------------------------------------------------------------------- formulas
def matmul_params(cfg: InfiniConfig) -> int:
    """P: the weights that take part in a matrix product for every token (all but the
    embedding table, which is a lookup; the LM head counts even when tied to it)."""
    d, hd, f = cfg.d_model, cfg.head_dim, cfg.ffn_dim
    layer = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.n_heads * hd * d + 3 * d * f
    return cfg.n_layers * layer + d * cfg.vocab_size


def memory_flops_per_token(cfg: InfiniConfig) -> int:
    """Retrieval (eq 7) and update (eq 8, or eq 9) of the compressive memory, per token."""
    dk, dv = cfg.dk, cfg.dv
    retrieve = cfg.n_heads * (2 * dk * dv + 2 * dk)
    update = cfg.n_kv_heads * 2 * dk * dv
    if cfg.update_rule == "delta":
        update += cfg.n_kv_heads * (2 * dk * dv + 2 * dk)
    return cfg.n_layers * (retrieve + update)


def attention_flops(cfg: InfiniConfig, pairs: float) -> float:
    """Scores and weighted values for `pairs` (query, key) pairs, all layers and heads."""
    return 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * pairs


def causal_pairs(start: int, length: int) -> float:
    """(query, key) pairs of `length` causal queries after `start` cached keys."""
    return length * start + length * (length + 1) / 2


def segment_flops(cfg: InfiniConfig, tokens: int, dense: bool = False) -> float:
    """Model FLOPs of one Infini segment step over `tokens` tokens (<= segment_len)."""
    pairs = tokens * tokens if dense else causal_pairs(0, tokens)
    linear = 2.0 * matmul_params(cfg) + memory_flops_per_token(cfg)
    return tokens * linear + attention_flops(cfg, pairs)


def lm_head_flops(cfg: InfiniConfig) -> float:
    """The LM head's share of 2·P, per token whose logits are computed."""
    return 2.0 * cfg.d_model * cfg.vocab_size


def prefill_flops(cfg: InfiniConfig, tokens: int, full_attention: bool = False) -> float:
    """Useful model FLOPs to prefill `tokens` tokens: Infini in segments of N from the start
    (constant cost per token), or the full-attention baseline (every token attends to every
    earlier one: quadratic). Generation needs the logits of the last prompt token only, so
    the LM head counts once."""
    skipped_head = (tokens - 1) * lm_head_flops(cfg)
    if full_attention:
        return (tokens * 2.0 * matmul_params(cfg) + attention_flops(cfg, causal_pairs(0, tokens))
                - skipped_head)
    n = cfg.segment_len
    full, rest = divmod(tokens, n)
    return (full * segment_flops(cfg, n) + (segment_flops(cfg, rest) if rest else 0.0)
            - skipped_head)


def decode_bytes_per_token(cfg: InfiniConfig, batch: int, bytes_per_weight: float,
                           cache_len: int, bytes_per_cache_value: float = 4.0,
                           memory: bool = True) -> dict[str, float]:
    """Bytes one decoded token moves: {"weights", "cache", "state", "total"}.

    cache_len: K/V slots read per token (the cache window for Infini, the context for the
    full-attention baseline)."""
    weights = matmul_params(cfg) * bytes_per_weight / batch
    cache = 2.0 * cfg.n_layers * cfg.n_kv_heads * cache_len * cfg.head_dim * bytes_per_cache_value
    state = (4.0 * cfg.n_layers * cfg.n_kv_heads * (cfg.dk * cfg.dv + cfg.dk)) if memory else 0.0
    return {"weights": weights, "cache": cache, "state": state,
            "total": weights + cache + state}


# --------------------------------------------------------------------------- the machine
SHARE = 2          # a probe's problem is sized so that making it and one call take at most
                   # half its budget


def _fastest(call, seconds: float, min_runs: int, best: float = float("inf")) -> float:
    """The fastest of timed calls of `call`: at least `min_runs`, then more while the fastest
    so far (or `best`, a call timed before) predicts that one more ends within `seconds`."""
    runs, t_end = 0, time.perf_counter() + seconds
    while runs < min_runs or time.perf_counter() + best <= t_end:
        t = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t)
        runs += 1
    return best


def _sized(make, sizes, share: float, growth: tuple[float, float]):
    """make(size) -> a call, for the largest of `sizes` (ascending): each is made and called
    once on the way up, and the next one only where the time so far and its making and call
    as this size predicts them (making grows by growth[0] and a call by growth[1] from one
    size to the next) fit in `share` seconds. -> (size, call, seconds of its call)."""
    start = time.perf_counter()
    for i, size in enumerate(sizes):
        t = time.perf_counter()
        call = make(size)
        made = time.perf_counter()
        call()
        done = time.perf_counter()
        predicted = (made - t) * growth[0] + (done - made) * growth[1]
        if i + 1 == len(sizes) or done - start + predicted > share:
            return size, call, done - made


class Probe:
    """A rate of this machine (FLOP/s or bytes/s) measured within `seconds`, whatever its
    speed: the problem grows from small (`_sized`, to half the budget) and no call starts
    that the calls before predict would end past the budget, so that a slow machine
    (or one emulating a dtype) measures a smaller problem instead of hanging the run in C++,
    where Ctrl-C cannot reach it.

    `size` is the problem's, `first` the rate measured when made; calling the probe measures
    again with the same operands (bench's rounds in alternation)."""

    def __init__(self, make, work, sizes, growth: tuple[float, float], seconds: float):
        t_end = time.perf_counter() + seconds
        self.size, self._call, took = _sized(make, sizes, seconds / SHARE, growth)
        self.work = work(self.size)
        self.first = self.work / _fastest(self._call, t_end - time.perf_counter(), 0, took)

    def __call__(self, seconds: float = 0.0, min_runs: int = 3) -> float:
        """work / the fastest of at least `min_runs` calls (and more within `seconds`)."""
        return self.work / _fastest(self._call, seconds, min_runs)


def _doublings(smallest: int, largest: int) -> list[int]:
    sizes = [smallest]
    while sizes[-1] * 2 <= largest:
        sizes.append(sizes[-1] * 2)
    return sizes


def matmul_probe(dtype=None, seconds: float = 1.0, n_max: int = 2048) -> Probe:
    """The FLOP/s of an n x n x n matrix product in torch on the CPU (`dtype`: a torch dtype,
    float32 by default), n doubled from 64 up to n_max while it fits in `seconds` (`Probe`);
    probe.size is n. torch is imported here: the probes run where torch is installed."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    gen = torch.Generator().manual_seed(0)

    def make(n: int):
        a = torch.randn(n, n, generator=gen).to(dtype)
        b = torch.randn(n, n, generator=gen).to(dtype)
        out = torch.empty(n, n, dtype=dtype)
        return lambda: torch.mm(a, b, out=out)

    return Probe(make, lambda n: 2.0 * n ** 3, _doublings(64, n_max), (4, 8), seconds)


def matmul_rate(dtype=None, seconds: float = 1.0) -> float:
    """Measured FLOP/s of a matrix product in torch on the CPU, within `seconds`."""
    return matmul_probe(dtype, seconds).first


def bandwidth_probe(seconds: float = 1.0, nbytes_max: int = 1 << 28) -> Probe:
    """The read bandwidth in bytes/s: the sum of a float32 array, doubled from 4 MiB up to
    nbytes_max (far larger than the caches) while it fits in `seconds`; probe.size is its
    bytes."""
    import torch

    def make(nbytes: int):
        x = torch.ones(nbytes // 4, dtype=torch.float32)
        return lambda: x.sum()

    return Probe(make, lambda nbytes: float(nbytes), _doublings(1 << 22, nbytes_max), (2, 2),
                 seconds)


def memory_bandwidth(seconds: float = 1.0) -> float:
    """Measured read bandwidth in bytes/s, within `seconds`."""
    return bandwidth_probe(seconds).first


_INSTRUCTIONS = {"bfloat16": "bf16", "float16": "fp16"}


def missing_instructions(dtype) -> str:
    """'' where torch has this CPU's instructions for matrix products in `dtype`, else why
    not ('no bf16 instructions on this CPU'). Without them torch emulates bf16 and fp16
    products, tens of times slower than fp32: a figure would describe the emulation, and a
    time estimated from the fp32 rate would be far too short."""
    name = _INSTRUCTIONS.get(str(dtype).removeprefix("torch."))
    if name is None:
        return ""
    import torch

    if not cpu_features()[name]:
        return f"no {name} instructions on this CPU"
    try:                               # oneDNN's own view (ONEDNN_MAX_CPU_ISA can narrow it)
        used = getattr(torch.ops.mkldnn, f"_is_mkldnn_{name}_supported")()
    except (AttributeError, RuntimeError):
        used = True
    return "" if used else (f"torch's oneDNN does not use this CPU's {name} instructions "
                            f"(ONEDNN_MAX_CPU_ISA?)")


def _torch_threads() -> int | None:
    """torch's intra-op threads, where torch is installed."""
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()


def describe_machine() -> dict:
    """CPU model and instruction sets (`cpu.py`), cores, load average and library versions,
    for the benchmark record."""
    from infini_trt.export.manifest import package_version

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu_features()["model"], "cpu_features": cpu_features(), "cpu_summary": cpu_summary(),
            "cores": os.cpu_count(), "torch_threads": _torch_threads(),
            "load_average": list(load) if load else None, "python": platform.python_version(),
            "versions": {name: package_version(name) for name in
                         ("infini-trt", "torch", "onnxruntime", "onnx",
                          "infini-transformer-pytorch")}}
