"""int8-rows (export/quantize_rows.py) on a small graph: the weights' levels keep the pair bound,
ONNX Runtime computes the stated quantized math, each row at its own scale, independently of
the other rows, also on a CPU without VNNI (emulated by qemu-user)."""
import platform
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import ORT_ON_SAVED_INPUTS
from infini_trt.export.quantize_rows import LEVELS, PAIR_LIMIT, quantize_columns, quantize_rows

ort = pytest.importorskip("onnxruntime")

K, N = 48, 40


@pytest.mark.parametrize("k", [48, 33], ids=["even-K", "odd-K"])
def test_weight_levels_keep_the_pair_bound_and_round_to_nearest(k):
    rng = np.random.default_rng()
    w = np.concatenate([rng.standard_normal((k, 4)), rng.uniform(-1, 1, (k, 4)),
                        rng.standard_normal((k, 2)) * rng.uniform(0, 3, (k, 1)) ** 4,
                        np.zeros((k, 1))], axis=1)
    w[:2, 4] = [-2.0, -2.0]                 # a pair of equal maxima (the rest <= 1): it binds
    w[:, 1] = np.where(np.arange(k) % 2, 1.0, -1.0) * np.abs(w[:, 1])  # no pair agrees in sign
    q, scale = quantize_columns(w.astype(np.float32))
    assert q.dtype == np.int8 and scale.dtype == np.float32 and np.isfinite(scale).all()
    qi = q.astype(np.int64)
    assert np.abs(qi).max() <= LEVELS == 127
    even, odd = qi[0:k - 1:2], qi[1::2]
    agree = np.sign(even) * np.sign(odd) >= 0
    worst = int(np.where(agree, np.abs(even) + np.abs(odd), 0).max())
    assert worst <= PAIR_LIMIT == 128
    assert np.abs(qi[:2, 4]).sum() == PAIR_LIMIT    # the bound is reached, not overshot
    # no clipping: every weight within half a step of its level
    w32 = w.astype(np.float32).astype(np.float64)
    assert (np.abs(qi * scale.astype(np.float64) - w32) <= scale * (0.5 + 1e-6)).all()
    # 8-bit steps kept where no pair needs more: the step is max|W| / 127 there
    peak = np.abs(w32).max(0)
    np.testing.assert_allclose(scale[1], peak[1] / 127, rtol=1e-6)
    assert (scale[:-1] >= peak[:-1] / 127 * (1 - 1e-6)).all() and scale[-1] == 1.0
    assert not q[:, -1].any()


def _graph(w1, w2, w3):
    """y2 = x @ w2 and y3 = (x @ w1) @ w3: two projections share x, one reads a product."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", K])
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "t", N])
               for n in ("y2", "y3")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="p1"),
             helper.make_node("MatMul", ["x", "w2"], ["y2"], name="p2"),
             helper.make_node("MatMul", ["y1", "w3"], ["y3"], name="p3")]
    weights = [numpy_helper.from_array(w, n) for n, w in (("w1", w1), ("w2", w2), ("w3", w3))]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outputs, weights),
                              opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    return model


def _session(model):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _stated_math(x, w):
    """The int8-rows product as its docstring states it, in float64 (x/s in float32, as
    QuantizeLinear divides)."""
    scale = np.maximum(np.abs(x).max(-1, keepdims=True) / np.float32(127),
                       np.finfo(np.float32).tiny).astype(np.float32)
    xq = np.clip(np.rint(x / scale) + 128, 0, 255) - 128
    wq, w_scale = quantize_columns(w)
    return (xq.astype(np.float64) @ wq.astype(np.float64)) * w_scale * scale


def _rel_rms(want, got):
    return float(np.sqrt(((want - got) ** 2).mean() / (want ** 2).mean()))


@pytest.fixture(scope="module")
def graphs():
    rng = np.random.default_rng()
    w1, w2 = (rng.standard_normal((K, N)).astype(np.float32) for _ in range(2))
    w3 = rng.standard_normal((N, N)).astype(np.float32)
    int8 = _graph(w1, w2, w3)
    assert quantize_rows(int8) == 3
    return int8, (w1, w2, w3)


def test_rewrite_shares_the_quantization_of_an_input(graphs):
    int8, _ = graphs
    ops = [n.op_type for n in int8.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 3 and "MatMul" not in ops
    assert ops.count("QuantizeLinear") == 2                   # x once (p1 and p2), y1 once
    assert {t.name for t in int8.graph.initializer}.isdisjoint({"w1", "w2", "w3"})
    onnx.checker.check_model(int8)


def test_ort_computes_the_stated_math_row_by_row(graphs):
    int8, (w1, w2, w3) = graphs
    rng = np.random.default_rng()
    x = rng.standard_normal((2, 6, K)).astype(np.float32)
    x[0, :4] *= np.array([1e-4, 1.0, 1e4, 0.0], np.float32)[:, None]   # rows far apart
    y2, y3 = _session(int8).run(None, {"x": x})
    assert np.isfinite(y2).all() and np.isfinite(y3).all()
    want2 = _stated_math(x, w2)
    assert _rel_rms(want2, y2) < 1e-5
    y1 = (_stated_math(x, w1)).astype(np.float32)
    assert _rel_rms(_stated_math(y1, w3), y3) < 1e-5
    # against float64 without quantization: every row within 2% relative RMS at its own
    # scale (one scale per tensor would round the 1e-4 row to nothing), the zero row is zero
    exact = x.astype(np.float64) @ w2.astype(np.float64)
    assert not y2[0, 3].any()
    for b, t in np.ndindex(2, 6):
        if (b, t) != (0, 3):
            assert _rel_rms(exact[b, t], y2[b, t]) < 2e-2, (b, t)


def test_a_row_does_not_depend_on_the_others(graphs):
    int8, _ = graphs
    session = _session(int8)
    rng = np.random.default_rng()
    x = rng.standard_normal((3, 5, K)).astype(np.float32)
    other = x.copy()
    other[1:] *= 1e3                                          # the other sequences change
    other[0, 1:] = rng.standard_normal((4, K))                # and the other tokens
    a = session.run(None, {"x": x})
    b = session.run(None, {"x": other})
    for ya, yb in zip(a, b):
        np.testing.assert_array_equal(ya[0, 0], yb[0, 0])


# Run in qemu-user as an AMD EPYC Milan (AVX2 + FMA, no AVX-512, no VNNI): ONNX Runtime's CPUID
# dispatch then picks its AVX2 u8 x s8 kernels, which add products in pairs in int16.
QEMU_CPU = "EPYC-Milan"
_CHILD = ORT_ON_SAVED_INPUTS


def _full_range_rows(rng, shape):
    """Rows whose uint8 levels cover 1..255 (each row's max at +-1), rows far apart in scale,
    a row with one outlier (the others near the zero point) and a zero row."""
    x = rng.uniform(-1, 1, shape).astype(np.float32)
    x[..., 0] = np.where(rng.random(shape[:-1]) < 0.5, -1.0, 1.0)
    x *= 10.0 ** rng.integers(-3, 4, shape[:-1])[..., None]
    flat = x.reshape(-1, shape[-1])
    if len(flat) > 2:
        flat[1] = rng.standard_normal(shape[-1]) * 1e-2
        flat[1, 7] = 30.0
        flat[2] = 0.0
    return x


@pytest.mark.skipif(platform.machine() != "x86_64", reason="qemu-x86_64 runs x86-64 Python only")
@pytest.mark.skipif(shutil.which("qemu-x86_64") is None,
                    reason="qemu-x86_64 is not on PATH (Debian: apt-get install qemu-user)")
def test_a_cpu_without_vnni_computes_the_stated_math(tmp_path):
    rng = np.random.default_rng()
    # uniform weights: most levels near the bound, same-sign pairs summing past 128 (8-bit
    # levels would saturate the int16 pair sums); heavy-tailed ones for the product
    w1, w2 = (rng.uniform(-1, 1, (K, N)).astype(np.float32) for _ in range(2))
    w3 = (rng.standard_normal((N, N)) ** 3).astype(np.float32)
    model = _graph(w1, w2, w3)
    quantize_rows(model)
    onnx.save(model, str(tmp_path / "int8rows.onnx"))
    inputs = {"rows": _full_range_rows(rng, (2, 6, K)), "one": _full_range_rows(rng, (1, 1, K))}
    np.savez(tmp_path / "x.npz", **inputs)
    child = subprocess.run(["qemu-x86_64", "-cpu", QEMU_CPU, sys.executable, "-c", _CHILD,
                            str(tmp_path / "int8rows.onnx"), str(tmp_path / "x.npz"),
                            str(tmp_path / "y.npz")], capture_output=True, text=True, timeout=120)
    said = [line for line in child.stderr.splitlines() if "TCG doesn't support" not in line]
    if not child.stdout.startswith("cpu "):
        pytest.skip(f"qemu-x86_64 -cpu {QEMU_CPU} did not start Python: {said[-3:]}")
    assert child.returncode == 0, said[-10:]
    assert child.stdout.split()[1:4] == ["1", "0", "0"], child.stdout    # AVX2, no AVX-512/VNNI
    outputs = np.load(tmp_path / "y.npz")
    for name, x in inputs.items():
        y2, y3 = outputs[f"{name}/0"], outputs[f"{name}/1"]
        assert np.isfinite(y2).all() and np.isfinite(y3).all()
        assert _rel_rms(_stated_math(x, w2), y2) < 1e-6, name
        y1 = _stated_math(x, w1).astype(np.float32)
        assert _rel_rms(_stated_math(y1, w3), y3) < 1e-5, name
