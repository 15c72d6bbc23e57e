"""int8-rows: every projection as an integer GEMM, activations quantized one row at a time.

A MatMul X (..., K) @ W (K, N) with a constant float32 weight becomes

    s    = max(max|X[row]|, tiny) / 127                    one scale per row (token), per call
    Xq   = QuantizeLinear(X, s, 128)                       uint8, blocked over the whole row
    Y    = MatMulIntegerToFloat(Xq, Wq, 1, w_scale, 128) * s

with Wq = round(W / w_scale) int8 in [-127, 127], one scale per output column, made here once
(quantize_columns): w_scale = max|W[:, n]| / 127, raised where needed so that in every pair of
input channels (2j, 2j+1) whose weights agree in sign |Wq[2j, n]| + |Wq[2j+1, n]| <= 128.
ONNX Runtime runs MatMulIntegerToFloat (com.microsoft) as one u8 x s8 GEMM with the column
scales applied to its int32 result; the row scale cannot go into it (its a_scale is one
number), hence the Mul after. Projections that read the same activations (q, k and v; gate
and up) share one quantization of them.

Why the pair bound: without VNNI (AVX2; AVX-512 before VNNI) ONNX Runtime's u8 x s8 kernels
multiply with vpmaddubsw, which adds the products of channels 2j and 2j+1 in int16 with
saturation; 255 * 128 = 32640 fits, and products of opposite signs cannot add up. So bounded,
every kernel computes the same integers: one export, exact on every x86 CPU, at the speed of
the u8 x s8 kernels (7-bit weights would be exact too, at twice the rounding step).

The row maximum is ReduceMax / ReduceMin (no |X| copy) and the division by s is
QuantizeLinear's own, with opset 21's blocked form (block = the row): the graphs' default opset
becomes 21 (the operators changed by 21 only gained types).

Against ONNX Runtime's dynamic quantization (DynamicQuantizeMatMul: one activation scale per
*tensor*), a row's scale depends only on that row: the outliers of one token do not coarsen
the others', and a sequence's results do not depend on what else is in the batch.
"""
from __future__ import annotations

import numpy as np

MS_DOMAIN = "com.microsoft"
OPSET = 21                # QuantizeLinear with block_size
ZERO_POINT = 128          # activations: uint8, symmetric around 128
LEVELS = 127              # weights: int8 in [-LEVELS, LEVELS]
PAIR_LIMIT = 128          # |Wq[2j]| + |Wq[2j+1]| of the same sign: 255 * 128 <= 32767 (int16)


def weight_matmuls(graph) -> list:
    """The MatMul nodes whose second input is a constant float32 matrix (the projections)."""
    import onnx

    constants = {t.name: t for t in graph.initializer}
    return [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in constants
            and constants[n.input[1]].data_type == onnx.TensorProto.FLOAT
            and len(constants[n.input[1]].dims) == 2 and n.input[0] not in constants]


def quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float (K, N) -> (int8 (K, N), float32 scales (N,)): symmetric, one scale per column,
    levels in [-127, 127], and |q[2j, n]| + |q[2j+1, n]| <= 128 where the two agree in sign."""
    w = w.astype(np.float64)
    even, odd = w[0:len(w) - 1:2], w[1::2]                    # (K // 2, N) each
    agree = np.sign(even) * np.sign(odd) >= 0
    pairs = np.where(agree, np.abs(even) + np.abs(odd), 0.0)
    # sums of <= LEVELS before rounding: <= LEVELS + 1 = PAIR_LIMIT after
    peak = np.maximum(np.abs(w).max(axis=0), pairs.max(axis=0, initial=0.0))
    scale = peak / LEVELS
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / scale), -LEVELS, LEVELS).astype(np.int8)
    return q, scale.astype(np.float32)


def quantize_rows(model) -> int:
    """Rewrite `model` (an onnx.ModelProto, in place) -> how many MatMuls it quantized."""
    from onnx import helper, numpy_helper

    from .onnx_export import drop_unused_initializers

    graph = model.graph
    targets = weight_matmuls(graph)
    if not targets:
        return 0
    weights = {t.name: t for t in graph.initializer}
    graph.initializer.extend([
        numpy_helper.from_array(np.array([-1], np.int64), "int8rows_last_axis"),
        numpy_helper.from_array(np.array(1.0 / 127.0, np.float32), "int8rows_inv127"),
        numpy_helper.from_array(np.array(np.finfo(np.float32).tiny, np.float32),
                                "int8rows_tiny"),
        numpy_helper.from_array(np.array(1.0, np.float32), "int8rows_one"),
        numpy_helper.from_array(np.array(ZERO_POINT, np.uint8), "int8rows_zero_point")])
    rows: dict[str, tuple[str, str]] = {}          # activation -> (uint8 rows, row scales)
    replacements: dict[int, list] = {}
    for node in targets:
        x, w_name = node.input[0], node.input[1]
        k = weights[w_name].dims[0]
        nodes = []
        if x not in rows:
            p = f"{x}/int8rows"
            nodes += [
                helper.make_node("ReduceMax", [x, "int8rows_last_axis"], [p + "/max"],
                                 keepdims=1),
                helper.make_node("ReduceMin", [x, "int8rows_last_axis"], [p + "/min"],
                                 keepdims=1),
                helper.make_node("Neg", [p + "/min"], [p + "/neg_min"]),
                helper.make_node("Max", [p + "/max", p + "/neg_min"], [p + "/absmax"]),
                helper.make_node("Mul", [p + "/absmax", "int8rows_inv127"], [p + "/scale0"]),
                helper.make_node("Max", [p + "/scale0", "int8rows_tiny"], [p + "/scale"]),
                helper.make_node("Shape", [p + "/scale"], [p + "/scale_shape"]),
                helper.make_node("Expand", ["int8rows_zero_point", p + "/scale_shape"],
                                 [p + "/zero_points"]),
                helper.make_node("QuantizeLinear", [x, p + "/scale", p + "/zero_points"],
                                 [p + "/u8"], axis=-1, block_size=k)]
            rows[x] = (p + "/u8", p + "/scale")
        xq, scale = rows[x]
        wq, w_scale = quantize_columns(numpy_helper.to_array(weights[w_name]))
        graph.initializer.extend([numpy_helper.from_array(wq, w_name + "/int8"),
                                  numpy_helper.from_array(w_scale, w_name + "/scale")])
        y = node.output[0]
        nodes += [
            helper.make_node("MatMulIntegerToFloat",
                             [xq, w_name + "/int8", "int8rows_one", w_name + "/scale",
                              "int8rows_zero_point"], [y + "/unscaled"],
                             name=node.name + "/int8rows", domain=MS_DOMAIN),
            helper.make_node("Mul", [y + "/unscaled", scale], [y],
                             name=node.name + "/row_scale")]
        replacements[id(node)] = nodes
    new_nodes = [m for n in graph.node for m in replacements.get(id(n), [n])]
    del graph.node[:]
    graph.node.extend(new_nodes)
    drop_unused_initializers(graph)                       # the float32 weights
    _require_opsets(model)
    return len(targets)


def _require_opsets(model) -> None:
    from onnx import helper

    domains = {o.domain: o for o in model.opset_import}
    default = domains.get("") or domains.get("ai.onnx")
    if default.version < OPSET:
        default.version = OPSET
        model.ir_version = max(model.ir_version, 10)        # opset 21 needs IR 10
    if MS_DOMAIN not in domains:
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
