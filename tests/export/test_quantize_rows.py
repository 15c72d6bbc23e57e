"""int8-rows (export/quantize_rows.py) on a small graph: ONNX Runtime computes the stated
quantized math, each row at its own scale, independently of the other rows."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from infini_trt.export.quantize_rows import quantize_columns, quantize_rows

ort = pytest.importorskip("onnxruntime")

K, N = 48, 40


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
