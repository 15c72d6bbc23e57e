"""The fused Triton memory-update kernel against the float64 reference (eq 8, eq 9).

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before Triton is imported); shapes are small, because the interpreter is slow. With a GPU it
runs compiled on CUDA. Its ahead-of-
time compilation to PTX runs in a subprocess without the interpreter (no GPU needed).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import assert_close, random_model
from infini_trt.export import reference
from infini_trt.export.errors import InputError
from infini_trt.plugins.memory_update import triton_kernel
from infini_trt.plugins.memory_update.reference import random_inputs
from infini_trt.plugins.memory_update.triton_kernel import memory_update

pytest.importorskip("triton")
DEVICE = "cpu" if triton_kernel.interpreting() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("Triton was imported without TRITON_INTERPRET=1 and there is no GPU",
                allow_module_level=True)
EPS = 1e-6


def inputs(b, h, s, dk, dv, dtype, seed, empty=False):
    return random_inputs(b, h, s, dk, dv, dtype, DEVICE, seed, empty)


def expected(memory, norm, key, value, rule):
    """The reference in float64 on the very same (possibly fp16/bf16-rounded) values."""
    return reference.memory_update(*(t.double().cpu() for t in (memory, norm, key, value)),
                                   rule, EPS)


CASES = [
    # rule, (B, H, S, dk, dv), key/value dtype, empty memory
    pytest.param("linear", (2, 3, 37, 20, 12), torch.float32, False, id="linear-odd-sizes"),
    pytest.param("delta", (2, 3, 37, 20, 12), torch.float32, False, id="delta-odd-sizes"),
    pytest.param("linear", (1, 2, 40, 72, 24), torch.float32, False, id="linear-two-dk-tiles"),
    pytest.param("delta", (1, 1, 33, 72, 80), torch.float32, False, id="delta-two-tiles-each"),
    pytest.param("delta", (1, 2, 9, 16, 16), torch.float32, True, id="delta-empty-memory"),
    pytest.param("linear", (2, 1, 1, 16, 24), torch.float16, False, id="linear-fp16-one-token"),
    pytest.param("delta", (1, 2, 19, 24, 16), torch.float16, False, id="delta-fp16"),
    pytest.param("delta", (1, 2, 19, 24, 16), torch.bfloat16, False, id="delta-bf16"),
]


@pytest.mark.parametrize("rule, shape, dtype, empty", CASES)
def test_kernel_matches_reference(rule, shape, dtype, empty):
    memory, norm, key, value = inputs(*shape, dtype, seed=sum(shape), empty=empty)
    before = [t.clone() for t in (memory, norm, key, value)]
    poisoned = (torch.full_like(memory, float("nan")), torch.full_like(norm, float("nan")))
    memory_out, norm_out = memory_update(memory, norm, key, value, rule, EPS, out=poisoned)
    assert memory_out is poisoned[0] and norm_out is poisoned[1]
    want_memory, want_norm = expected(memory, norm, key, value, rule)
    assert_close(want_memory, memory_out, rel_rms=1e-6, max_abs=1e-5 * want_memory.abs().max(),
                 what=f"{rule} memory_out")
    assert_close(want_norm, norm_out, rel_rms=1e-6, max_abs=1e-5 * want_norm.abs().max(),
                 what=f"{rule} norm_out")
    for was, now in zip(before, (memory, norm, key, value)):
        assert torch.equal(was, now), "the kernel changed an input"


def test_new_outputs_by_default_and_delta_differs_from_linear():
    memory, norm, key, value = inputs(1, 2, 12, 16, 16, torch.float32, seed=3)
    linear = memory_update(memory, norm, key, value, "linear", EPS)
    delta = memory_update(memory, norm, key, value, "delta", EPS)
    assert linear[0].data_ptr() != memory.data_ptr()
    assert torch.equal(linear[1], delta[1])                          # z: same in eq 8 and eq 9
    assert (linear[0] - delta[0]).abs().max() > 1e-2                 # M: the old values matter


def test_gqa_model_step_with_the_kernel(tiny_cfg, monkeypatch):
    """The tiny preset (4 query heads on 2 KV heads, 2 layers) stepped over 3 segments with the
    kernel in place of the reference update, against the float64 model."""
    model64 = random_model(tiny_cfg.replace(update_rule="delta"))
    model32 = random_model(tiny_cfg.replace(update_rule="delta"), dtype=torch.float32)
    model32 = model32.to(DEVICE)
    tokens = torch.randint(0, tiny_cfg.vocab_size, (2, 3 * tiny_cfg.segment_len),
                           generator=torch.Generator().manual_seed(0))
    state64 = model64.init_state(2, "cpu")
    state32 = model32.init_state(2, DEVICE)
    with torch.no_grad():
        for start in range(0, tokens.shape[1], tiny_cfg.segment_len):
            ids = tokens[:, start:start + tiny_cfg.segment_len]
            want, *state64 = model64.step(ids, *state64)
            monkeypatch.setattr(reference, "memory_update", memory_update)
            got, *state32 = model32.step(ids.to(DEVICE), *state32)
            monkeypatch.undo()
            assert_close(want, got.cpu(), rel_rms=1e-5, what=f"logits at {start}")
    assert_close(state64[0], state32[0].cpu(), rel_rms=1e-5, what="memory")
    assert_close(state64[1], state32[1].cpu(), rel_rms=1e-5, what="norm")


def test_bad_inputs_are_refused():
    memory, norm, key, value = inputs(1, 2, 4, 16, 8, torch.float32, seed=1)
    with pytest.raises(InputError, match="value has shape"):
        memory_update(memory, norm, key, value[..., :4], "linear", EPS)
    with pytest.raises(InputError, match="float32"):
        memory_update(memory.double(), norm, key, value, "linear", EPS)
    with pytest.raises(InputError, match="share one of"):
        memory_update(memory, norm, key, value.half(), "linear", EPS)
    with pytest.raises(InputError, match="unknown update rule"):
        memory_update(memory, norm, key, value, "hebbian", EPS)


def test_tiles_and_grid_for_any_size():
    assert [triton_kernel.tile_size(d) for d in (1, 16, 17, 48, 64, 65, 128)] == \
        [16, 16, 32, 64, 64, 64, 64]
    cfg = triton_kernel.launch_config("delta", 1e-3, dk=72, dv=20)
    assert cfg.grid(6, 72, 20) == (6, 2, 1) and cfg.eps == 1e-3
    assert triton_kernel.launch_config("linear", 1e-3, 8, 8).eps == 1.0   # one linear kernel


AOT_SCRIPT = textwrap.dedent("""
    import json, os, re, subprocess, sys, tempfile, torch
    from infini_trt.plugins.memory_update.triton_kernel import compile_ptx
    from triton.backends.nvidia.compiler import get_ptxas
    out = {}
    for dtype, rule in ((torch.float16, "delta"), (torch.float32, "linear")):
        k = compile_ptx(dtype, rule, 1e-6, 24, 40, 89)
        entry = k.ptx[k.ptx.index(".entry " + k.name):]
        params = re.findall(r"\\.param \\.(u64|u32)", entry[:entry.index(")")])
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "k.ptx")
            open(path, "w").write(k.ptx)
            ptxas = subprocess.run([get_ptxas(89).path, "--gpu-name=sm_89", path, "-o",
                                    os.path.join(d, "k.cubin")], capture_output=True, text=True)
        out[rule] = {"params": params, "target": ".target sm_89" in k.ptx,
                     "ptxas": ptxas.returncode, "err": ptxas.stderr[-500:],
                     "shared": k.shared_mem, "warps": k.num_warps}
    print(json.dumps(out))
""")


def test_aot_compiles_ptx_that_tensorrt_can_launch():
    """PTX for sm_89 without a GPU: TensorRT's AOT parameter order (4 input pointers, 3 int32
    scalars, 2 output pointers, nothing else), within 48 KiB of shared memory, and valid to
    ptxas."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for rule, r in result.items():
        assert r["params"] == ["u64"] * 4 + ["u32"] * 3 + ["u64"] * 2, (rule, r)
        assert r["target"] and r["ptxas"] == 0, (rule, r["err"])
        assert r["shared"] <= 48 * 1024 and r["warps"] == 4
