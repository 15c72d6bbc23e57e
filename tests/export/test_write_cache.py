"""The decoding cache write (new tokens' rows, in place) against a slot-by-slot loop."""
import torch

from infini_trt.export.model import write_cache


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
