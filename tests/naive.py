"""A second, deliberately naive implementation of the whole model, for the tests.

Token by token and head by head, float64, written from the paper's equations and the config,
sharing no code with `infini_trt.export.model` or `reference`. One sequence at a time.
"""
from __future__ import annotations

import math

import torch

from infini_trt.export.config import InfiniConfig


def _sigma(x):
    return torch.where(x > 0, x + 1.0, torch.exp(x))        # ELU(x) + 1


def _norm(x, w, cfg):
    if cfg.norm_kind == "rms":
        return w * x / math.sqrt(float((x * x).mean()) + cfg.norm_eps)
    return w * x * math.sqrt(x.numel()) / max(float(x.norm()), cfg.norm_eps)


def _rotate(vec, pos, cfg):
    hd = cfg.head_dim
    out = vec.clone()
    for m in range(hd // 2):
        angle = pos * cfg.rope_theta ** (-2.0 * m / hd)
        a, b = (m, m + hd // 2) if cfg.rope_style == "half" else (2 * m, 2 * m + 1)
        out[a] = vec[a] * math.cos(angle) - vec[b] * math.sin(angle)
        out[b] = vec[b] * math.cos(angle) + vec[a] * math.sin(angle)
    return out


def _act(x, cfg):
    if cfg.ffn_activation == "silu":
        return x * torch.sigmoid(x)
    if cfg.ffn_activation == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _linear(x, sd, name):
    y = sd[name + ".weight"] @ x
    return y + sd[name + ".bias"] if name + ".bias" in sd else y


def naive_logits(cfg: InfiniConfig, state_dict: dict, tokens: list[int],
                 memory=None, norm=None):
    """tokens (T,) -> (logits (T, V), memory [L][Hkv] (dk, dv), norm [L][Hkv] (dk,))."""
    sd = {k: v.double() for k, v in state_dict.items()}
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed.weight"]
    L, H, Hkv, hd, G = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.group_size
    if memory is None:
        memory = [[torch.zeros(hd, hd, dtype=torch.float64) for _ in range(Hkv)] for _ in range(L)]
        norm = [[torch.zeros(hd, dtype=torch.float64) for _ in range(Hkv)] for _ in range(L)]
    out_logits = []
    for s0 in range(0, len(tokens), cfg.segment_len):
        seg = tokens[s0:s0 + cfg.segment_len]
        n = len(seg)
        xs = [sd["embed.weight"][t].clone() for t in seg]
        for layer in range(L):
            p = f"layers.{layer}."
            q = [[None] * n for _ in range(H)]
            k = [[None] * n for _ in range(Hkv)]
            v = [[None] * n for _ in range(Hkv)]
            for t in range(n):
                qkv = _linear(_norm(xs[t], sd[p + "attn_norm.weight"], cfg), sd, p + "attn.qkv_proj")
                for i in range(H):
                    q[i][t] = qkv[i * hd:(i + 1) * hd]
                for j in range(Hkv):
                    k[j][t] = qkv[(H + j) * hd:(H + j + 1) * hd]
                    v[j][t] = qkv[(H + Hkv + j) * hd:(H + Hkv + j + 1) * hd]
            new_x = []
            for t in range(n):
                heads = []
                for i in range(H):
                    j = i // G
                    qr = _rotate(q[i][t], t, cfg)
                    scores = torch.tensor([float(qr @ _rotate(k[j][u], u, cfg)) / math.sqrt(hd)
                                           for u in range(t + 1)], dtype=torch.float64)
                    w = torch.softmax(scores, dim=0)
                    a_dot = sum(w[u] * v[j][u] for u in range(t + 1))
                    sq = _sigma(q[i][t])                                # un-rotated query
                    a_mem = (sq @ memory[layer][j]) / max(float(sq @ norm[layer][j]),
                                                          cfg.memory_eps)
                    g = 1 / (1 + math.exp(-float(sd[p + "attn.beta"][i])))
                    if cfg.empty_memory == "bypass" and float(norm[layer][j].abs().max()) == 0:
                        g = 0.0
                    heads.append(g * a_mem + (1 - g) * a_dot)
                x = xs[t] + _linear(torch.cat(heads), sd, p + "attn.o_proj")
                h = _norm(x, sd[p + "mlp_norm.weight"], cfg)
                gate_up = _linear(h, sd, p + "mlp.gate_up_proj")
                gate, up = gate_up[:cfg.ffn_dim], gate_up[cfg.ffn_dim:]
                new_x.append(x + _linear(_act(gate, cfg) * up, sd, p + "mlp.down_proj"))
            xs = new_x
            for j in range(Hkv):                                        # update after retrieval
                m_old, z_old = memory[layer][j].clone(), norm[layer][j].clone()
                for t in range(n):
                    sk = _sigma(k[j][t])
                    target = v[j][t]
                    if cfg.update_rule == "delta":
                        target = target - (sk @ m_old) / max(float(sk @ z_old), cfg.memory_eps)
                    memory[layer][j] = memory[layer][j] + torch.outer(sk, target)
                    norm[layer][j] = norm[layer][j] + sk
        for t in range(n):
            h = _norm(xs[t], sd["final_norm.weight"], cfg)
            out_logits.append(_linear(h, sd, "lm_head"))
    return torch.stack(out_logits), memory, norm
