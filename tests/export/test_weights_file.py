"""The export's one weights file (export/weights_file.py): the graphs refer to each weight
once stored, the file holds nothing twice and nothing unused, its hash is recorded; a
quantized export has one of its own."""
import hashlib

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from infini_trt.export import preset
from infini_trt.export.manifest import read_manifest
from infini_trt.export.weights_file import ALIGNMENT, INLINE_BYTES, WEIGHTS_FILE, WeightsFile

TINY = preset("tiny")


def _references(path) -> list[tuple[str, int, int, onnx.TensorProto]]:
    """(location, offset, length, tensor) of each initializer of the graph file stored apart."""
    model = onnx.load(str(path), load_external_data=False)
    out = []
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            where = {e.key: e.value for e in t.external_data}
            out.append((where["location"], int(where["offset"]), int(where["length"]), t))
    return out


def _check_one_weights_file(manifest) -> dict[str, onnx.TensorProto]:
    """The export's graphs with weights (all but fold) refer to its one weights file, whose
    hash is recorded, for every large initializer, at aligned offsets; the file holds each
    tensor once and nothing else (but padding) -> the fold-free graphs' initializers by name,
    loaded with their values."""
    data = (manifest.path / WEIGHTS_FILE).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    for name in ("segment", "prefill", "extend"):
        assert manifest.graphs[name]["files"][WEIGHTS_FILE] == digest, name
    assert manifest.graphs["fold"]["files"].keys() == {"fold.onnx"}    # no weights: no file
    regions, tensors = {}, {}
    for name in ("segment", "prefill", "extend"):
        graph_file = manifest.graph_file(name)
        refs = _references(graph_file)
        assert refs and {r[0] for r in refs} == {WEIGHTS_FILE}, name
        for _, offset, length, tensor in refs:
            assert offset % ALIGNMENT == 0 and length > INLINE_BYTES, tensor.name
            width = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            assert length == int(np.prod(tensor.dims)) * width, tensor.name
            regions[offset] = length
        # loaded with its weights, each graph computes what it computed before: onnx.load
        # reads them from the shared file (the outputs are tested in test_stamped_export)
        loaded = onnx.load(str(graph_file))
        assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in loaded.graph.initializer)
        tensors.update({t.name: t for t in loaded.graph.initializer})
    # regions do not overlap, cover the file but for padding, and no two are equal
    ends = sorted((o, o + n) for o, n in regions.items())
    assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))
    assert ends[-1][1] == len(data)
    assert sum(regions.values()) > len(data) - ALIGNMENT * len(regions)
    contents = [data[o:o + n] for o, n in regions.items()]
    assert len(set(contents)) == len(contents)
    return tensors


def test_the_graphs_share_one_file_that_holds_each_weight_once(exported):
    ckpt, out = exported(TINY)
    tensors = _check_one_weights_file(read_manifest(out))
    # the embedding table is the checkpoint's, byte for byte
    from safetensors.torch import load_file

    embed = load_file(str(ckpt / "model.safetensors"))["embed.weight"]
    table = tensors["model.embed.weight"]
    assert torch.equal(torch.from_numpy(numpy_helper.to_array(table).copy()), embed)


def test_pending_references_are_written_once_at_aligned_offsets(tmp_path):
    rng = np.random.default_rng()
    weights = WeightsFile(tmp_path)
    a = rng.standard_normal((33, 17)).astype(np.float32)
    b = rng.integers(0, 9, (700,)).astype(np.int64)
    graphs = []
    for _ in range(2):                   # two graphs naming the same weights differently
        g = onnx.GraphProto()
        g.initializer.append(weights.tensor(f"a{len(graphs)}", "a", a, onnx.TensorProto.FLOAT))
        key = weights.keep(a.T, onnx.TensorProto.FLOAT)   # a derived array, by content
        assert key == weights.keep(np.ascontiguousarray(a.T), onnx.TensorProto.FLOAT)
        g.initializer.append(weights.tensor("aT", key, a.T, onnx.TensorProto.FLOAT))
        g.initializer.append(weights.tensor("b", "b", b, onnx.TensorProto.INT64))
        assert weights.place(g)
        graphs.append(g)
    digest = weights.finish()
    data = (tmp_path / WEIGHTS_FILE).read_bytes()
    assert digest == hashlib.sha256(data).hexdigest()
    for g in graphs:
        model = onnx.helper.make_model(g)
        onnx.external_data_helper.load_external_data_for_model(model, str(tmp_path))
        got = [numpy_helper.to_array(t) for t in model.graph.initializer]
        assert np.array_equal(got[0], a) and np.array_equal(got[1], a.T) and \
            np.array_equal(got[2], b)
    offsets = [[int({e.key: e.value for e in t.external_data}["offset"])
                for t in g.initializer] for g in graphs]
    assert offsets[0] == offsets[1] and all(o % ALIGNMENT == 0 for o in offsets[0])
    assert len(data) == offsets[0][-1] + b.nbytes        # three arrays, each once


def test_nothing_referred_to_makes_no_file(tmp_path):
    weights = WeightsFile(tmp_path)
    g = onnx.GraphProto()
    g.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "small"))
    assert not weights.place(g) and weights.finish() is None
    assert not (tmp_path / WEIGHTS_FILE).exists()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_quantized_export_has_its_own_weights_file(exported, tmp_path, method):
    """The quantized graphs' weights go into a new weights file (the float one is gone), each
    distinct tensor once: the embedding table, which every graph reads, is stored once and is
    the float export's (that every projection is quantized: test_quantize.py)."""
    from infini_trt.export.quantize import quantize_export

    _, out = exported(TINY)
    manifest = quantize_export(out, tmp_path / method, method)
    assert sorted(p.name for p in (tmp_path / method).iterdir()) == sorted(
        {f for g in manifest.graphs.values() for f in g["files"]} | {"manifest.json"})
    tensors = _check_one_weights_file(manifest)
    for name in ("segment", "prefill", "extend"):     # no large tensor left in a graph file
        inline = onnx.load(str(manifest.graph_file(name)), load_external_data=False)
        assert all(len(t.raw_data) <= INLINE_BYTES for t in inline.graph.initializer
                   if t.data_location != onnx.TensorProto.EXTERNAL), name
    float_table = {t.name: t for t in onnx.load(str(out / "model.onnx")).graph.initializer
                   }["model.embed.weight"]
    assert tensors["model.embed.weight"].raw_data == float_table.raw_data