"""The one table of graph inputs and outputs: names, dtypes, shapes and dynamic axes.

The exporter, the engine profiles, the runners and the validator all read it, from here or
from the copy that every export writes into its manifest.

Dims are ints (fixed by the config) or the names of dynamic axes ("batch", "seq").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import InfiniConfig

SEGMENT, PREFILL, EXTEND, FOLD = "segment", "prefill", "extend", "fold"
# how the decoding graphs attend to the caches (`export --decode-attention`): "portable", plain
# ONNX ops over caches the runner writes (every runtime); "gqa", one com.microsoft
# GroupQueryAttention per layer over caches it writes in place (ONNX Runtime only;
# export/cached_attention.py)
DECODE_ATTENTIONS = ("portable", "gqa")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                         # numpy dtype name
    dims: tuple[int | str, ...]
    doc: str = ""

    def shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """The concrete shape for the given sizes of the dynamic axes."""
        return tuple(d if isinstance(d, int) else sizes[d] for d in self.dims)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims), "doc": self.doc}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["dims"]), d.get("doc", ""))


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: its I/O, its dynamic axes (name -> (min, max or None)) and the
    state it carries from one call to the next (input name -> output name)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: dict[str, tuple[int, int | None]]
    state: dict[str, str] = field(default_factory=dict)

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def torch_dynamic_shapes(self) -> tuple[dict[int, Any], ...]:
        """`dynamic_shapes` for torch.export, one Dim object per axis name (shared by every
        input that has that axis, as torch.export requires)."""
        from torch.export import Dim

        dims = {}
        for name, (lo, hi) in self.axes.items():
            dims[name] = Dim(name, min=lo, max=hi) if hi is not None else Dim(name, min=lo)
        return tuple({i: dims[d] for i, d in enumerate(t.dims) if isinstance(d, str)}
                     for t in self.inputs)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs],
                "axes": {k: {"min": lo, "max": hi} for k, (lo, hi) in self.axes.items()},
                "state": dict(self.state)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GraphSpec":
        return cls(d["name"], tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                   tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
                   {k: (v["min"], v["max"]) for k, v in d["axes"].items()}, dict(d["state"]))


def _state(cfg: InfiniConfig):
    L, H, dk, dv = cfg.n_layers, cfg.n_kv_heads, cfg.dk, cfg.dv
    return (("memory", "float32", (L, "batch", H, dk, dv), "compressive memory M, per layer"),
            ("norm", "float32", (L, "batch", H, dk), "normalizer z, per layer"))


def _layer_states(cfg: InfiniConfig, out: str = "", when: str = "") -> tuple[TensorSpec, ...]:
    """Each layer's memory and norm (`_state` without its layer axis): memory_0.., norm_0..
    (`out`: memory_out_0.., norm_out_0..)."""
    return tuple(TensorSpec(f"{name}{out}_{i}", dtype, dims[1:],
                            doc.removesuffix(", per layer") + f" of layer {i}"
                            + (f", {when}" if when else ""))
                 for name, dtype, dims, doc in _state(cfg) for i in range(cfg.n_layers))


def _cache(cfg: InfiniConfig, dtype: str, layer: int | None = None,
           slots: int | str | None = None, attention: str = "portable", out: str = ""):
    """The decoding caches (`empty_caches` of runtime/kv_cache.py): all layers, or one layer's
    slice; `slots` of them (default: the whole segment). With the "gqa" decode attention the
    keys are in the values' layout (one row per slot), and `out` suffixes the names (the
    graph's outputs of the same caches, written in place)."""
    lead = (cfg.n_layers, "batch") if layer is None else ("batch",)
    suffix = "" if layer is None else f"_{layer}"
    n, hd = cfg.segment_len if slots is None else slots, cfg.head_dim
    if attention == "gqa":
        key = TensorSpec(f"k_cache{out}{suffix}", dtype, (*lead, cfg.n_kv_heads, n, hd),
                         "keys of the current segment, rotated at their position (RoPE), "
                         "one row per slot")
    else:
        key = TensorSpec(f"k_cache{out}{suffix}", dtype, (*lead, cfg.n_kv_heads, hd, n),
                         "keys of the current segment, rotated at their position (RoPE), "
                         "transposed: one column per slot")
    return (key, TensorSpec(f"v_cache{out}{suffix}", dtype, (*lead, cfg.n_kv_heads, n, hd),
                            "values of the current segment, one row per slot"))


def segment_graph(cfg: InfiniConfig) -> GraphSpec:
    """The segment step: (input_ids, memory, norm) -> (logits, memory_out, norm_out)."""
    memory, norm = _state(cfg)
    return GraphSpec(
        name=SEGMENT,
        inputs=(TensorSpec("input_ids", "int64", ("batch", "seq"), "token ids of one segment"),
                TensorSpec(*memory), TensorSpec(*norm)),
        outputs=(TensorSpec("logits", "float32", ("batch", "seq", cfg.vocab_size),
                            "next-token logits"),
                 TensorSpec("memory_out", "float32", memory[2], "M after the segment"),
                 TensorSpec("norm_out", "float32", norm[2], "z after the segment")),
        axes={"batch": (1, None), "seq": (1, cfg.segment_len)},
        state={"memory": "memory_out", "norm": "norm_out"},
    )


def prefill_graph(cfg: InfiniConfig) -> GraphSpec:
    """The segment step for reading a prompt: the segment graph's inputs and state, the
    logits of the last token only -> (last_logits, memory_out, norm_out)."""
    segment = segment_graph(cfg)
    return GraphSpec(
        name=PREFILL, inputs=segment.inputs,
        outputs=(TensorSpec("last_logits", "float32", ("batch", cfg.vocab_size),
                            "next-token logits after the segment's last token"),
                 *segment.outputs[1:]),
        axes=segment.axes, state=segment.state)


def extend_graph(cfg: InfiniConfig, dtype: str, attention: str = "portable",
                 skip_empty: bool = True) -> GraphSpec:
    """Decoding: continue the current segment from the caches (`InfiniLM.extend`):
    (input_ids, start, logit_rows, memory, norm, k_cache_0 .. k_cache_{L-1},
    v_cache_0 .. v_cache_{L-1}) -> (logits, k_new, v_new). `logit_rows` names the tokens
    whose logits are computed: every token for scoring, each sequence's last one for a prompt
    (the LM head on the others would cost as much as the layers at a 32K vocabulary), the one
    token when decoding. Every layer's cache is its own input, so a runner binds the
    slices of its one cache buffer and nothing is copied; the graph only reads them and
    returns the new tokens' rows, which the runner writes in place (`write_cache`). The
    caches hold the first `window` slots of the segment (at least the largest `start`: the
    slots the tokens read), so that a token early in a segment does not read the whole
    segment's cache. They are in the graph's compute `dtype`; memory and norm are only read.

    attention="gqa" (`InfiniLM.extend_in_place`, ONNX Runtime only): (input_ids, start,
    length, logit_rows, memory_i.., norm_i.., k_cache_i.., v_cache_i..) -> (logits,
    k_cache_out_i.., v_cache_out_i..): each layer's memory and norm are inputs of their own;
    the caches hold the whole segment, keys and values (batch, Hkv, N, hd), and each layer's
    outputs are its caches with the first `length` tokens written, which a runner binds to
    the buffers of the inputs (the kernel writes them in place). With the "zero" empty-memory
    policy and `skip_empty` (the stamped export), also `memory_empty` after `length`: each
    layer's retrieval is under an If on it (export/empty_memory.py)."""
    memory, norm = _state(cfg)
    fused = attention == "gqa"
    slots = cfg.segment_len if fused else "window"
    state = (TensorSpec(*memory), TensorSpec(*norm))
    if fused:          # each layer's its own input: a runner binds slices (a Split copies them)
        state = _layer_states(cfg)
    caches = [_cache(cfg, dtype, i, slots, attention) for i in range(cfg.n_layers)]
    if fused:
        outs = [_cache(cfg, dtype, i, slots, attention, "_out") for i in range(cfg.n_layers)]
        written = (*(k for k, _ in outs), *(v for _, v in outs))
        length = (TensorSpec("length", "int64", ("batch",),
                             "how many of the tokens are real (the rest: padding)"),)
        if skip_empty and cfg.empty_memory == "zero":     # export/empty_memory.py
            length += (TensorSpec("memory_empty", "bool", (),
                                  "true while every row's memory and norm are zero: the "
                                  "layers skip the retrieval (exactly 0 then)"),)
    else:
        rows = (cfg.n_layers, "batch", cfg.n_kv_heads, "seq", cfg.head_dim)
        written = (TensorSpec("k_new", dtype, rows, "the new tokens' keys, rotated"),
                   TensorSpec("v_new", dtype, rows, "the new tokens' values"))
        length = ()
    # the in-place graph (ONNX Runtime only) also takes no rows: a prompt's chunks but the
    # last compute no logits
    axes = {"batch": (1, None), "seq": (1, cfg.segment_len),
            "rows": (0 if fused else 1, cfg.segment_len)}
    return GraphSpec(
        name=EXTEND,
        inputs=(TensorSpec("input_ids", "int64", ("batch", "seq"),
                           "tokens at segment positions start .. start+seq-1"),
                TensorSpec("start", "int64", ("batch",), "segment position of the first token"),
                *length,
                TensorSpec("logit_rows", "int64", ("batch", "rows"),
                           "the tokens (0 .. seq-1) whose logits are returned"),
                *state, *(k for k, _ in caches), *(v for _, v in caches)),
        outputs=(TensorSpec("logits", "float32", ("batch", "rows", cfg.vocab_size),
                            "next-token logits after each token of logit_rows"),
                 *written),
        axes=axes if fused else {**axes, "window": (1, cfg.segment_len)},
    )


def fold_graph(cfg: InfiniConfig, dtype: str, attention: str = "portable") -> GraphSpec:
    """Decoding: write the full segments held in the caches into memory where `fold` is true
    (`InfiniLM.fold_cache`): (k_cache, v_cache, memory, norm, fold) -> (memory_out, norm_out).
    The caches are in the layout of `attention`'s decoding graph (`extend_graph`).

    attention="gqa": (k_cache_i.., v_cache_i.., memory_i.., norm_i.., fold) -> (memory_out_i..,
    norm_out_i..): each layer's caches and state are inputs and outputs of their own, the
    extend graph's buffers, bound as they are (stacked inputs would be split apart in the
    graph: a copy of both caches, 32 MiB for `small`, on every fold)."""
    memory, norm = _state(cfg)
    fold = TensorSpec("fold", "bool", ("batch",), "which sequences completed a segment")
    if attention == "gqa":
        caches = [_cache(cfg, dtype, i, attention=attention) for i in range(cfg.n_layers)]
        states, outputs = _layer_states(cfg), _layer_states(cfg, "_out", "after the fold")
        return GraphSpec(
            name=FOLD,
            inputs=(*(k for k, _ in caches), *(v for _, v in caches), *states, fold),
            outputs=outputs,
            axes={"batch": (1, None)},
            state={t.name: o.name for t, o in zip(states, outputs)},
        )
    k_cache, v_cache = _cache(cfg, dtype, attention=attention)
    return GraphSpec(
        name=FOLD,
        inputs=(k_cache, v_cache, TensorSpec(*memory), TensorSpec(*norm), fold),
        outputs=(TensorSpec("memory_out", "float32", memory[2], "M after the fold"),
                 TensorSpec("norm_out", "float32", norm[2], "z after the fold")),
        axes={"batch": (1, None)},
        state={"memory": "memory_out", "norm": "norm_out"},
    )
