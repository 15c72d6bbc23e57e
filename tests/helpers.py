"""Assertions shared by the tests: reference comparisons where NaN always fails."""
import torch

from infini_trt.runtime.metrics import errors


def assert_close(reference, candidate, rel_rms: float, max_abs: float | None = None, what=""):
    e = errors(reference, candidate)
    assert e.finite, f"{what}: candidate has NaN/Inf"
    assert e.rel_rms <= rel_rms, f"{what}: relative RMS {e.rel_rms:.3g} > {rel_rms:g} (max abs {e.max_abs:.3g})"
    if max_abs is not None:
        assert e.max_abs <= max_abs, f"{what}: max abs {e.max_abs:.3g} > {max_abs:g}"


def random_tokens(vocab: int, *shape: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def death_signal() -> int:
    """The signal this process gets when its parent dies (Linux prctl PR_GET_PDEATHSIG)."""
    import ctypes

    value = ctypes.c_int()
    ctypes.CDLL(None).prctl(2, ctypes.byref(value))
    return value.value
