"""The exported ONNX graphs: structure, the custom memory-update node and its function, the
manifest, and the checks of the full ONNX checker."""
import json

import onnx
import pytest
import torch

from helpers import assert_close
from infini_trt.export import preset
from infini_trt.export.errors import InfiniTrtError
from infini_trt.export.manifest import read_manifest
from infini_trt.plugins.memory_update import contract

TINY = preset("tiny")


def load(path):
    return onnx.load(str(path))


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_plugin_mode_has_one_custom_node_per_layer_and_its_function(exported, rule):
    ckpt, out = exported(TINY.replace(update_rule=rule))
    for graph_file in ("model.onnx", "prefill.onnx", "fold.onnx"):
        model = load(out / graph_file)
        custom = [n for n in model.graph.node if n.domain == contract.NAMESPACE]
        assert [n.name for n in custom] == [f"/layers.{i}/memory_update" for i in range(2)]
        for node in custom:
            assert node.op_type == contract.op_type(rule)
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["plugin_namespace"] == b"infini" and attrs["plugin_version"] == b"1"
            assert ("eps" in attrs) == (rule == "delta")
            assert list(node.input)[0] and len(node.input) == 4 and len(node.output) == 2
        functions = [(f.domain, f.name) for f in model.functions]
        assert functions == [(contract.NAMESPACE, contract.op_type(rule))]
        assert (contract.NAMESPACE, 1) in [(o.domain, o.version) for o in model.opset_import]
        onnx.checker.check_model(str(out / graph_file), full_check=True)


def test_portable_mode_has_only_standard_ops(exported):
    _, out = exported(TINY, memory_op="portable", graphs=("segment",))
    model = load(out / "model.onnx")
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert len(model.functions) == 0
    assert read_manifest(out).plugin is None


def test_io_table_and_dynamic_axes(exported):
    _, out = exported(TINY)
    manifest = read_manifest(out)
    for name, graph in manifest.graphs.items():
        model = load(out / graph["file"])
        spec = manifest.graph(name)
        for value, tensor in zip(list(model.graph.input) + list(model.graph.output),
                                 spec.inputs + spec.outputs):
            assert value.name == tensor.name
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert dims == list(tensor.dims), (name, tensor.name)
            elem = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            assert elem.name == tensor.dtype


def test_node_names_are_paths(exported):
    _, out = exported(TINY)
    names = [n.name for n in load(out / "model.onnx").graph.node]
    assert len(set(names)) == len(names)
    assert all(n.startswith("/") for n in names)
    assert any(n.startswith("/layers.1/attn/qkv_proj/") for n in names)


def test_projection_weights_are_initializers_of_their_matmuls(exported):
    """Each part of q/k/v and gate/up is its own MatMul whose weight is an initializer
    (`fold_weight_parts`): nothing computes on weights at run time."""
    _, out = exported(TINY)
    graph = load(out / "model.onnx").graph
    weights = {t.name for t in graph.initializer}
    on_weights_only = [n.op_type for n in graph.node
                       if n.input and all(i in weights for i in n.input if i)]
    assert on_weights_only == []
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert len(matmuls) == 7 * TINY.n_layers + 1       # q, k, v, o, gate, up, down; LM head
    assert any("/layers.1/attn/qkv_proj/" in n.name for n in matmuls)


def test_manifest_records_config_versions_and_hashes(exported):
    from infini_trt.export.files import sha256_file

    _, out = exported(TINY)
    data = json.loads((out / "manifest.json").read_text())
    assert data["config"] == TINY.to_dict()
    assert data["dtype"] == "float32" and data["opset"] == 20
    assert data["plugin"]["op_type"] == "LinearMemoryUpdate"
    assert set(data["graphs"]) == {"segment", "prefill", "extend", "fold"}
    for graph in data["graphs"].values():
        for file, digest in graph["files"].items():
            assert sha256_file(out / file) == digest
    assert data["versions"]["torch"] and data["versions"]["onnx"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_export_keeps_fp32_state_io(exported, dtype):
    _, out = exported(TINY, dtype=dtype, graphs=("segment",))
    model = load(out / "model.onnx")
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    assert types["memory"] == types["memory_out"] == onnx.TensorProto.FLOAT
    assert types["logits"] == onnx.TensorProto.FLOAT
    weights = {i.data_type for i in model.graph.initializer if i.name.endswith("weight")}
    want = onnx.TensorProto.FLOAT16 if dtype == torch.float16 else onnx.TensorProto.BFLOAT16
    assert weights == {want}


def test_export_refuses_bad_options(tmp_path):
    from infini_trt.export.onnx_export import export_checkpoint
    from infini_trt.export import InfiniLM, init_weights, save_checkpoint

    save_checkpoint(init_weights(InfiniLM(TINY), 0), tmp_path / "ckpt")
    with pytest.raises(InfiniTrtError, match="--opset must be between 18 and 23"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "out", opset=12)
    with pytest.raises(InfiniTrtError, match="--memory-op must be one of"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "out", memory_op_mode="fused")
    with pytest.raises(InfiniTrtError, match="unknown dtype"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "out", dtype="int8")
    with pytest.raises(InfiniTrtError, match="no such checkpoint"):
        export_checkpoint(tmp_path / "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()


HEAD_LAYOUTS = [(2, 2), (4, 1), (1, 4)]           # (kv heads, query heads per kv head)


class _Attentions(torch.nn.Module):
    """q (2, 4, S, 16) and one k, v (2, Hkv, S, 16) per head layout -> the exported attention
    of every (layout, number of query blocks)."""

    def forward(self, q, *kv):
        from infini_trt.export.model import exported_attention

        return tuple(exported_attention(q, kv[2 * i], kv[2 * i + 1], q.shape[-2], group,
                                        blocks)
                     for i, (_, group) in enumerate(HEAD_LAYOUTS) for blocks in (2, 3, 4, 8))


def test_split_attention_graph_is_causal_softmax_attention():
    """The attention that the ONNX graphs get (export/split_attention.py: blocks of queries,
    bounds computed in the graph, grouped heads), in ONNX Runtime in float64, against a loop
    over query positions, on lengths where the blocks are empty or uneven."""
    import onnxruntime as ort
    from torch.export import Dim

    from infini_trt.export import split_attention

    seq, batch = Dim("seq", min=1, max=64), Dim("batch", min=1)
    example = [torch.zeros(2, 4, 3, 16, dtype=torch.float64)]
    for kv_heads, _ in HEAD_LAYOUTS:                      # distinct tensors: no aliases
        example += [torch.zeros(2, kv_heads, 3, 16, dtype=torch.float64) for _ in range(2)]
    with torch.no_grad():
        program = torch.onnx.export(
            _Attentions().eval(), tuple(example), dynamo=True, opset_version=20,
            dynamic_shapes=({0: batch, 2: seq}, ({0: batch, 2: seq},) * (len(example) - 1)),
            custom_translation_table=split_attention.translation(), verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    for length in (1, 2, 3, 5, 8, 31):
        gen = torch.Generator().manual_seed(length)
        q = torch.randn(2, 4, length, 16, generator=gen, dtype=torch.float64)
        kv = [torch.randn(2, kv_heads, length, 16, generator=gen, dtype=torch.float64)
              for kv_heads, _ in HEAD_LAYOUTS for _ in range(2)]
        feeds = dict(zip([i.name for i in session.get_inputs()],
                         [t.numpy() for t in (q / 4.0, *kv)]))            # q pre-scaled
        got = iter(session.run(None, feeds))
        for i, (_, group) in enumerate(HEAD_LAYOUTS):
            want = _attention_by_position(q, kv[2 * i], kv[2 * i + 1], group)
            for blocks in (2, 3, 4, 8):
                assert_close(want, torch.from_numpy(next(got)), 1e-12,
                             what=f"S={length} group={group} blocks={blocks}")


def _attention_by_position(q, k, v, group):
    """Causal softmax attention, one query position at a time (head h reads KV head
    h // group), scale 1/sqrt(16)."""
    want = torch.empty_like(q)
    for head in range(q.shape[1]):
        kh, vh = k[:, head // group], v[:, head // group]
        for t in range(q.shape[2]):
            scores = (kh[:, :t + 1] @ q[:, head, t, :, None])[..., 0] / 4.0
            want[:, head, t] = (torch.softmax(scores, dim=-1)[:, :, None] * vh[:, :t + 1]).sum(1)
    return want
