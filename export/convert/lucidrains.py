"""Import an `infini_transformer_pytorch.InfiniTransformer` (lucidrains, PyPI
`infini-transformer-pytorch` 0.2.x) from its `state_dict` and constructor arguments.

Its conventions, each mapped onto an `InfiniConfig` field (checked against the package source):

    theirs                                          ours
    out*sigmoid(g) + mem*(1 - sigmoid(g))           beta = -g              (eq 10, reversed)
    no memory (and no gate) on the first segment    empty_memory "bypass"
    retrieval denominator clamp(min=1e-10)          memory_eps 1e-10       (eq 7, eq 9)
    RMSNorm: F.normalize(x) * sqrt(d) * gamma       norm_kind "l2", norm_eps 1e-12
    RotaryEmbedding(dim_head): adjacent pairs,      rope_style "interleaved", rope_theta 1e4
      theta 1e4, all dims, positions from 0 per
      segment call, no xpos / interpolation
    to_qkv rows (qkv h d), no bias                  qkv_proj rows [q heads; k heads; v heads]
    FeedForward proj_in rows [x; gates] (bias),     gate_up_proj rows [gate; up], mlp_bias,
      gelu(gates) * x, proj_out (bias)                ffn_activation "gelu" (erf)
    to_logits with bias                             lm_head_bias
    use_mem_delta_rule                              update_rule "delta" (else "linear")

The memory reads the unscaled, un-rotated q and is written with the un-rotated k, as ours.
`learned_delta_update` (a learned per-token DeltaNet beta) has no counterpart and is refused.
The segment length is not part of the model: their `InfiniTransformerWrapper` takes it
(default 512), and so does the converter.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint import dtype_from_name, save_checkpoint
from ..files import check_output
from ..config import InfiniConfig
from ..errors import CheckpointError, ConfigError
from .common import expect_shape, native_model, read_json

WRAPPER_SEGMENT_LEN = 512      # InfiniTransformerWrapper(segment_length=512)
ROPE_THETA = 10000.0           # RotaryEmbedding(dim_head) default
ARGS_DEFAULTS: dict[str, Any] = {  # InfiniTransformer.__init__, keyword-only
    "num_tokens": None, "dim": None, "depth": None, "dim_head": 128, "heads": 8,
    "attn_dropout": 0.0, "ff_mult": 4, "ff_dropout": 0.0, "use_mem_delta_rule": False,
    "learned_delta_update": False,
}


def _require(args: dict, names: tuple[str, ...], test, kind: str) -> None:
    for name in names:
        if not test(args[name]):
            raise ConfigError(f"model argument '{name}' must be {kind}, got {args[name]!r}")


def read_args(args: Any) -> dict[str, Any]:
    """The constructor arguments of `InfiniTransformer`, defaults filled in and checked."""
    if not isinstance(args, dict):
        raise ConfigError(f"model arguments must be a JSON object, got {type(args).__name__}")
    unknown = sorted(set(args) - set(ARGS_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown InfiniTransformer argument(s) {', '.join(unknown)}; it takes "
                          f"{', '.join(ARGS_DEFAULTS)}")
    missing = [n for n, d in ARGS_DEFAULTS.items() if d is None and n not in args]
    if missing:
        raise ConfigError(f"missing InfiniTransformer argument(s) {', '.join(missing)}")
    full = {**ARGS_DEFAULTS, **args}
    _require(full, ("num_tokens", "dim", "depth", "dim_head", "heads"),
                lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                "a positive integer")
    _require(full, ("attn_dropout", "ff_mult", "ff_dropout"),
                lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
                "a non-negative number")
    _require(full, ("use_mem_delta_rule", "learned_delta_update"),
                lambda v: isinstance(v, bool), "true or false")
    if full["learned_delta_update"]:
        raise ConfigError("learned_delta_update=True (a learned per-token delta-rule strength) "
                          "has no counterpart in infini-trt's model and cannot be converted")
    return full


def config_from_args(args: dict[str, Any], segment_len: int = WRAPPER_SEGMENT_LEN) -> InfiniConfig:
    """The `InfiniConfig` of an `InfiniTransformer(**args)` run in segments of `segment_len`."""
    a = read_args(args)
    return InfiniConfig(
        vocab_size=a["num_tokens"], d_model=a["dim"], n_layers=a["depth"], n_heads=a["heads"],
        n_kv_heads=a["heads"], head_dim=a["dim_head"],
        ffn_dim=int(a["ff_mult"] * a["dim"] * 2 / 3),    # FeedForward: dim_inner
        segment_len=segment_len, ffn_activation="gelu", norm_kind="l2", norm_eps=1e-12,
        mlp_bias=True, lm_head_bias=True, rope_theta=ROPE_THETA, rope_style="interleaved",
        update_rule="delta" if a["use_mem_delta_rule"] else "linear",
        gate_init=-10.0,                                 # head_gate_init_value 10, reversed
        empty_memory="bypass", memory_eps=1e-10)


def source_shapes(cfg: InfiniConfig) -> dict[str, tuple[int, ...]]:
    """The tensors of their state_dict, by name, with the shapes `cfg` implies."""
    d, f, hd, h = cfg.d_model, cfg.ffn_dim, cfg.head_dim, cfg.n_heads
    shapes = {"token_emb.weight": (cfg.vocab_size, d), "norm.gamma": (d,),
              "to_logits.weight": (cfg.vocab_size, d), "to_logits.bias": (cfg.vocab_size,)}
    for i in range(cfg.n_layers):
        shapes.update({
            f"layers.{i}.0.norm.gamma": (d,), f"layers.{i}.0.rotary_emb.freqs": (hd // 2,),
            f"layers.{i}.0.to_qkv.weight": (3 * h * hd, d),
            f"layers.{i}.0.to_out.weight": (d, h * hd),
            f"layers.{i}.0.fastweight_mem.head_gates": (h,),
            f"layers.{i}.1.norm.gamma": (d,), f"layers.{i}.1.proj_in.weight": (2 * f, d),
            f"layers.{i}.1.proj_in.bias": (2 * f,), f"layers.{i}.1.proj_out.weight": (d, f),
            f"layers.{i}.1.proj_out.bias": (d,)})
    return shapes


def check_source(state: dict[str, torch.Tensor], cfg: InfiniConfig, where: str) -> None:
    """Every tensor present, none extra, shapes as the arguments say, default rotary freqs."""
    expected = source_shapes(cfg)
    learned = sorted(n for n in state if ".to_learned_delta_update_weights." in n)
    if learned:
        raise ConfigError(f"{where} has learned delta-update weights ({learned[0]}) but the "
                          f"model arguments say learned_delta_update=false; such models cannot "
                          f"be converted")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{where}: missing tensor(s) {', '.join(missing[:3])}"
                              f"{' ...' if len(missing) > 3 else ''} (do the model arguments "
                              f"match the checkpoint?)")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor(s) {', '.join(unexpected[:3])}"
                              f"{' ...' if len(unexpected) > 3 else ''} (do the model arguments "
                              f"match the checkpoint?)")
    for name, shape in expected.items():
        expect_shape(name, state[name], shape, where)
    hd = cfg.head_dim
    default = 1.0 / (ROPE_THETA ** (torch.arange(0, hd, 2).float() / hd))
    for i in range(cfg.n_layers):
        freqs = state[f"layers.{i}.0.rotary_emb.freqs"].float()
        if not torch.allclose(freqs, default, rtol=1e-5, atol=0):
            raise ConfigError(f"{where}: layer {i} has rotary frequencies other than "
                              f"RotaryEmbedding(dim_head)'s defaults (theta 10000); they cannot "
                              f"be converted")


def native_tensors(state: dict[str, torch.Tensor], cfg: InfiniConfig) -> dict[str, torch.Tensor]:
    """Their tensors under our names (see the module docstring for each convention)."""
    f = cfg.ffn_dim
    out = {"embed.weight": state["token_emb.weight"], "final_norm.weight": state["norm.gamma"],
           "lm_head.weight": state["to_logits.weight"], "lm_head.bias": state["to_logits.bias"]}
    for i in range(cfg.n_layers):
        attn, ff, ours = f"layers.{i}.0.", f"layers.{i}.1.", f"layers.{i}."
        proj_in_w, proj_in_b = state[ff + "proj_in.weight"], state[ff + "proj_in.bias"]
        out.update({
            ours + "attn_norm.weight": state[attn + "norm.gamma"],
            ours + "attn.qkv_proj.weight": state[attn + "to_qkv.weight"],   # same (qkv h d) rows
            ours + "attn.o_proj.weight": state[attn + "to_out.weight"],
            ours + "attn.beta": -state[attn + "fastweight_mem.head_gates"],  # reversed gate
            ours + "mlp_norm.weight": state[ff + "norm.gamma"],
            # proj_in rows are [x (up); gates]; ours are [gate; up]
            ours + "mlp.gate_up_proj.weight": torch.cat((proj_in_w[f:], proj_in_w[:f])),
            ours + "mlp.gate_up_proj.bias": torch.cat((proj_in_b[f:], proj_in_b[:f])),
            ours + "mlp.down_proj.weight": state[ff + "proj_out.weight"],
            ours + "mlp.down_proj.bias": state[ff + "proj_out.bias"]})
    return out


def convert_state_dict(state: dict[str, torch.Tensor], args: dict[str, Any],
                       segment_len: int = WRAPPER_SEGMENT_LEN, dtype: torch.dtype | None = None,
                       where: str = "state_dict"):
    """Their state_dict and constructor arguments -> an `InfiniLM` (in `dtype`, default the
    source's) with the same logits over segments of `segment_len`, memories carried."""
    cfg = config_from_args(args, segment_len)
    check_source(state, cfg, where)
    dtype = state["token_emb.weight"].dtype if dtype is None else dtype
    return native_model(cfg, native_tensors(state, cfg), dtype, where)


def _unwrap(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """A state_dict, possibly inside {"state_dict": ...} / {"model": ...} or saved from the
    InfiniTransformerWrapper (keys prefixed "model.")."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{where} does not hold a state_dict (a dict of tensors); save "
                              f"it with torch.save(model.state_dict(), path)")
    if all(k.startswith("model.") for k in obj):
        obj = {k[len("model."):]: v for k, v in obj.items()}
    return obj


def load_source(path: str | Path) -> dict[str, torch.Tensor]:
    """Read their state_dict from a torch.save file (.pt/.pth/.bin) or a .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return _unwrap(load_file(str(path)), str(path))
        except SafetensorError as exc:
            raise CheckpointError(f"{path} is corrupt or truncated ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unpickling errors have no common base class
        # torch refuses anything but tensors and containers (weights_only): a pickled module,
        # other objects, or a file that torch.save did not write
        raise CheckpointError(f"cannot read {path} as a torch state_dict of tensors; save one "
                              f"with torch.save(model.state_dict(), path)") from None
    return _unwrap(obj, str(path))


def convert_lucidrains(src: str | Path, model_args: str | Path, output: str | Path,
                       segment_len: int = WRAPPER_SEGMENT_LEN, dtype: str | None = None,
                       force: bool = False) -> InfiniConfig:
    """SRC (their state_dict) + ARGS.json (their constructor arguments) -> a native
    checkpoint at `output`. Returns the converted model's config."""
    check_output(output, "dir", force, inputs=(src, model_args))   # before any reading
    args = read_json(Path(model_args), "model arguments file")
    state = load_source(src)
    model = convert_state_dict(state, args, segment_len,
                               None if dtype is None else dtype_from_name(dtype), str(src))
    save_checkpoint(model, output, force=force, inputs=(src, model_args))
    return model.cfg
