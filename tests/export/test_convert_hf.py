"""The Hugging Face importer against `transformers` itself: with a gate that gives memory no
weight, every segment's logits equal the source model's on that segment."""
import json
import shutil

import pytest
import torch

from helpers import assert_close, random_tokens
from infini_trt.export import load_checkpoint
from infini_trt.export.checkpoint import TOKENIZER_COMPANIONS
from infini_trt.export.convert.hf import DEFAULT_GATE_INIT, config_from_hf, convert_hf, load_hf
from infini_trt.export.errors import CheckpointError, ConfigError, InfiniTrtError

transformers = pytest.importorskip("transformers")

N = 24                                              # segment length of the converted models
NO_MEMORY = -1e4                                    # sigmoid(-1e4) == 0 exactly
SHAPE = dict(vocab_size=100, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
SOURCES = {
    # GQA, every bias, a non-default theta, sharded into several files
    "llama": ("LlamaForCausalLM", "LlamaConfig",
              dict(attention_bias=True, mlp_bias=True, rope_theta=5e5), "20KB"),
    # q/k/v biases, tied embeddings
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=True), None),
    # head_dim != hidden_size / heads, no sliding window
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(head_dim=16, sliding_window=None),
                None),
}


def hf_model(name, seed=0):
    """A tiny random transformers model whose biases and norms are away from their init."""
    model_cls, config_cls, extra, _ = SOURCES[name]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        config = getattr(transformers, config_cls)(**SHAPE, **extra)
        model = getattr(transformers, model_cls)(config)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("bias") or "norm" in pname:
                    p.add_(torch.randn(p.shape) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (checkpoint directory, the transformers model it holds), saved once."""
    made = {}

    def make(name):
        if name not in made:
            path = tmp_path_factory.mktemp(name)
            model = hf_model(name)
            model.save_pretrained(path, max_shard_size=SOURCES[name][3] or "5GB")
            made[name] = (path, model)
        return made[name]

    return make


@torch.no_grad()
def per_segment(model, ids, segment_len):
    """The source model run on each segment alone (positions from 0 in each)."""
    return torch.cat([model(s).logits for s in ids.split(segment_len, dim=1)], dim=1)


@pytest.mark.parametrize("name", list(SOURCES))
def test_logits_equal_transformers(saved, name):
    path, hf = saved(name)
    if name == "llama":
        assert (path / "model.safetensors.index.json").is_file()     # sharded
    ours = load_hf(path, segment_len=N, gate_init=NO_MEMORY)
    ids = random_tokens(SHAPE["vocab_size"], 2, 3 * N + 7, seed=1)
    with torch.no_grad():
        got = ours(ids)[0]
    # one sequence inside one segment: the parity
    assert_close(per_segment(hf, ids[:, :N], N), got[:, :N], rel_rms=1e-5, what="segment 1")
    # later segments: memory is written but has no weight, positions restart
    assert_close(per_segment(hf, ids, N), got, rel_rms=1e-5, what="all segments")


def test_float64_parity(saved):
    """transformers computes RoPE angles in float32 even for a float64 model: ~1e-7."""
    path, hf = saved("llama")
    ours = load_hf(path, segment_len=N, gate_init=NO_MEMORY, dtype=torch.float64)
    hf64 = hf_model("llama").to(torch.float64)
    ids = random_tokens(SHAPE["vocab_size"], 2, N, seed=2)
    with torch.no_grad():
        assert_close(hf64(ids).logits, ours(ids)[0], rel_rms=1e-6, what="logits")


def test_default_gate_memory_has_small_weight(saved):
    path, hf = saved("qwen2")
    ours = load_hf(path, segment_len=N)
    assert ours.cfg.gate_init == DEFAULT_GATE_INIT
    for layer in ours.layers:
        assert torch.equal(layer.attn.beta, torch.full((SHAPE["num_attention_heads"],),
                                                       DEFAULT_GATE_INIT))
    ids = random_tokens(SHAPE["vocab_size"], 1, 3 * N, seed=3)
    with torch.no_grad():
        from infini_trt.runtime.metrics import errors
        e = errors(per_segment(hf, ids, N), ours(ids)[0])
    assert 1e-5 < e.rel_rms < 0.1, e.rel_rms         # memory counts, a little


def test_convert_keeps_tokenizer_and_options(saved, tmp_path):
    from tokenizers import Tokenizer, models

    path, _ = saved("mistral")
    src = tmp_path / "src"
    shutil.copytree(path, src)
    Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).save(
        str(src / "tokenizer.json"))
    cfg = convert_hf(src, tmp_path / "out", gate_init=-2.0, segment_len=16,
                     update_rule="delta", dtype="bf16")
    model = load_checkpoint(tmp_path / "out")
    assert model.cfg == cfg
    assert (cfg.segment_len, cfg.update_rule, cfg.gate_init) == (16, "delta", -2.0)
    assert model.embed.weight.dtype == torch.bfloat16
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == \
        (src / "tokenizer.json").read_bytes()


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                 "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def save_chat_tokenizer(path, jinja):
    """A transformers tokenizer with CHAT_TEMPLATE, saved into `path` as transformers saves it:
    the template in chat_template.jinja (`jinja`, newer transformers' default) or in
    tokenizer_config.json -> the prompt transformers renders for MESSAGES."""
    from tokenizers import Tokenizer, models

    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
        bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path, save_jinja_files=jinja)
    if (path / "chat_template.jinja").is_file() != jinja:
        pytest.skip(f"transformers {transformers.__version__} does not save chat_template.jinja")
    return tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


def converted_with_chat_template(saved, tmp_path, jinja):
    """(HF source directory, its native conversion, transformers' prompt for MESSAGES)."""
    src = tmp_path / "src"
    shutil.copytree(saved("mistral")[0], src)
    expected = save_chat_tokenizer(src, jinja)
    convert_hf(src, tmp_path / "ckpt", segment_len=16)
    return src, tmp_path / "ckpt", expected


@pytest.mark.parametrize("jinja", [True, False], ids=["chat_template.jinja", "tokenizer_config"])
def test_convert_keeps_the_chat_template(saved, tmp_path, jinja):
    pytest.importorskip("pydantic", reason="the serve extra is not installed")
    from infini_trt.runtime.serving.schemas import ChatTemplate

    src, ckpt, expected = converted_with_chat_template(saved, tmp_path, jinja)
    for name in ("tokenizer.json", *TOKENIZER_COMPANIONS):
        if (src / name).is_file():
            assert (ckpt / name).read_bytes() == (src / name).read_bytes(), name
    assert (ckpt / "tokenizer_config.json").is_file()
    assert ChatTemplate.of(src).render(MESSAGES) == expected           # as transformers reads it
    template = ChatTemplate.of(ckpt)
    assert template.kind == "tokenizer" and template.render(MESSAGES) == expected


def test_export_and_quantize_keep_the_chat_template(saved, tmp_path):
    """The export of a converted checkpoint (what export_checkpoint passes export_model; one
    graph, for time) and its quantized copy serve the template beside their tokenizer.json."""
    pytest.importorskip("pydantic", reason="the serve extra is not installed")
    from infini_trt.export.checkpoint import read_checkpoint
    from infini_trt.export.manifest import read_manifest
    from infini_trt.export.onnx_export import export_model
    from infini_trt.export.quantize import quantize_export
    from infini_trt.runtime.serving.schemas import ChatTemplate

    _, ckpt, expected = converted_with_chat_template(saved, tmp_path, jinja=True)
    export_model(load_checkpoint(ckpt), tmp_path / "onnx", graphs=("fold",),
                 tokenizer=read_checkpoint(ckpt).tokenizer_path)
    quantize_export(tmp_path / "onnx", tmp_path / "int8")
    for out in (tmp_path / "onnx", tmp_path / "int8"):
        assert read_manifest(out).tokenizer == "tokenizer.json"        # its content hash holds
        for name in ("tokenizer.json", *TOKENIZER_COMPANIONS):
            assert (out / name).read_bytes() == (ckpt / name).read_bytes(), (out.name, name)
        assert ChatTemplate.of(out).render(MESSAGES) == expected, out.name


# --- config.json forms (no weights needed) --------------------------------------------------
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SHAPE}


@pytest.mark.parametrize("extra, theta", [
    pytest.param({}, 10000.0, id="nothing"),
    pytest.param({"rope_theta": 5e5, "rope_scaling": None}, 5e5, id="v4"),
    pytest.param({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, 1e6, id="v5"),
    pytest.param({"rope_theta": 2e4, "rope_scaling": {"type": "linear", "factor": 1.0}}, 2e4,
                 id="linear-1"),
    pytest.param({"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}, 10000.0,
                 id="dynamic"),
])
def test_rope_forms(extra, theta):
    assert config_from_hf({**LLAMA, **extra}, segment_len=N).rope_theta == theta


def test_segment_len_default():
    assert config_from_hf(LLAMA).segment_len == 2048
    assert config_from_hf({**LLAMA, "max_position_embeddings": 512}).segment_len == 512


BAD_CONFIGS = [
    pytest.param({**LLAMA, "architectures": ["GemmaForCausalLM"], "model_type": "gemma"},
                 "architecture GemmaForCausalLM is not supported", id="unknown-arch"),
    pytest.param({"model_type": "phi3", **SHAPE}, "model_type 'phi3' is not supported",
                 id="unknown-type"),
    pytest.param({**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
                 "RoPE scaling 'llama3'", id="llama3-rope"),
    pytest.param({**LLAMA, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
                 "RoPE scaling 'yarn'", id="yarn"),
    pytest.param({**LLAMA, "rope_scaling": {"type": "linear", "factor": 2.0}},
                 "RoPE scaling 'linear'", id="linear-2"),
    pytest.param({**LLAMA, "partial_rotary_factor": 0.5}, "partial rotary", id="partial-rope"),
    pytest.param({**LLAMA, "hidden_act": "relu"}, "hidden_act 'relu'", id="activation"),
    pytest.param({k: v for k, v in LLAMA.items() if k != "hidden_size"},
                 "missing field 'hidden_size'", id="missing-field"),
    pytest.param({**LLAMA, "num_hidden_layers": "2"}, "'num_hidden_layers' must be a positive "
                 "integer", id="bad-type"),
    pytest.param({**LLAMA, "max_position_embeddings": 16}, "exceeds the model's "
                 "max_position_embeddings", id="segment-too-long"),
    pytest.param({**LLAMA, "architectures": ["MistralForCausalLM"], "sliding_window": 8},
                 "sliding_window (8) is shorter", id="sliding-window"),
    pytest.param({**LLAMA, "num_key_value_heads": 3}, "multiple of n_kv_heads", id="bad-gqa"),
]


@pytest.mark.parametrize("raw, message", BAD_CONFIGS)
def test_bad_configs(raw, message):
    with pytest.raises(ConfigError) as info:
        config_from_hf(raw, segment_len=N)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_qwen2_window_only_when_used():
    qwen = {**LLAMA, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 8}
    assert config_from_hf(qwen, segment_len=N).attn_bias
    with pytest.raises(ConfigError, match="sliding_window"):
        config_from_hf({**qwen, "use_sliding_window": True}, segment_len=N)


# --- broken checkpoint directories ----------------------------------------------------------
def _edit_config(src, **changes):
    raw = json.loads((src / "config.json").read_text())
    raw.update(changes)
    (src / "config.json").write_text(json.dumps(raw))


def _drop_first_shard(src):
    index = json.loads((src / "model.safetensors.index.json").read_text())
    (src / sorted(set(index["weight_map"].values()))[0]).unlink()


def _truncate_weights(src):
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])


def _bin_only(src):
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"")


BAD_DIRS = [
    pytest.param("llama", _drop_first_shard, CheckpointError, "missing shard(s) model-00001",
                 id="missing-shard"),
    pytest.param("qwen2", lambda s: _edit_config(s, intermediate_size=96), ConfigError,
                 "model.layers.0.mlp.gate_proj.weight has shape [80, 48], the configuration "
                 "expects [96, 48]",
                 id="shape-mismatch"),
    pytest.param("qwen2", lambda s: _edit_config(s, num_hidden_layers=3), CheckpointError,
                 "missing tensor(s) model.layers.2", id="too-many-layers"),
    pytest.param("qwen2", lambda s: _edit_config(s, num_hidden_layers=1), CheckpointError,
                 "unexpected tensor(s) model.layers.1", id="too-few-layers"),
    pytest.param("qwen2", lambda s: _edit_config(s, tie_word_embeddings=False), CheckpointError,
                 "missing tensor(s) lm_head.weight", id="untied-without-head"),
    pytest.param("mistral", lambda s: _edit_config(s, architectures=["Qwen2ForCausalLM"]),
                 CheckpointError, "missing tensor(s) model.layers.0.self_attn.k_proj.bias",
                 id="wrong-architecture"),
    pytest.param("qwen2", _truncate_weights, CheckpointError, "corrupt or truncated",
                 id="truncated"),
    pytest.param("qwen2", _bin_only, CheckpointError, "holds PyTorch .bin weights", id="bin"),
    pytest.param("qwen2", lambda s: (s / "config.json").unlink(), CheckpointError,
                 "model config", id="no-config"),
]


@pytest.mark.parametrize("name, edit, error, message", BAD_DIRS)
def test_bad_checkpoint_dirs(saved, tmp_path, name, edit, error, message):
    src = tmp_path / "src"
    shutil.copytree(saved(name)[0], src)
    edit(src)
    with pytest.raises(error) as info:
        convert_hf(src, tmp_path / "out", segment_len=N)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_tied_model_with_a_stored_head(saved, tmp_path):
    """Some tied checkpoints also store lm_head.weight; transformers ignores it, so do we."""
    from safetensors.torch import load_file, save_file

    path, hf = saved("qwen2")
    src = tmp_path / "src"
    shutil.copytree(path, src)
    tensors = load_file(str(src / "model.safetensors"))
    tensors["lm_head.weight"] = torch.zeros_like(tensors["model.embed_tokens.weight"])
    save_file(tensors, str(src / "model.safetensors"))
    ours = load_hf(src, segment_len=N, gate_init=NO_MEMORY)
    ids = random_tokens(SHAPE["vocab_size"], 1, N, seed=5)
    with torch.no_grad():
        assert_close(hf(ids).logits, ours(ids)[0], rel_rms=1e-5, what="logits")


def test_not_a_directory(tmp_path):
    with pytest.raises(InfiniTrtError, match="is not a directory"):
        load_hf(tmp_path / "absent")
