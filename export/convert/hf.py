"""Import a Hugging Face Llama-family checkpoint (`config.json` + safetensors, sharded or not)
as an Infini-attention model, the way the paper starts its continual pre-training: the same
weights, plus a new per-head gate beta in every layer.

Read without `transformers`, from the Llama-architecture names shared by
`LlamaForCausalLM`, `MistralForCausalLM` and `Qwen2ForCausalLM`:

    model.embed_tokens                      embed
    model.layers.N.input_layernorm          layers.N.attn_norm          RMSNorm in fp32, eps
    model.layers.N.self_attn.{q,k,v}_proj   layers.N.attn.qkv_proj      rows [q; k; v] (+bias)
    model.layers.N.self_attn.o_proj         layers.N.attn.o_proj        (+bias: Llama's
                                                                        attention_bias)
    model.layers.N.post_attention_layernorm layers.N.mlp_norm
    model.layers.N.mlp.{gate,up}_proj       layers.N.mlp.gate_up_proj   rows [gate; up]
    model.layers.N.mlp.down_proj            layers.N.mlp.down_proj      (+bias: mlp_bias)
    model.norm, lm_head                     final_norm, lm_head         (tie_word_embeddings)
    (new)                                   layers.N.attn.beta          = gate_init

RoPE is HF's rotate_half ("half" style), positions restarting at 0 in every segment. RoPE
scaling that changes the frequencies (llama3, yarn, longrope, linear with factor != 1) is
refused; "dynamic" is a no-op within max_position_embeddings, which bounds the segment length.

Choice of the default gate, DEFAULT_GATE_INIT = -5: sigmoid(-5) = 0.0067 of memory, so the
converted model starts within a fraction of a percent of the pretrained one, while the gate's
slope sigmoid'(-5) = 0.0066 keeps it trainable (at -100 it is 4e-44 and the gate never moves;
at 0 half of every head's output is replaced by an untrained memory). Pass a very negative
value (e.g. -1e4, where sigmoid is exactly 0) for a model whose logits equal the source's
within a segment.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import dtype_from_name, save_checkpoint
from ..config import InfiniConfig
from ..errors import CheckpointError, ConfigError
from ..files import check_output, inside
from .common import expect_shape, native_model, read_json

DEFAULT_GATE_INIT = -5.0
DEFAULT_SEGMENT_LEN = 2048     # the paper's N for its LLM runs ("2K")
INDEX_FILE, SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"
# architecture -> (model_type, q/k/v bias always, max_position_embeddings default)
ARCHITECTURES = {"LlamaForCausalLM": ("llama", False, 2048),
                 "MistralForCausalLM": ("mistral", False, 4096 * 32),
                 "Qwen2ForCausalLM": ("qwen2", True, 32768)}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def _architecture(raw: dict, where: str) -> str:
    archs = raw.get("architectures") or []
    by_type = {t: a for a, (t, _, _) in ARCHITECTURES.items()}
    if not archs and raw.get("model_type") in by_type:
        archs = [by_type[raw["model_type"]]]
    supported = [a for a in archs if a in ARCHITECTURES]
    if len(archs) != 1 or not supported:
        shown = ", ".join(map(str, archs)) or f"model_type {raw.get('model_type')!r}"
        raise ConfigError(f"{where}: architecture {shown} is not supported; infini-trt converts "
                          f"{', '.join(ARCHITECTURES)}")
    return supported[0]


_KINDS = {
    int: ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
    float: ("a positive number",
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0),
    bool: ("true or false", lambda v: isinstance(v, bool)),
}


def _field(raw: dict, name: str, where: str, default: Any = None, kind: type = int) -> Any:
    """raw[name] (null or absent: `default`), checked to be of `kind`."""
    value = raw.get(name)
    value = default if value is None else value
    if value is None:
        raise ConfigError(f"{where}: missing field '{name}'")
    text, ok = _KINDS[kind]
    if not ok(value):
        raise ConfigError(f"{where}: field '{name}' must be {text}, got {value!r}")
    return value


def _rope_theta(raw: dict, where: str) -> float:
    """The RoPE base, refusing any scaling that changes the frequencies within the model's
    trained length (v5 `rope_parameters` and v4 `rope_theta` + `rope_scaling` alike)."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"{where}: per-layer RoPE parameters are not supported")
    theta = _field({**raw, **params}, "rope_theta", where, 10000.0, float)
    kind = params.get("rope_type", params.get("type", "default"))
    factor = params.get("factor", 1.0)
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConfigError(f"{where}: partial rotary embeddings (partial_rotary_factor "
                          f"{partial}) are not supported")
    if kind == "default" or (kind == "linear" and factor == 1.0) or kind == "dynamic":
        return float(theta)
    raise ConfigError(f"{where}: RoPE scaling {kind!r} (factor {factor}) is not implemented by "
                      f"infini-trt; only plain RoPE is ('linear' with factor 1 and 'dynamic' "
                      f"within max_position_embeddings are the same)")


def config_from_hf(raw: Any, segment_len: int | None = None, update_rule: str = "linear",
                   gate_init: float = DEFAULT_GATE_INIT,
                   where: str = "config.json") -> InfiniConfig:
    """The `InfiniConfig` of a Llama-family `config.json` (a dict) run in segments of
    `segment_len` (default: 2048, or max_position_embeddings if smaller)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must hold a JSON object")
    arch = _architecture(raw, where)
    model_type, qkv_bias, max_pos_default = ARCHITECTURES[arch]
    d = _field(raw, "hidden_size", where)
    heads = _field(raw, "num_attention_heads", where)
    kv_heads = _field(raw, "num_key_value_heads", where, heads)
    head_dim = _field(raw, "head_dim", where, d // heads)
    max_pos = _field(raw, "max_position_embeddings", where, max_pos_default)
    segment_len = min(DEFAULT_SEGMENT_LEN, max_pos) if segment_len is None else segment_len
    if segment_len > max_pos:
        raise ConfigError(f"{where}: segment length {segment_len} exceeds the model's "
                          f"max_position_embeddings ({max_pos}), positions it was never trained on")
    window = raw.get("sliding_window")
    if model_type == "qwen2" and not raw.get("use_sliding_window", False):
        window = None                       # Qwen2 ignores it unless use_sliding_window
    if window is not None and _field(raw, "sliding_window", where) < segment_len:
        raise ConfigError(f"{where}: the model's sliding_window ({window}) is shorter than the "
                          f"segment length ({segment_len}); choose --segment-len {window} or less")
    act = raw.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ConfigError(f"{where}: hidden_act {act!r} is not supported; infini-trt has "
                          f"{', '.join(ACTIVATIONS)}")
    attention_bias = _field(raw, "attention_bias", where, False, bool)
    return InfiniConfig(
        vocab_size=_field(raw, "vocab_size", where), d_model=d,
        n_layers=_field(raw, "num_hidden_layers", where), n_heads=heads, n_kv_heads=kv_heads,
        head_dim=head_dim, ffn_dim=_field(raw, "intermediate_size", where),
        segment_len=segment_len, ffn_activation=ACTIVATIONS[act], norm_kind="rms",
        norm_eps=float(_field(raw, "rms_norm_eps", where, 1e-6, float)),
        attn_bias=qkv_bias or attention_bias, attn_out_bias=attention_bias,
        mlp_bias=_field(raw, "mlp_bias", where, False, bool),
        tie_embeddings=_field(raw, "tie_word_embeddings", where, False, bool),
        rope_theta=_rope_theta(raw, where), rope_style="half", update_rule=update_rule,
        gate_init=float(gate_init), empty_memory="zero")


def hf_shapes(cfg: InfiniConfig) -> dict[str, tuple[int, ...]]:
    """The tensors of the HF checkpoint, by name, with the shapes `cfg` implies."""
    d, f, hd = cfg.d_model, cfg.ffn_dim, cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        shapes.update({p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,),
                       a + "q_proj.weight": (q, d), a + "k_proj.weight": (kv, d),
                       a + "v_proj.weight": (kv, d), a + "o_proj.weight": (d, q),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
        if cfg.attn_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if cfg.attn_out_bias:
            shapes[p + "self_attn.o_proj.bias"] = (d,)
        if cfg.mlp_bias:
            shapes.update({p + "mlp.gate_proj.bias": (f,), p + "mlp.up_proj.bias": (f,),
                           p + "mlp.down_proj.bias": (d,)})
    return shapes


def native_tensors(hf: dict[str, torch.Tensor], cfg: InfiniConfig) -> dict[str, torch.Tensor]:
    """The HF tensors under our names, with a new beta = gate_init per query head."""
    out = {"embed.weight": hf["model.embed_tokens.weight"],
           "final_norm.weight": hf["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = hf["lm_head.weight"]
    for i in range(cfg.n_layers):
        p, ours = f"model.layers.{i}.", f"layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        out.update({
            ours + "attn_norm.weight": hf[p + "input_layernorm.weight"],
            ours + "mlp_norm.weight": hf[p + "post_attention_layernorm.weight"],
            ours + "attn.qkv_proj.weight": torch.cat([hf[attn + f"{x}_proj.weight"]
                                                      for x in "qkv"]),
            ours + "attn.o_proj.weight": hf[attn + "o_proj.weight"],
            ours + "attn.beta": torch.full((cfg.n_heads,), cfg.gate_init),
            ours + "mlp.gate_up_proj.weight": torch.cat((hf[mlp + "gate_proj.weight"],
                                                         hf[mlp + "up_proj.weight"])),
            ours + "mlp.down_proj.weight": hf[mlp + "down_proj.weight"]})
        if cfg.attn_bias:
            out[ours + "attn.qkv_proj.bias"] = torch.cat([hf[attn + f"{x}_proj.bias"]
                                                          for x in "qkv"])
        if cfg.attn_out_bias:
            out[ours + "attn.o_proj.bias"] = hf[attn + "o_proj.bias"]
        if cfg.mlp_bias:
            out[ours + "mlp.gate_up_proj.bias"] = torch.cat((hf[mlp + "gate_proj.bias"],
                                                             hf[mlp + "up_proj.bias"]))
            out[ours + "mlp.down_proj.bias"] = hf[mlp + "down_proj.bias"]
    return out


def weight_files(src: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that should hold it (sharded or single-file)."""
    index = src / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no \"weight_map\"")
        files = {name: inside(src, file) for name, file in weight_map.items()}
        missing = sorted({p.name for p in files.values() if not p.is_file()})
        if missing:
            raise CheckpointError(f"{src} is missing shard(s) {', '.join(missing[:3])}"
                                  f"{' ...' if len(missing) > 3 else ''} listed in {INDEX_FILE}")
        return files
    single = src / SINGLE_FILE
    if single.is_file():
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(single), "pt") as f:
                return {name: single for name in f.keys()}
        except SafetensorError as exc:
            raise CheckpointError(f"{single} is corrupt or truncated ({exc})") from None
    if any(src.glob("pytorch_model*.bin")):
        raise CheckpointError(f"{src} holds PyTorch .bin weights; infini-trt reads safetensors "
                              f"(re-save with save_pretrained(..., safe_serialization=True))")
    raise CheckpointError(f"{src} has no {SINGLE_FILE} or {INDEX_FILE}")


def read_tensors(files: dict[str, Path], shapes: dict[str, tuple[int, ...]],
                 where: str) -> dict[str, torch.Tensor]:
    """Load the tensors named in `shapes` from their files, one file open at a time, checking
    each shape from the file's header before reading its data."""
    from safetensors import SafetensorError, safe_open

    by_file: dict[Path, list[str]] = {}
    for name in shapes:
        by_file.setdefault(files[name], []).append(name)
    tensors = {}
    for path, wanted in by_file.items():
        try:
            with safe_open(str(path), "pt") as f:
                present = set(f.keys())
                absent = [n for n in wanted if n not in present]
                if absent:
                    raise CheckpointError(f"{path} does not hold {absent[0]}, which "
                                          f"{INDEX_FILE} places there")
                for name in wanted:
                    expect_shape(name, f.get_slice(name), shapes[name], where)
                tensors.update({n: f.get_tensor(n) for n in wanted})
        except SafetensorError as exc:
            raise CheckpointError(f"{path} is corrupt or truncated ({exc})") from None
    return tensors


def load_hf(src: str | Path, segment_len: int | None = None, update_rule: str = "linear",
            gate_init: float = DEFAULT_GATE_INIT, dtype: torch.dtype | None = None):
    """A Llama-family checkpoint directory -> an `InfiniLM` (in `dtype`, default the
    source's) with a new gate beta = gate_init in every layer."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a directory (expected a Hugging Face checkpoint "
                              f"with config.json and safetensors weights)")
    config_path = src / "config.json"
    if not math.isfinite(gate_init):
        raise ConfigError(f"--gate-init must be a finite number, got {gate_init}")
    cfg = config_from_hf(read_json(config_path, "model config"), segment_len, update_rule,
                         gate_init, str(config_path))
    files = weight_files(src)
    expected = hf_shapes(cfg)
    ignored = {n for n in files if n.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        ignored.add("lm_head.weight")       # HF ties it to the embedding whatever it holds
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected) - ignored)
    if missing:
        raise CheckpointError(f"{src}: missing tensor(s) {', '.join(missing[:3])}"
                              f"{' ...' if len(missing) > 3 else ''} for a {cfg.n_layers}-layer "
                              f"model as config.json describes it")
    if unexpected:
        raise CheckpointError(f"{src}: unexpected tensor(s) {', '.join(unexpected[:3])}"
                              f"{' ...' if len(unexpected) > 3 else ''}; config.json does not "
                              f"describe these weights")
    hf = read_tensors(files, expected, str(src))
    dtype = hf["model.embed_tokens.weight"].dtype if dtype is None else dtype
    return native_model(cfg, native_tensors(hf, cfg), dtype, str(src))


def convert_hf(src: str | Path, output: str | Path, gate_init: float = DEFAULT_GATE_INIT,
               segment_len: int | None = None, update_rule: str = "linear",
               dtype: str | None = None, force: bool = False) -> InfiniConfig:
    """SRC_DIR (a Llama-family HF checkpoint) -> a native checkpoint at `output`, keeping its
    tokenizer.json and the chat template beside it (checkpoint.TOKENIZER_COMPANIONS). Returns
    the converted model's config."""
    check_output(output, "dir", force, inputs=(src,))              # before any reading
    model = load_hf(src, segment_len, update_rule, gate_init,
                    None if dtype is None else dtype_from_name(dtype))
    tokenizer = Path(src) / "tokenizer.json"
    save_checkpoint(model, output, tokenizer=tokenizer if tokenizer.is_file() else None,
                    force=force, inputs=(src,))
    return model.cfg
