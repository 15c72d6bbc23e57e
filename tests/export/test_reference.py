"""The pure memory math (eq 7-10) against per-token loops, in float64."""
import pytest
import torch

from helpers import assert_close
from infini_trt.export import reference

B, H, S, DK, DV, EPS = 2, 3, 7, 5, 6, 1e-6


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def filled_state(seed):
    """A memory that has seen a segment: non-zero M, positive z."""
    k, v = rand(B, H, 11, DK, seed=seed), rand(B, H, 11, DV, seed=seed + 1)
    zero_m, zero_z = torch.zeros(B, H, DK, DV, dtype=torch.float64), torch.zeros(B, H, DK, dtype=torch.float64)
    return reference.memory_update(zero_m, zero_z, k, v, "linear", EPS)


def loop_update(memory, norm, k, v, rule):
    m, z = memory.clone(), norm.clone()
    for b in range(B):
        for h in range(H):
            m_old, z_old = memory[b, h], norm[b, h]
            for t in range(k.shape[2]):
                sk = torch.where(k[b, h, t] > 0, k[b, h, t] + 1, torch.exp(k[b, h, t]))
                target = v[b, h, t]
                if rule == "delta":
                    target = target - (sk @ m_old) / max(float(sk @ z_old), EPS)
                m[b, h] += torch.outer(sk, target)
                z[b, h] += sk
    return m, z


@pytest.mark.parametrize("rule", ["linear", "delta"])
@pytest.mark.parametrize("empty", [True, False], ids=["empty-memory", "filled-memory"])
def test_update_matches_per_token_loop(rule, empty):
    memory, norm = filled_state(10)
    if empty:
        memory, norm = torch.zeros_like(memory), torch.zeros_like(norm)
    k, v = rand(B, H, S, DK, seed=1), rand(B, H, S, DV, seed=2)
    m_in, z_in = memory.clone(), norm.clone()
    got_m, got_z = reference.memory_update(memory, norm, k, v, rule, EPS)
    want_m, want_z = loop_update(memory, norm, k, v, rule)
    assert_close(want_m, got_m, 1e-13, what="memory")
    assert_close(want_z, got_z, 1e-13, what="norm")
    assert torch.equal(memory, m_in) and torch.equal(norm, z_in), "inputs were mutated"


def test_delta_rule_differs_from_linear_on_filled_memory():
    memory, norm = filled_state(3)
    k, v = rand(B, H, S, DK, seed=4), rand(B, H, S, DV, seed=5)
    lin, _ = reference.memory_update(memory, norm, k, v, "linear", EPS)
    delta, _ = reference.memory_update(memory, norm, k, v, "delta", EPS)
    assert (lin - delta).abs().max() > 1e-3


def test_delta_rule_does_not_rewrite_a_stored_association():
    # one key stored with value v: writing (k, v) again with the delta rule changes nothing
    k, v = rand(1, 1, 1, DK, seed=6), rand(1, 1, 1, DV, seed=7)
    m0, z0 = torch.zeros(1, 1, DK, DV, dtype=torch.float64), torch.zeros(1, 1, DK, dtype=torch.float64)
    m1, z1 = reference.memory_update(m0, z0, k, v, "delta", EPS)
    m2, _ = reference.memory_update(m1, z1, k, v, "delta", EPS)
    assert_close(m1, m2, 1e-13, what="memory after re-writing the same association")


def test_retrieve_matches_loop_and_reads_zero_from_empty_memory():
    memory, norm = filled_state(8)
    q = rand(B, H, S, DK, seed=9)
    got = reference.retrieve(reference.sigma(q), memory, norm, EPS)
    for b in range(B):
        for h in range(H):
            for t in range(S):
                sq = reference.sigma(q[b, h, t])
                want = (sq @ memory[b, h]) / (sq @ norm[b, h])
                assert_close(want, got[b, h, t], 1e-13)
    empty = reference.retrieve(reference.sigma(q), torch.zeros_like(memory), torch.zeros_like(norm), EPS)
    assert torch.count_nonzero(empty) == 0


def test_sigma_is_elu_plus_one_and_positive():
    x = torch.linspace(-30, 30, 1001, dtype=torch.float64)
    want = torch.where(x > 0, x + 1, torch.exp(x))
    assert_close(want, reference.sigma(x), 1e-15)
    assert (reference.sigma(x) > 0).all()


def test_gate_mixes_per_head_and_bypass_skips_memory():
    a_mem, a_dot = rand(B, H, S, DV, seed=11), rand(B, H, S, DV, seed=12)
    beta = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)
    got = reference.gate(a_mem, a_dot, beta)
    for h in range(H):
        g = 1 / (1 + torch.exp(-beta[h]))
        assert_close(g * a_mem[:, h] + (1 - g) * a_dot[:, h], got[:, h], 1e-15)
    present = torch.tensor([[1, 0, 1], [0, 0, 0]])
    got = reference.gate(a_mem, a_dot, beta, present)
    assert torch.equal(got[1], a_dot[1]) and torch.equal(got[0, 1], a_dot[0, 1])
    assert_close(reference.gate(a_mem, a_dot, beta)[0, 2], got[0, 2], 1e-15)
    # heads second to last (B, S, H, dv): the same mix, head by head
    rows = reference.gate(a_mem.transpose(1, 2), a_dot.transpose(1, 2), beta, present, 2)
    assert torch.equal(rows, got.transpose(1, 2))


def test_memory_present_maps_kv_heads_to_query_groups():
    norm = torch.zeros(2, 2, DK, dtype=torch.float64)
    norm[0, 1, 3] = 0.5
    assert reference.memory_present(norm, 3).tolist() == [[False] * 3 + [True] * 3, [False] * 6]


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_update_keeps_state_dtype_with_low_precision_keys(kv_dtype):
    memory, norm = [t.float() for t in filled_state(13)]
    k, v = rand(B, H, S, DK, seed=14), rand(B, H, S, DV, seed=15)
    got_m, got_z = reference.memory_update(memory, norm, k.to(kv_dtype), v.to(kv_dtype), "delta", EPS)
    assert got_m.dtype == torch.float32 and got_z.dtype == torch.float32
    want_m, want_z = loop_update(memory.double(), norm.double(), k.to(kv_dtype).double(),
                                 v.to(kv_dtype).double(), "delta")
    assert_close(want_m, got_m, 1e-6, what="memory")
    assert_close(want_z, got_z, 1e-6, what="norm")
