"""The lucidrains importer against the `infini-transformer-pytorch` package itself: random
models, several configurations, memories carried over >= 4 segments."""
import json

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, random_tokens
from infini_trt.export import load_checkpoint
from infini_trt.export.convert.lucidrains import (convert_lucidrains, convert_state_dict,
                                                   load_source)
from infini_trt.export.errors import CheckpointError, ConfigError, InfiniTrtError
from infini_trt.runtime.metrics import errors

lucidrains = pytest.importorskip("infini_transformer_pytorch")

N = 16                                      # segment length of every test here
BASE = dict(num_tokens=97, dim=48, depth=2, dim_head=16, heads=3)


def their_model(args, seed=0, dtype=torch.float64):
    """A random InfiniTransformer whose gates, norms and biases are all away from their init,
    so that memory, local attention and every bias carry weight in the logits."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = lucidrains.InfiniTransformer(**args)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("head_gates"):
                    p.copy_(torch.randn(p.shape) * 2.0)
                elif name.endswith(("gamma", "bias")):
                    p.add_(torch.randn(p.shape) * 0.1)
    return model.to(dtype).eval()


@torch.no_grad()
def their_logits(model, ids, segment_len):
    """Their model driven segment by segment, memories carried (as their wrapper does)."""
    memories, outputs = None, []
    for segment in ids.split(segment_len, dim=1):
        logits, _, memories = model(segment, past_memories=memories, return_new_memories=True)
        outputs.append(logits)
    return torch.cat(outputs, dim=1)


CONFIGS = [
    pytest.param(BASE, id="linear"),
    pytest.param({**BASE, "use_mem_delta_rule": True}, id="delta"),
    pytest.param({**BASE, "heads": 1, "dim_head": 32, "ff_mult": 2.5, "depth": 3},
                 id="1head-ff2.5"),
    pytest.param({**BASE, "heads": 4, "dim_head": 8, "use_mem_delta_rule": True,
                  "attn_dropout": 0.1, "ff_dropout": 0.1}, id="delta-4heads-dropout"),
]


@pytest.mark.parametrize("args", CONFIGS)
def test_logits_equal_theirs_float64(args):
    theirs = their_model(args, seed=1)
    ours = convert_state_dict(theirs.state_dict(), args, N)
    ids = random_tokens(args["num_tokens"], 2, 5 * N + 5, seed=2)       # 5 segments + partial
    # their rotary frequencies are float32 values, ours float64: ~1e-10 in float64
    assert_close(their_logits(theirs, ids, N), ours(ids)[0], rel_rms=1e-8, what="logits")


@pytest.mark.parametrize("args", CONFIGS[:2])
def test_logits_equal_theirs_float32(args):
    theirs = their_model(args, seed=3, dtype=torch.float32)
    ours = convert_state_dict(theirs.state_dict(), args, N)
    assert ours.embed.weight.dtype == torch.float32
    ids = random_tokens(args["num_tokens"], 2, 4 * N, seed=4)
    with torch.no_grad():
        assert_close(their_logits(theirs, ids, N), ours(ids)[0], rel_rms=1e-5, what="logits")


def test_their_wrapper_loss_equals_ours():
    """Their own segment loop (InfiniTransformerWrapper.forward) gives our cross entropy."""
    from infini_transformer_pytorch.wrapper import InfiniTransformerWrapper

    args = {**BASE, "use_mem_delta_rule": True}
    theirs = their_model(args, seed=5)
    ours = convert_state_dict(theirs.state_dict(), args, N)
    seq = random_tokens(args["num_tokens"], 2, 4 * N + 1, seed=6)
    with torch.no_grad():
        their_loss = InfiniTransformerWrapper(theirs, segment_length=N)(seq)
        logits = ours(seq[:, :-1])[0]
        our_loss = F.cross_entropy(logits.transpose(1, 2), seq[:, 1:])
    assert abs(their_loss.item() - our_loss.item()) <= 1e-9 * abs(our_loss.item())


def test_memory_and_rule_matter():
    """The parity above would catch a wrong update rule or a memory that is ignored."""
    args = {**BASE, "use_mem_delta_rule": True}
    theirs = their_model(args, seed=7)
    ids = random_tokens(args["num_tokens"], 1, 4 * N, seed=8)
    reference = their_logits(theirs, ids, N)
    as_linear = convert_state_dict(theirs.state_dict(), {**args, "use_mem_delta_rule": False}, N)
    one_segment = convert_state_dict(theirs.state_dict(), args, 4 * N)
    with torch.no_grad():
        assert errors(reference, as_linear(ids)[0]).rel_rms > 1e-3
        assert errors(reference, one_segment(ids)[0]).rel_rms > 1e-3


def test_config_conventions():
    cfg = convert_state_dict(their_model(BASE).state_dict(), BASE, N).cfg
    assert (cfg.norm_kind, cfg.norm_eps, cfg.rope_style, cfg.ffn_activation) == \
        ("l2", 1e-12, "interleaved", "gelu")
    assert (cfg.empty_memory, cfg.memory_eps, cfg.n_kv_heads, cfg.ffn_dim) == \
        ("bypass", 1e-10, 3, int(4 * 48 * 2 / 3))
    assert cfg.mlp_bias and cfg.lm_head_bias and not cfg.attn_bias and not cfg.tie_embeddings


def test_convert_writes_a_native_checkpoint(tmp_path):
    args = {**BASE, "use_mem_delta_rule": True}
    theirs = their_model(args, seed=9, dtype=torch.float32)
    torch.save(theirs.state_dict(), tmp_path / "model.pt")
    (tmp_path / "args.json").write_text(json.dumps(args))
    cfg = convert_lucidrains(tmp_path / "model.pt", tmp_path / "args.json", tmp_path / "out",
                             segment_len=N)
    model = load_checkpoint(tmp_path / "out")
    assert model.cfg == cfg and cfg.update_rule == "delta" and cfg.segment_len == N
    ids = random_tokens(args["num_tokens"], 1, 4 * N + 3, seed=10)
    with torch.no_grad():
        assert_close(their_logits(theirs, ids, N), model(ids)[0], rel_rms=1e-5, what="logits")


@pytest.mark.parametrize("wrap", [
    pytest.param(lambda sd: {"state_dict": sd}, id="nested"),
    pytest.param(lambda sd: {f"model.{k}": v for k, v in sd.items()}, id="wrapper-prefix"),
])
def test_load_source_unwraps(tmp_path, wrap):
    state = their_model(BASE).state_dict()
    torch.save(wrap(state), tmp_path / "x.pt")
    loaded = load_source(tmp_path / "x.pt")
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_load_source_safetensors(tmp_path):
    from safetensors.torch import save_file

    state = their_model(BASE, dtype=torch.float32).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "x.safetensors"))
    assert load_source(tmp_path / "x.safetensors").keys() == state.keys()


BAD_ARGS = [
    pytest.param({**BASE, "learned_delta_update": True}, ConfigError,
                 "learned_delta_update", id="learned-delta"),
    pytest.param({**BASE, "head_gate_init": 3}, ConfigError, "unknown InfiniTransformer "
                 "argument(s) head_gate_init", id="unknown-arg"),
    pytest.param({k: v for k, v in BASE.items() if k != "depth"}, ConfigError,
                 "missing InfiniTransformer argument(s) depth", id="missing-arg"),
    pytest.param({**BASE, "heads": "3"}, ConfigError, "'heads' must be a positive integer",
                 id="bad-type"),
    pytest.param({**BASE, "dim": 64}, ConfigError, "has shape", id="dim-mismatch"),
    pytest.param({**BASE, "heads": 6, "dim_head": 8}, ConfigError,
                 "rotary_emb.freqs has shape [8]", id="heads-mismatch"),
    pytest.param({**BASE, "depth": 3}, CheckpointError, "missing tensor(s) layers.2",
                 id="depth-too-large"),
    pytest.param({**BASE, "depth": 1}, CheckpointError, "unexpected tensor(s) layers.1",
                 id="depth-too-small"),
]


@pytest.mark.parametrize("args, error, message", BAD_ARGS)
def test_refusals(args, error, message):
    state = their_model(BASE).state_dict()
    with pytest.raises(error) as info:
        convert_state_dict(state, args, N)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_refuses_learned_delta_weights():
    state = their_model({**BASE, "learned_delta_update": True}).state_dict()
    with pytest.raises(ConfigError, match="learned delta-update weights"):
        convert_state_dict(state, BASE, N)


def test_refuses_non_default_rotary():
    state = their_model(BASE).state_dict()
    state["layers.1.0.rotary_emb.freqs"] = state["layers.1.0.rotary_emb.freqs"] * 0.5
    with pytest.raises(ConfigError, match="layer 1 has rotary frequencies"):
        convert_state_dict(state, BASE, N)


@pytest.mark.parametrize("content, message", [
    pytest.param(None, "no such file", id="missing"),
    pytest.param(b"not a pickle", "cannot read", id="garbage"),
    pytest.param({"a": 1}, "does not hold a state_dict", id="not-tensors"),
])
def test_bad_source_files(tmp_path, content, message):
    path = tmp_path / "x.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(InfiniTrtError, match=message):
        load_source(path)


def test_bad_args_file(tmp_path):
    torch.save(their_model(BASE).state_dict(), tmp_path / "m.pt")
    (tmp_path / "args.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        convert_lucidrains(tmp_path / "m.pt", tmp_path / "args.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()
