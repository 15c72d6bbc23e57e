"""The model configuration: one frozen dataclass, presets, and a strict JSON round trip.

Every field that the published Infini-attention implementations disagree on is a field here,
with the defaults of `shared/design.md` (retrieve then update, un-rotated memory q/k, M0 = z0 = 0
with a guarded division, one memory per KV head).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from .errors import ConfigError

UPDATE_RULES = ("linear", "delta")          # eq 8 | eq 9
EMPTY_MEMORY_POLICIES = ("zero", "bypass")  # guarded zero retrieval | skip memory and gate
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
NORM_KINDS = ("rms", "l2")                  # x/sqrt(mean x^2 + eps) | x/max(|x|, eps)*sqrt(d)
ROPE_STYLES = ("half", "interleaved")       # Llama's rotate_half | pairs (x0, x1), (x2, x3) ...


@dataclass(frozen=True)
class InfiniConfig:
    """Shape and conventions of an Infini-attention decoder LM (Llama family)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    segment_len: int
    ffn_activation: str = "silu"     # gated MLP: down(act(gate(x)) * up(x))
    norm_kind: str = "rms"
    norm_eps: float = 1e-5
    attn_bias: bool = False          # bias on the q/k/v projection
    attn_out_bias: bool = False      # bias on the output projection
    mlp_bias: bool = False
    lm_head_bias: bool = False
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_style: str = "half"
    update_rule: str = "linear"
    gate_init: float = 0.0           # beta at init; sigmoid(beta) is the weight of memory (eq 10)
    empty_memory: str = "zero"
    memory_eps: float = 1e-6         # clamp on the retrieval denominator sigma(q) . z

    def __post_init__(self) -> None:
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                    "ffn_dim", "segment_len")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                              f"({self.n_kv_heads})")
        choices = {"update_rule": UPDATE_RULES, "empty_memory": EMPTY_MEMORY_POLICIES,
                   "ffn_activation": ACTIVATIONS, "norm_kind": NORM_KINDS,
                   "rope_style": ROPE_STYLES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config field '{name}' must be one of {', '.join(allowed)}; "
                                  f"got {getattr(self, name)!r}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name in ("norm_eps", "memory_eps", "rope_theta", "gate_init"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or (name != "gate_init" and value <= 0):
                kind = "a finite number" if name == "gate_init" else "a finite positive number"
                raise ConfigError(f"config field '{name}' must be {kind}, got {value!r}")
        for f in fields(self):
            if f.type in ("bool", bool) and not isinstance(getattr(self, f.name), bool):
                raise ConfigError(f"config field '{f.name}' must be true or false, "
                                  f"got {getattr(self, f.name)!r}")

    # derived sizes -------------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def dk(self) -> int:
        return self.head_dim

    @property
    def dv(self) -> int:
        return self.head_dim

    def memory_shape(self, batch: int) -> tuple[int, ...]:
        """Shape of the compressive memory M of all layers: (L, B, Hkv, dk, dv)."""
        return (self.n_layers, batch, self.n_kv_heads, self.dk, self.dv)

    def norm_shape(self, batch: int) -> tuple[int, ...]:
        """Shape of the normalizer z of all layers: (L, B, Hkv, dk)."""
        return (self.n_layers, batch, self.n_kv_heads, self.dk)

    def num_parameters(self) -> int:
        d, hd = self.d_model, self.head_dim
        qkv = d * (self.n_heads + 2 * self.n_kv_heads) * hd
        qkv += (self.n_heads + 2 * self.n_kv_heads) * hd if self.attn_bias else 0
        out = self.n_heads * hd * d + (d if self.attn_out_bias else 0)
        mlp = 3 * d * self.ffn_dim + ((2 * self.ffn_dim + d) if self.mlp_bias else 0)
        layer = qkv + out + mlp + 2 * d + self.n_heads
        head = (0 if self.tie_embeddings else self.vocab_size * d)
        head += self.vocab_size if self.lm_head_bias else 0
        return self.vocab_size * d + self.n_layers * layer + d + head

    # JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "InfiniConfig":
        """Build from a JSON object, refusing unknown and missing fields by name."""
        if not isinstance(data, dict):
            raise ConfigError(f"model config must be a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        required = [n for n, f in known.items()
                    if f.default is dataclasses.MISSING and n not in data]
        if required:
            raise ConfigError(f"missing config field(s): {', '.join(required)}")
        try:
            return cls(**data)
        except TypeError as exc:  # pragma: no cover - guarded above
            raise ConfigError(str(exc)) from None

    def replace(self, **changes: Any) -> "InfiniConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, InfiniConfig] = {
    # For tests: byte-level vocabulary, GQA (2 query heads per KV head), short segments.
    "tiny": InfiniConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=16, ffn_dim=176, segment_len=32),
    # For benchmarks: a ~58M-parameter Llama-like model with 1024-token segments.
    "small": InfiniConfig(vocab_size=32000, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8,
                          head_dim=64, ffn_dim=1408, segment_len=1024),
}


def preset(name: str, **overrides: Any) -> InfiniConfig:
    """A named preset, optionally with fields replaced."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
