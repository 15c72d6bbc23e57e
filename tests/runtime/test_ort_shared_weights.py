"""ONNX Runtime sessions sharing one copy of the weights (runtime/runners/ort_weights.py):
the same outputs as sessions with their own, one buffer per distinct content that ORT really
computes from, and never a constant shared with one of different content or one that ORT's
optimizers rewrite."""
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from infini_trt.export import preset
from infini_trt.export.errors import InfiniTrtError
from infini_trt.export.quantize import quantize_export
from infini_trt.runtime.runners import ort_runner
from infini_trt.runtime.runners.onnx_file import read_graph
from infini_trt.runtime.runners.ort_runner import OrtRunner
from infini_trt.runtime.runners.ort_weights import SharedWeights

TINY = preset("tiny")
N = TINY.segment_len
GRAPHS = ("segment", "prefill", "extend", "fold")


def unpacked_sessions(monkeypatch):
    """Sessions made from here on run without pre-packing (as policy "all" does)."""
    made = ort_runner.session_options

    def options(ort, *args):
        so = made(ort, *args)
        so.add_session_config_entry("session.disable_prepacking", "1")
        return so

    monkeypatch.setattr(ort_runner, "session_options", options)


def run_every_graph(runner, seed):
    """From a random state: a segment through the segment graph, one through the prefill
    graph, 5 tokens through extend (from two positions), and a fold -> the outputs."""
    rng = np.random.default_rng(seed)
    cfg, batch = runner.config, 2
    memory = rng.standard_normal(cfg.memory_shape(batch)).astype(np.float32)
    norm = rng.uniform(0.5, 2.0, cfg.norm_shape(batch)).astype(np.float32)
    ids = lambda s: rng.integers(0, cfg.vocab_size, (batch, s))  # noqa: E731
    out = {}
    runner.reset(batch)
    runner.set_state(memory, norm)
    out["segment"] = runner.step(ids(N)).copy()
    out["segment_state"] = runner.state()
    out["prefill"] = runner.advance(ids(N)).copy()
    out["prefill_state"] = runner.state()
    out["extend"] = runner.extend(ids(N - 3), np.zeros(batch, np.int64),
                                  np.full(batch, N - 3)).copy()
    out["extend_more"] = runner.extend(ids(3), np.full(batch, N - 3), np.full(batch, 3)).copy()
    runner.fold(np.array([True, False]))
    out["fold_state"] = runner.state()
    return out


def assert_same(want, got, atol=0.0):
    """Every output equal (bitwise at atol 0), finite."""
    for name in want:
        pairs = zip(want[name], got[name]) if isinstance(want[name], tuple) else [
            (want[name], got[name])]
        for w, g in pairs:
            w, g = np.asarray(w), np.asarray(g)
            assert np.isfinite(g).all(), name
            np.testing.assert_allclose(g, w, rtol=0, atol=atol, err_msg=name)


def tiny_export(exported):
    return exported(TINY)[1]


def test_shared_sessions_give_the_outputs_of_unshared_ones(exported, monkeypatch):
    out = tiny_export(exported)
    with OrtRunner(out, threads=1, share_weights="none") as own:
        want = run_every_graph(own, seed=3)
    with OrtRunner(out, threads=1, share_weights="unpacked") as shared:
        assert_same(want, run_every_graph(shared, seed=3))          # bitwise
        assert shared.weights.entries                                # (something was shared)
    with OrtRunner(out, threads=1, share_weights="all") as shared:
        got = run_every_graph(shared, seed=3)
    # "all" runs unpacked: MLAS sums in another order than with packed weights
    assert_same(want, got, atol=1e-5)
    unpacked_sessions(monkeypatch)
    with OrtRunner(out, threads=1, share_weights="none") as own:
        assert_same(run_every_graph(own, seed=3), got)              # bitwise


def test_sessions_compute_from_the_one_shared_buffer(exported):
    """One entry per distinct content, named by every graph that uses it; writing into its
    array changes what every session computes (ORT took no copy)."""
    out = tiny_export(exported)
    with OrtRunner(out, threads=1, share_weights="all") as runner:
        for graph in GRAPHS:
            runner.session(graph)
        weights = runner.weights
        assert weights.policies == {g: "all" for g in GRAPHS}
        embed = [e for e in weights.entries.values()
                 if any(n.endswith(":model.embed.weight") for n in e.names)]
        assert len(embed) == 1
        assert {n.split(":")[0] for n in embed[0].names} == {"segment", "prefill", "extend"}
        keys = [(n, id(e)) for e in weights.entries.values() for n in e.names]
        assert len({n for n, _ in keys}) == len(keys)               # one entry per name
        total = sum(w.length for g in GRAPHS
                    for w in read_graph(runner.manifest.graph_file(g)).weights)
        assert weights.nbytes < total / 2

        ids = np.full((1, 4), 7)
        runner.reset(1)
        before = runner.advance(ids).copy(), runner.extend(ids, np.zeros(1, np.int64),
                                                            np.full(1, 4)).copy()
        saved = embed[0].array[7].copy()
        embed[0].array[7] = 0.0
        try:
            runner.reset(1)
            after = runner.advance(ids).copy(), runner.extend(ids, np.zeros(1, np.int64),
                                                               np.full(1, 4)).copy()
        finally:
            embed[0].array[7] = saved
        for b, a in zip(before, after):
            assert not np.array_equal(a, b)
        runner.reset(1)
        assert np.array_equal(runner.advance(ids), before[0])


def _graph_file(path, constants: dict, nodes, inputs, outputs):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(v, k) for k, v in constants.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _session(weights, graph, path, providers=("CPUExecutionProvider",)):
    import onnxruntime as ort

    options = ort_runner.session_options(ort, 1)
    source = weights.session_source(graph, path, options)
    assert isinstance(source, bytes)
    return ort.InferenceSession(source, options, providers=list(providers))


def test_an_initializer_is_shared_only_with_one_of_equal_content(tmp_path):
    """Two graphs name different weights alike (as an export's graphs name their constants
    val_N): each session computes with its own; equal content under another name is one."""
    rng = np.random.default_rng(0)
    w_a, w_b = (rng.standard_normal((16, 24)).astype(np.float32) for _ in "ab")
    table = rng.standard_normal((20, 16)).astype(np.float32)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    files = {}
    for graph, w, table_name in (("a", w_a, "table"), ("b", w_b, "embed")):
        files[graph] = _graph_file(
            tmp_path / f"{graph}.onnx", {"w": w, table_name: table},
            [helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("Gather", [table_name, "i"], ["t"])],
            [("x", [3, 16])], ["y", "t"])
        model = onnx.load(str(files[graph]))
        model.graph.input.append(helper.make_tensor_value_info("i", TensorProto.INT64, [2]))
        onnx.save(model, str(files[graph]))
    weights = SharedWeights("all")
    sessions = {g: _session(weights, g, files[g]) for g in files}
    ids = np.array([1, 4])
    for graph, w in (("a", w_a), ("b", w_b)):
        y, t = sessions[graph].run(None, {"x": x, "i": ids})
        np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(t, table[ids])
    names = sorted(sorted(e.names) for e in weights.entries.values())
    assert names == [["a:table", "b:embed"], ["a:w"], ["b:w"]]


def test_a_constant_that_ort_rewrites_in_place_stays_with_its_session(tmp_path):
    """Mul(Transpose(x), c): ONNX Runtime's transpose optimizer transposes c in place, under
    its own name (a shared c would be read in its old layout): it is not shared."""
    rng = np.random.default_rng(1)
    c = rng.standard_normal((8, 32)).astype(np.float32)
    w = rng.standard_normal((8, 40)).astype(np.float32)
    x = rng.standard_normal((32, 8)).astype(np.float32)
    path = _graph_file(tmp_path / "m.onnx", {"c": c, "w": w},
                       [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
                        helper.make_node("Mul", ["xt", "c"], ["m"]),
                        helper.make_node("Transpose", ["m"], ["mt"], perm=[1, 0]),
                        helper.make_node("MatMul", ["mt", "w"], ["y"])],
                       [("x", [32, 8])], ["y"])
    weights = SharedWeights("all")
    (y,) = _session(weights, "m", path).run(None, {"x": x})
    np.testing.assert_allclose(y, (x.T * c).T @ w, rtol=1e-5, atol=1e-5)
    assert [sorted(e.names) for e in weights.entries.values()] == [["m:w"]]


def test_read_graph_finds_every_weight_and_keeps_the_rest(exported, tmp_path):
    out = tiny_export(exported)
    for path in (out / "prefill.onnx", out / "fold.onnx"):
        model = onnx.load(str(path))
        constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        parsed = read_graph(path)
        data = path.read_bytes()
        # the prefill graph's weights lie in the export's weights file, the fold graph's
        # constants (it has no weights) in the graph file itself
        assert {w.file for w in parsed.weights} == \
            ({"weights.bin"} if path.name == "prefill.onnx" else {path.name})
        for w in parsed.weights:
            blob = (path.parent / w.file).read_bytes()
            array = np.frombuffer(blob[w.offset:w.offset + w.length],
                                  constants[w.name].dtype).reshape(w.dims)
            np.testing.assert_array_equal(array, constants[w.name])
        stripped = onnx.load_from_string(parsed.model)
        assert stripped.graph.node == model.graph.node
        assert list(stripped.functions) == list(model.functions)
        assert len(stripped.graph.initializer) == len(model.graph.initializer)
        inline = sum(w.length for w in parsed.weights if w.file == path.name)
        assert len(parsed.model) < len(data) - inline + 4096
    # a graph whose weights lie beside it (<file>.data) keeps pointing there
    model = onnx.load(str(out / "prefill.onnx"))
    onnx.save_model(model, str(tmp_path / "g.onnx"), save_as_external_data=True,
                    location="g.onnx.data", size_threshold=1024)
    parsed = read_graph(tmp_path / "g.onnx")
    assert parsed.weights and {w.file for w in parsed.weights} == {"g.onnx.data"}
    data = (tmp_path / "g.onnx.data").read_bytes()
    for w in parsed.weights[:3]:
        want = numpy_helper.to_array(next(t for t in onnx.load(str(out / "prefill.onnx"))
                                          .graph.initializer if t.name == w.name))
        np.testing.assert_array_equal(
            np.frombuffer(data[w.offset:w.offset + w.length], want.dtype).reshape(w.dims), want)
    # and a session sharing them computes what one loading the files does
    import onnxruntime as ort

    rng = np.random.default_rng(2)
    feeds = {"input_ids": rng.integers(0, TINY.vocab_size, (1, N)),
             "memory": rng.standard_normal(TINY.memory_shape(1)).astype(np.float32),
             "norm": rng.uniform(0.5, 2, TINY.norm_shape(1)).astype(np.float32)}
    plain = ort.InferenceSession(str(tmp_path / "g.onnx"), ort_runner.session_options(ort, 1),
                                 providers=["CPUExecutionProvider"])
    weights = SharedWeights("unpacked")
    shared = _session(weights, "prefill", tmp_path / "g.onnx")
    assert weights.entries
    for want, got in zip(plain.run(None, feeds), shared.run(None, feeds)):
        np.testing.assert_array_equal(got, want)


def test_read_graph_refuses_a_file_that_is_not_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x3a\xff\xff\xff\xff\x0f")           # graph field longer than the file
    with pytest.raises(InfiniTrtError, match="not a readable ONNX file"):
        read_graph(bad)


@pytest.fixture(scope="module")
def int8_tiny(exported, tmp_path_factory):
    target = tmp_path_factory.mktemp("int8") / "onnx"
    quantize_export(exported(TINY)[1], target, "int8")
    return target


def test_quantized_export_keeps_prepacking_where_it_needs_it(int8_tiny):
    """MatMulNBits computes from unpacked weights by dequantizing them per call: "all" gives
    those graphs "unpacked" (saying why), and the outputs are those of unshared sessions."""
    with OrtRunner(int8_tiny, threads=1, share_weights="none") as own:
        want = run_every_graph(own, seed=5)
    with OrtRunner(int8_tiny, threads=1, share_weights="all") as shared:
        got = run_every_graph(shared, seed=5)
        policies, reasons = shared.weights.policies, shared.weights.reasons
    for graph in ("segment", "prefill", "extend"):
        assert policies[graph] == "unpacked" and "MatMulNBits" in reasons[graph]
    assert policies["fold"] == "all"
    assert_same(want, got)


def test_bad_policy_and_other_devices():
    with pytest.raises(InfiniTrtError, match="weight sharing must be one of"):
        SharedWeights("some")
    on_gpu = SharedWeights("all", device="cuda")
    assert on_gpu.policy == "none" and "CPU only" in on_gpu.reasons["*"]
    assert on_gpu.prepare("prefill", "unused.onnx") is None


def test_weights_in_the_weights_file_are_mapped_not_read(exported):
    """An initializer at an aligned offset of the export's weights file is that file's pages
    (a copy-on-write map: only what the kernels touch becomes resident), byte for byte, and
    each place is mapped once for every graph that names it."""
    out = tiny_export(exported)
    with OrtRunner(out, threads=1, share_weights="all") as runner:
        for graph in GRAPHS:
            runner.session(graph)
        places = {}
        for graph in GRAPHS:
            for w in read_graph(runner.manifest.graph_file(graph)).weights:
                if w.file == "weights.bin":
                    places.setdefault((w.offset, w.length), set()).add(f"{graph}:{w.name}")
        data = (Path(out) / "weights.bin").read_bytes()
        checked = 0
        for entry in runner.weights.entries.values():
            at = [p for p, names in places.items() if entry.names <= names]
            if not at:                             # (inline in a graph: read, not mapped)
                assert _mapped_file(entry.array) is None
                continue
            assert Path(_mapped_file(entry.array)) == (Path(out) / "weights.bin").resolve()
            (offset, length), = at
            assert entry.array.tobytes() == data[offset:offset + length]
            checked += 1
        assert checked >= 2 * TINY.n_layers      # the embedding, the norms, the projections


def _mapped_file(array):
    """The file that `array` is a view of a memory map of, or None."""
    while array is not None:
        if isinstance(array, np.memmap):
            return array.filename
        array = array.base if isinstance(array, np.ndarray) else None
    return None


def _consumers_by_onnx(model: bytes) -> dict:
    found = {}

    def walk(graph):
        for node in graph.node:
            for i, name in enumerate(node.input):
                found.setdefault(name, set()).add((node.op_type, i))
            for attribute in node.attribute:
                for sub in ([attribute.g] if attribute.HasField("g") else []) + list(
                        attribute.graphs):
                    walk(sub)

    walk(onnx.ModelProto.FromString(model).graph)
    return found


def test_consumers_read_from_the_wire_match_onnx(exported, tmp_path):
    """onnx_file.consumers (the wire format, no onnx import) finds the uses that onnx's own
    parse does, in every graph of an export and of its int4 export, and in an If's branches;
    the dtype table agrees with onnx's wherever numpy itself has the type."""
    from onnx import helper

    from infini_trt.runtime.runners.onnx_file import consumers
    from infini_trt.runtime.runners.ort_weights import _numpy_dtype

    out = tiny_export(exported)
    int4 = tmp_path / "int4"
    quantize_export(out, int4, "int4")
    for folder in (out, int4):
        for graph in GRAPHS:
            path = Path(folder) / f"{'model' if graph == 'segment' else graph}.onnx"
            if path.exists():
                model = read_graph(path).model
                assert consumers(model) == _consumers_by_onnx(model), path
    branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y_then"])], "then", [],
        [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, None)])
    other = helper.make_graph(
        [helper.make_node("Gather", ["w", "i"], ["y_else"])], "else", [],
        [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, None)])
    model = helper.make_model(helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)], "g",
        [helper.make_tensor_value_info(n, t, None) for n, t in
         (("c", TensorProto.BOOL), ("x", TensorProto.FLOAT), ("i", TensorProto.INT64))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((2, 2), np.float32), "w")])).SerializeToString()
    assert consumers(model) == _consumers_by_onnx(model)
    assert consumers(model)["w"] == {("MatMul", 1), ("Gather", 0)}
    for data_type in range(1, 24):
        try:
            want = np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
        except (KeyError, TypeError, ValueError):
            want = None
        # (onnx gives bfloat16, float8 and 4-bit types as ml_dtypes' extension types)
        standard = want is not None and want.type.__module__ == "numpy"
        want = want if standard and data_type != 8 else None
        assert _numpy_dtype(data_type) == want, data_type
