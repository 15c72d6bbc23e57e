"""The model against the naive token-by-token implementation, in float64, and the
invariants of the segment recurrence."""
import pytest
import torch

from helpers import assert_close, random_model, random_tokens, with_random_biases
from naive import naive_logits
from infini_trt.export import preset

TINY = preset("tiny")
CONFIGS = [
    pytest.param(TINY, id="tiny-gqa-linear"),
    pytest.param(TINY.replace(update_rule="delta"), id="delta"),
    pytest.param(TINY.replace(empty_memory="bypass"), id="bypass"),
    pytest.param(TINY.replace(update_rule="delta", empty_memory="bypass"), id="delta-bypass"),
    pytest.param(TINY.replace(n_kv_heads=4), id="mha"),
    pytest.param(TINY.replace(n_kv_heads=1), id="mqa"),
    # the lucidrains conventions: l2 norm, interleaved rope, gelu, biases, logits bias
    pytest.param(TINY.replace(norm_kind="l2", norm_eps=1e-12, rope_style="interleaved",
                              ffn_activation="gelu", mlp_bias=True, lm_head_bias=True,
                              n_kv_heads=4, update_rule="delta", empty_memory="bypass"),
                 id="lucidrains-like"),
    # the Qwen2-like conventions: qkv bias, tied embeddings, gelu_tanh
    pytest.param(TINY.replace(attn_bias=True, attn_out_bias=True, tie_embeddings=True,
                              ffn_activation="gelu_tanh", rope_theta=1e6), id="biases-tied"),
]



@pytest.mark.parametrize("cfg", CONFIGS)
def test_model_matches_naive_over_segments(cfg):
    cfg = cfg.replace(segment_len=8)
    model = with_random_biases(random_model(cfg, seed=3), seed=4)
    tokens = random_tokens(cfg.vocab_size, 1, 3 * 8 + 5, seed=5)      # 3 full + 1 partial segment
    logits, memory, norm = model(tokens)
    want, want_m, want_z = naive_logits(cfg, model.state_dict(), tokens[0].tolist())
    assert_close(want, logits[0], 1e-10, what="logits")
    for layer in range(cfg.n_layers):
        for j in range(cfg.n_kv_heads):
            assert_close(want_m[layer][j], memory[layer, 0, j], 1e-10, what="memory")
            assert_close(want_z[layer][j], norm[layer, 0, j], 1e-10, what="norm")


def test_memory_matters_in_these_tests(tiny_model):
    """Guard against a vacuous comparison: the memory changes the logits of later segments."""
    tokens = random_tokens(256, 1, 96, seed=6)
    logits, _, _ = tiny_model(tokens)
    memory, norm = tiny_model.init_state(1)
    alone, _, _ = tiny_model.step(tokens[:, 64:], memory, norm)
    assert (logits[:, 64:] - alone).abs().max() > 1e-2


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_chunking_invariance(tiny_cfg, rule):
    """forward([a, b, c, d]) == forward([c, d]) from the state [a, b] left behind."""
    model = random_model(tiny_cfg.replace(update_rule=rule), seed=7)
    n = tiny_cfg.segment_len
    tokens = random_tokens(256, 2, 4 * n - 3, seed=8)
    full, m_full, z_full = model(tokens)
    head, m_ab, z_ab = model(tokens[:, :2 * n])
    tail, m_end, z_end = model(tokens[:, 2 * n:], m_ab, z_ab)
    assert_close(full, torch.cat([head, tail], dim=1), 1e-13, what="logits")
    assert_close(m_full, m_end, 1e-13, what="memory")
    assert_close(z_full, z_end, 1e-13, what="norm")


def test_batch_independence(tiny_model):
    tokens = random_tokens(256, 3, 70, seed=9)
    batched, memory, norm = tiny_model(tokens)
    for b in range(3):
        alone, m, z = tiny_model(tokens[b:b + 1])
        assert_close(alone[0], batched[b], 1e-13, what=f"logits of sequence {b}")
        assert_close(m[:, 0], memory[:, b], 1e-13, what=f"memory of sequence {b}")
        assert_close(z[:, 0], norm[:, b], 1e-13)


def test_gqa_equals_mha_with_repeated_kv_heads(tiny_cfg):
    """Query head h reads KV head h // group: for attention and for its memory."""
    gqa = random_model(tiny_cfg, seed=10)
    mha_cfg = tiny_cfg.replace(n_kv_heads=tiny_cfg.n_heads)
    mha = random_model(mha_cfg, seed=10)
    hd, h, hkv, g = tiny_cfg.head_dim, tiny_cfg.n_heads, tiny_cfg.n_kv_heads, tiny_cfg.group_size
    sd = gqa.state_dict()
    for i in range(tiny_cfg.n_layers):
        w = sd[f"layers.{i}.attn.qkv_proj.weight"]
        q, k, v = w.split([h * hd, hkv * hd, hkv * hd])
        repeat = lambda t: t.view(hkv, hd, -1).repeat_interleave(g, dim=0).reshape(h * hd, -1)
        sd[f"layers.{i}.attn.qkv_proj.weight"] = torch.cat([q, repeat(k), repeat(v)])
    mha.load_state_dict(sd)
    tokens = random_tokens(256, 2, 80, seed=11)
    assert_close(gqa(tokens)[0], mha(tokens)[0], 1e-12, what="logits")


def test_step_is_pure_and_state_shapes(tiny_model, tiny_cfg):
    memory, norm = tiny_model.init_state(2)
    memory += 0.1
    norm += 1.0
    m_in, z_in = memory.clone(), norm.clone()
    tokens = random_tokens(256, 2, 5, seed=12)
    logits, m_out, z_out = tiny_model.step(tokens, memory, norm)
    assert torch.equal(memory, m_in) and torch.equal(norm, z_in)
    assert logits.shape == (2, 5, 256)
    assert m_out.shape == tiny_cfg.memory_shape(2) and z_out.shape == tiny_cfg.norm_shape(2)


def test_empty_memory_policies_differ_only_on_first_segment(tiny_cfg):
    zero = random_model(tiny_cfg, seed=13)
    bypass = random_model(tiny_cfg.replace(empty_memory="bypass"), seed=13)
    tokens = random_tokens(256, 1, 3 * tiny_cfg.segment_len, seed=14)
    a, _, _ = zero(tokens)
    b, _, _ = bypass(tokens)
    n = tiny_cfg.segment_len
    assert (a[:, :n] - b[:, :n]).abs().max() > 1e-3    # zero policy scales A_dot by 1 - g
    # from the second segment on both read a non-empty memory; the difference is inherited
    # through memory only, so the models agree when started from the same filled state
    _, m, z = zero(tokens[:, :n])
    a2, _, _ = zero(tokens[:, n:], m, z)
    b2, _, _ = bypass(tokens[:, n:], m, z)
    assert_close(a2, b2, 1e-13)


def test_partial_segment_is_a_valid_step(tiny_model):
    tokens = random_tokens(256, 1, 1, seed=15)
    logits, memory, norm = tiny_model(tokens)
    assert logits.shape == (1, 1, 256)
    assert (norm > 0).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-2),
                                       (torch.bfloat16, 5e-2)], ids=["fp32", "fp16", "bf16"])
def test_low_precision_weights_keep_fp32_state(tiny_cfg, dtype, tol):
    ref = random_model(tiny_cfg, seed=16)
    model = random_model(tiny_cfg, seed=16, dtype=dtype)
    tokens = random_tokens(256, 2, 3 * tiny_cfg.segment_len + 7, seed=17)
    want, want_m, want_z = ref(tokens)
    got, m, z = model(tokens)
    assert m.dtype == torch.float32 and z.dtype == torch.float32
    assert_close(want, got, tol, what="logits")
    assert_close(want_m, m, tol, what="memory")
    assert_close(want_z, z, tol, what="norm")
