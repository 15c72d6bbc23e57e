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

import torch

from infini_trt.export.config import InfiniConfig


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
def _best_seconds(fn, seconds: float, min_runs: int = 3) -> float:
    """The fastest of repeated calls of fn (after one warm-up), for about `seconds`."""
    fn()
    best, runs, t_end = float("inf"), 0, time.perf_counter() + seconds
    while runs < min_runs or time.perf_counter() < t_end:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        runs += 1
    return best


def matmul_probe(dtype: torch.dtype = torch.float32, n: int = 2048):
    """A function seconds -> the measured FLOP/s of an n x n x n matrix product in torch on the
    CPU (best run for about `seconds`, at least 3); its operands are made once, so that it can
    be called again and again (bench's rounds)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    return lambda seconds: 2.0 * n ** 3 / _best_seconds(lambda: torch.mm(a, b, out=out),
                                                         seconds)


def matmul_rate(dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 1.0) -> float:
    """Measured FLOP/s of an n x n x n matrix product in torch on the CPU (best run)."""
    return matmul_probe(dtype, n)(seconds)


def memory_bandwidth(nbytes: int = 1 << 28, seconds: float = 1.0) -> float:
    """Measured read bandwidth in bytes/s: the sum of a float32 array far larger than the
    caches (best run)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / _best_seconds(lambda: x.sum(), seconds)


def describe_machine() -> dict:
    """CPU model, cores, load average and library versions, for the benchmark record."""
    from infini_trt.export.manifest import package_version

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": list(load) if load else None, "python": platform.python_version(),
            "versions": {name: package_version(name) for name in
                         ("infini-trt", "torch", "onnxruntime", "onnx",
                          "infini-transformer-pytorch")}}
