"""Native checkpoints: bit-exact round trip, and one clear error for every kind of bad input."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import random_model
from infini_trt.export import InfiniLM, init_weights, load_checkpoint, preset, save_checkpoint
from infini_trt.export.errors import CheckpointError, InfiniTrtError


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_round_trip_is_bit_exact(tmp_path, dtype, tied):
    cfg = preset("tiny", tie_embeddings=tied, lm_head_bias=tied)
    model = random_model(cfg, seed=1, dtype=dtype)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.cfg == cfg
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    if tied:
        assert loaded.lm_head.weight.data_ptr() == loaded.embed.weight.data_ptr()
    tokens = torch.randint(0, 256, (1, 40))
    assert torch.equal(model(tokens)[0], loaded(tokens)[0])


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(init_weights(InfiniLM(preset("tiny")), 0), path)
    return path


def edit_config(path, fn):
    meta = json.loads((path / "config.json").read_text())
    fn(meta)
    (path / "config.json").write_text(json.dumps(meta))


def edit_tensors(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def truncate(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


BAD = [
    pytest.param(lambda p: p / "nope", "no such checkpoint", id="missing-path"),
    pytest.param(lambda p: (p / "config.json"), "is not a checkpoint directory", id="a-file"),
    pytest.param(lambda p: ((p / "config.json").unlink(), p)[1], "has no config.json", id="no-config"),
    pytest.param(lambda p: ((p / "config.json").write_text("{oops"), p)[1], "not valid JSON",
                 id="bad-json"),
    pytest.param(lambda p: (edit_config(p, lambda m: m.pop("format")), p)[1],
                 "not an infini-trt config", id="foreign-config"),
    pytest.param(lambda p: (edit_config(p, lambda m: m["model"].update(rope_scaling=2)), p)[1],
                 "unknown config field(s): rope_scaling", id="unknown-field"),
    pytest.param(lambda p: (edit_config(p, lambda m: m["model"].pop("n_layers")), p)[1],
                 "missing config field(s): n_layers", id="missing-field"),
    pytest.param(lambda p: (edit_config(p, lambda m: m["model"].update(n_kv_heads=3)), p)[1],
                 "must be a multiple of n_kv_heads", id="inconsistent-config"),
    pytest.param(lambda p: (edit_config(p, lambda m: m["model"].update(update_rule="hebb")), p)[1],
                 "update_rule' must be one of linear, delta", id="bad-choice"),
    pytest.param(lambda p: ((p / "model.safetensors").unlink(), p)[1], "has no model.safetensors",
                 id="no-weights"),
    pytest.param(lambda p: (truncate(p), p)[1], "is corrupt or truncated", id="truncated"),
    pytest.param(lambda p: (edit_tensors(p, lambda t: t.pop("layers.1.attn.beta")), p)[1],
                 "missing tensor(s) layers.1.attn.beta", id="missing-tensor"),
    pytest.param(lambda p: (edit_tensors(p, lambda t: t.update(extra=torch.zeros(1))), p)[1],
                 "unexpected tensor(s) extra", id="unexpected-tensor"),
    pytest.param(lambda p: (edit_tensors(p, lambda t: t.update({"embed.weight": torch.zeros(255, 64)})), p)[1],
                 "tensor embed.weight has shape [255, 64], the config expects [256, 64]",
                 id="shape-mismatch"),
    pytest.param(lambda p: (edit_tensors(p, lambda t: t.update({"final_norm.weight": torch.ones(64).half()})), p)[1],
                 "tensor final_norm.weight is float16, config.json says float32", id="dtype-mismatch"),
    pytest.param(lambda p: (edit_config(p, lambda m: m["model"].update(n_layers=3)), p)[1],
                 "missing tensor(s) layers.2", id="config-does-not-match-weights"),
]


@pytest.mark.parametrize("make_bad,message", BAD)
def test_bad_checkpoint_gives_one_clear_error(ckpt, make_bad, message):
    path = make_bad(ckpt)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, InfiniTrtError)


def test_save_refuses_non_empty_directory_and_leaves_it_alone(ckpt):
    before = (ckpt / "model.safetensors").read_bytes()
    with pytest.raises(InfiniTrtError, match="not empty"):
        save_checkpoint(init_weights(InfiniLM(preset("tiny")), 1), ckpt)
    assert (ckpt / "model.safetensors").read_bytes() == before
    save_checkpoint(init_weights(InfiniLM(preset("tiny")), 1), ckpt, force=True)
    assert (ckpt / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt"], "temporary files left"


def test_outputs_get_the_usual_permissions(ckpt):
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((ckpt / "config.json").stat().st_mode) == 0o666 & ~mask


def test_tokenizer_companions_travel_only_with_a_tokenizer_json(tmp_path):
    """A tokenizer.json brings the chat-template files beside it; a tokenizer under another
    name (a training script's temporary file) does not take its directory's files."""
    model = init_weights(InfiniLM(preset("tiny")), 0)
    source = tmp_path / "hf"
    source.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "special_tokens_map.json", "other.tokenizer.json"):
        (source / name).write_text(f"the {name}")
    save_checkpoint(model, tmp_path / "a", tokenizer=source / "tokenizer.json")
    assert {p.name: p.read_text() for p in (tmp_path / "a").iterdir()
            if p.suffix != ".safetensors" and p.name != "config.json"} == {
        "tokenizer.json": "the tokenizer.json",
        "tokenizer_config.json": "the tokenizer_config.json",
        "chat_template.jinja": "the chat_template.jinja"}
    save_checkpoint(model, tmp_path / "b", tokenizer=source / "other.tokenizer.json")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json"]
    assert (tmp_path / "b" / "tokenizer.json").read_text() == "the other.tokenizer.json"
