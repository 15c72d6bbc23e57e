"""What the tests share: random models, reference comparisons where NaN always fails, a
runner that wraps another (for test backends that break one thing of it)."""
import torch

from infini_trt.export import InfiniLM, init_weights
from infini_trt.runtime.metrics import errors
from infini_trt.runtime.runners.base import Runner, select_rows


def random_model(cfg, seed=0, dtype=torch.float64, gate_spread=2.0):
    """A model with random weights and random (not initial) gates, so memory and local
    attention both carry weight in the output."""
    model = init_weights(InfiniLM(cfg), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.beta.copy_(torch.randn(cfg.n_heads, generator=gen) * gate_spread)
            # larger than init: the memory branch must matter at test sizes
            layer.attn.qkv_proj.weight.mul_(4.0)
    return model.to(dtype).eval()


def with_random_biases(model, seed):
    """Every bias given a random value, so that bias handling is actually tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    return model


# A child process (run under qemu-user as another x86 CPU) that prints the CPU features it sees,
# runs one ONNX graph with input "x" on each array of an .npz, and saves every output:
# argv: graph, inputs.npz, outputs.npz
ORT_ON_SAVED_INPUTS = """
import sys
import numpy as np
from infini_trt.runtime.cpu import cpu_features
info = cpu_features()
print("cpu", int(info["features"]["avx2"]), int(info["features"]["avx512f"]),
      int(info["int8_dot"]), flush=True)
import onnxruntime as ort
options = ort.SessionOptions()
options.log_severity_level = 3
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
inputs = np.load(sys.argv[2])
np.savez(sys.argv[3], **{f"{name}/{i}": y for name in inputs.files
                         for i, y in enumerate(session.run(None, {"x": inputs[name]}))})
"""


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


class Wrapping(Runner):
    """A backend that runs another one through the whole contract (the test backends made from
    it change one thing of it); prompts go through its `_step` (the runner's default advance),
    so that a test backend changing `_step` sees every segment."""

    backend = "wrapping"

    def __init__(self, inner):
        self.inner, self.config = inner, inner.config

    def _reset(self, batch):
        self.inner.reset(batch)

    def _step(self, ids):
        return self.inner.step(ids)

    def _extend(self, ids, start, length, rows):
        return select_rows(self.inner.extend(ids, start, length), rows)

    def _fold(self, mask):
        self.inner.fold(mask)

    def state(self):
        return self.inner.state()

    def read_row(self, b, position):
        return self.inner.read_row(b, position)

    def write_row(self, b, row):
        self.inner.write_row(b, row)
