"""The decoding cache write (a scatter of the new tokens) against a slot-by-slot loop."""
import torch

from infini_trt.export.model import write_cache


def naive_write(cache, new, start, length):
    out = cache.clone()
    for b in range(cache.shape[0]):
        for j in range(int(length[b])):
            out[b, :, int(start[b]) + j] = new[b, :, j]
    return out


def test_write_cache_writes_only_the_real_tokens():
    gen = torch.Generator().manual_seed(0)
    b, h, n, s, hd = 5, 2, 8, 3, 4
    k_cache, v_cache = (torch.randn(b, h, n, hd, generator=gen) for _ in "kv")
    k, v = (torch.randn(b, h, s, hd, generator=gen) for _ in "kv")
    # full, padded, empty (length 0, also at start == N), and ending at the last slot
    start = torch.tensor([0, 2, 4, n, 5])
    length = torch.tensor([3, 1, 0, 0, 3])
    k_out, v_out = write_cache(k_cache, v_cache, k, v, start, length)
    assert torch.equal(k_out, naive_write(k_cache, k, start, length))
    assert torch.equal(v_out, naive_write(v_cache, v, start, length))
    assert torch.equal(k_cache, k_cache.clone())          # inputs not modified
