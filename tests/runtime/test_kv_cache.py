"""The decoding caches: the write of new rows against a slot-by-slot loop; the graph runners'
windows of the first slots of a segment, moved to a new layout when the window changes, against
a whole-segment cache written slot by slot."""
import numpy as np
import pytest
import torch

from infini_trt.export import preset
from infini_trt.runtime.arrays import ArraySpace, address, copy_into, to_host
from infini_trt.runtime.kv_cache import DecodeCaches, cache_window, write_cache

CFG = preset("tiny").replace(segment_len=320, n_layers=3)     # windows of 64 slots


@pytest.mark.parametrize("n", [2, 31, 64, 100, 1024, 4096])
def test_cache_window_covers_the_tokens_in_steps(n):
    step = max(64, n // 16)
    windows = [cache_window(end, n) for end in range(n + 1)]
    for end, window in enumerate(windows):
        assert max(end, 1) <= window <= n and (window % step == 0 or window == n)
        assert window < max(end, 1) + step                   # never a step more than needed
    assert len(set(windows)) == -(-n // step)         # one window up to 64, 16 from 1024 on


SPACES = {"numpy": ArraySpace("cpu"), "torch": ArraySpace("cpu", use_torch=True)}


def dense(array) -> bool:
    return array.flags.c_contiguous if isinstance(array, np.ndarray) else array.is_contiguous()


@pytest.mark.parametrize("space", SPACES.values(), ids=SPACES.keys())
def test_windows_keep_the_slots_in_use_through_growing_and_shrinking(space):
    """Batch of 2 at different positions, tokens of 1-3 per call, a fold that restarts one
    sequence: after every call the window holds exactly what a whole-segment cache holds in
    the slots below each sequence's end, each layer's input is contiguous at a fixed address,
    and at window N the caches are the whole segment's (the fold graph's input). Slots at or
    past a sequence's end are never read, so they are not compared. Host buffers (numpy, the
    ONNX Runtime runner's on the CPU) and torch ones (a GPU runner's)."""
    rng = np.random.default_rng(1)
    n, batch = CFG.segment_len, 2
    caches = DecodeCaches(CFG, batch, "float32", space)
    shape = (CFG.n_layers, batch, CFG.n_kv_heads, n, CFG.head_dim)
    want_k, want_v = np.zeros(shape, np.float32).swapaxes(-1, -2), np.zeros(shape, np.float32)
    addresses = {name: address(t) for name, t in caches.fit(1).items()}
    position = np.array([0, 5])
    windows = []
    for call in range(400):
        length = np.minimum(np.array([1 + call % 3, 2 + 3 * (call % 2)]), n - position)
        if (length == 0).any():                               # a full segment: fold, restart
            assert caches.fit(n)["k_cache_0"].shape[-1] == n
            assert dense(caches.k) and dense(caches.v)
            for b in np.flatnonzero(length == 0):             # whole segments, as written
                assert np.array_equal(to_host(caches.k[:, b]), want_k[:, b])
                assert np.array_equal(to_host(caches.v[:, b]), want_v[:, b])
            position = np.where(length == 0, 0, position)
            continue
        seq = int(length.max())
        inputs = caches.fit(int((position + length).max()))
        windows.append(caches.window)
        for name, t in inputs.items():
            assert dense(t) and address(t) == addresses[name]
        rows = caches.new_rows(seq)
        for t in rows.values():
            copy_into(t, rng.standard_normal(t.shape))
        caches.write(rows, position, length)
        write_cache(want_k, want_v, to_host(rows["k_new"]), to_host(rows["v_new"]), position,
                    length)
        position = position + length
        for b in range(batch):
            end = int(position[b])
            assert np.array_equal(to_host(caches.k[:, b, ..., :end]), want_k[:, b, ..., :end])
            assert np.array_equal(to_host(caches.v[:, b, :, :end]), want_v[:, b, :, :end])
    grew = sum(b > a for a, b in zip(windows, windows[1:]))
    shrank = sum(b < a for a, b in zip(windows, windows[1:]))
    assert grew >= 8 and shrank >= 2


def test_caches_of_an_extend_graph_without_the_window_axis_hold_the_whole_segment():
    caches = DecodeCaches(CFG, 1, "float32", ArraySpace("cpu"), windowed=False)
    assert caches.fit(1)["v_cache_0"].shape == (1, CFG.n_kv_heads, CFG.segment_len,
                                                CFG.head_dim)


def test_write_cache_writes_only_the_real_tokens_in_place():
    gen = torch.Generator().manual_seed(0)
    L, b, h, n, s, hd = 2, 5, 2, 8, 3, 4
    k_cache = torch.randn(L, b, h, hd, n, generator=gen)       # keys stored transposed
    v_cache = torch.randn(L, b, h, n, hd, generator=gen)
    k_new, v_new = (torch.randn(L, b, h, s, hd, generator=gen) for _ in "kv")
    # full, padded, empty (length 0, also at start == N), and ending at the last slot
    start = [0, 2, 4, n, 5]
    length = [3, 1, 0, 0, 3]
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for i in range(b):
        for j in range(length[i]):
            want_k[:, i, :, :, start[i] + j] = k_new[:, i, :, j]
            want_v[:, i, :, start[i] + j] = v_new[:, i, :, j]
    k_ptr, v_ptr = k_cache.data_ptr(), v_cache.data_ptr()
    write_cache(k_cache, v_cache, k_new, v_new, start, length)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    assert (k_cache.data_ptr(), v_cache.data_ptr()) == (k_ptr, v_ptr)
