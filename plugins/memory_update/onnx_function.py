"""The memory update written in standard ONNX ops: a model-local function with the same
domain and name as the custom node, so that any runtime without the plugin (ONNX Runtime,
TensorRT without our plugin registered) inlines it. The decomposition of `reference.py`.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from . import contract


def _linear_body(prefix: list) -> list:
    return prefix + [
        helper.make_node("Transpose", ["sigma_k"], ["sigma_k_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["sigma_k_t", "v"], ["written"]),              # eq 8
        helper.make_node("Add", ["memory", "written"], ["memory_out"]),
        helper.make_node("Constant", [], ["seq_axis"], value_ints=[2]),
        helper.make_node("ReduceSum", ["sigma_k", "seq_axis"], ["key_sum"], keepdims=0),
        helper.make_node("Add", ["norm", "key_sum"], ["norm_out"]),
    ]


def _delta_body(prefix: list) -> list:
    return prefix + [
        helper.make_node("MatMul", ["sigma_k", "memory"], ["numerator"]),         # eq 9
        helper.make_node("Constant", [], ["last_axis"], value_ints=[-1]),
        helper.make_node("Unsqueeze", ["norm", "last_axis"], ["norm_col"]),
        helper.make_node("MatMul", ["sigma_k", "norm_col"], ["denominator"]),
        _eps_constant(),
        helper.make_node("Max", ["denominator", "eps"], ["denominator_safe"]),
        helper.make_node("Div", ["numerator", "denominator_safe"], ["v_old"]),
        helper.make_node("Sub", ["v", "v_old"], ["v_new"]),
        helper.make_node("Transpose", ["sigma_k"], ["sigma_k_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["sigma_k_t", "v_new"], ["written"]),
        helper.make_node("Add", ["memory", "written"], ["memory_out"]),
        helper.make_node("Constant", [], ["seq_axis"], value_ints=[2]),
        helper.make_node("ReduceSum", ["sigma_k", "seq_axis"], ["key_sum"], keepdims=0),
        helper.make_node("Add", ["norm", "key_sum"], ["norm_out"]),
    ]


def _eps_constant():
    """Constant(value_float = the node's `eps` attribute)."""
    node = helper.make_node("Constant", [], ["eps"])
    attr = onnx.AttributeProto(name="value_float", ref_attr_name="eps",
                               type=onnx.AttributeProto.FLOAT)
    node.attribute.append(attr)
    return node


def memory_update_function(rule: str, opset: int) -> onnx.FunctionProto:
    """The FunctionProto of the op for `rule`, in the default domain at `opset`."""
    prefix = [
        helper.make_node("Cast", ["key"], ["k"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["value"], ["v"], to=TensorProto.FLOAT),
        helper.make_node("Elu", ["k"], ["elu_k"]),
        helper.make_node("Constant", [], ["one"], value_float=1.0),
        helper.make_node("Add", ["elu_k", "one"], ["sigma_k"]),                  # sigma = ELU+1
    ]
    body = _linear_body(prefix) if rule == "linear" else _delta_body(prefix)
    return helper.make_function(
        contract.NAMESPACE, contract.op_type(rule), list(contract.INPUTS),
        list(contract.OUTPUTS), body, [helper.make_opsetid("", opset)],
        attributes=["eps"] if rule == "delta" else [],
        doc_string=f"infini-trt memory update ({rule} rule, eq {8 if rule == 'linear' else 9}): "
                   "the reference decomposition of the custom op")
