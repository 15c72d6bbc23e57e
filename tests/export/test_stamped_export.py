"""The stamped export (export/stamp.py: each piece traced once, the layer repeated per layer)
against the PyTorch model and against the whole-graph trace (method="trace"): the outputs of
all four graphs on fresh random inputs and state, node names, the memory-update nodes and
their function, the manifest, int8 quantization.

The comparisons with the whole trace need a whole trace of every graph (minutes on 2 cores):
they are marked slow. Every other export test runs on stamped exports too (the default)."""
import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from helpers import assert_close, random_model, with_random_biases
from infini_trt.export import preset
from infini_trt.export import memory_op
from infini_trt.export.manifest import read_manifest
from infini_trt.export.onnx_export import export_model
from infini_trt.plugins.memory_update import contract

TINY = preset("tiny")
# 3 layers and the other options: delta rule, bypass, the l2 norm, gelu, every bias, GQA 4:1,
# interleaved rotary, tied embeddings
VARIANT = TINY.replace(n_layers=3, update_rule="delta", empty_memory="bypass", norm_kind="l2",
                       norm_eps=1e-12, ffn_activation="gelu", attn_bias=True,
                       attn_out_bias=True, mlp_bias=True, lm_head_bias=True, n_kv_heads=1,
                       rope_style="interleaved", tie_embeddings=True)
GRAPH_FILES = {"segment": "model.onnx", "prefill": "prefill.onnx", "extend": "extend.onnx",
               "fold": "fold.onnx"}
MODEL_TOLERANCE = 1e-5        # fp32 ONNX Runtime against the float64 model (test_runners')
TRACE_TOLERANCE = 1e-6        # stamped against whole-trace graphs, both fp32


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    """(float64 model, stamped export dir, export log lines) of VARIANT."""
    model = with_random_biases(random_model(VARIANT, seed=21), seed=22)
    out = tmp_path_factory.mktemp("variant") / "onnx"
    lines = []
    export_model(copy.deepcopy(model).float(), out, log=lines.append)
    return model, out, lines


def random_inputs(cfg, graph, seed):
    """Fresh inputs of `graph` (numpy, by name): random tokens and caches, a random state in
    row 0 and an empty one (M = z = 0) in row 1, a segment of 13 tokens (uneven query
    blocks), decoding 3 tokens at positions 5 and 17 from a window of 20 cache slots, the
    logits of 2 of them (random, repeats allowed) per row."""
    rng = np.random.default_rng(seed)
    batch, seq, window, n = 2, 13, 20, cfg.segment_len
    memory = rng.standard_normal(cfg.memory_shape(batch)).astype(np.float32)
    norm = (rng.random(cfg.norm_shape(batch)) * 8 + 0.5).astype(np.float32)
    memory[:, 1], norm[:, 1] = 0, 0
    h, hd, layers = cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    if graph in ("segment", "prefill"):
        return {"input_ids": rng.integers(0, cfg.vocab_size, (batch, seq)), "memory": memory,
                "norm": norm}
    if graph == "extend":
        caches = {f"k_cache_{i}": rng.standard_normal((batch, h, hd, window)) for i in
                  range(layers)}
        caches.update({f"v_cache_{i}": rng.standard_normal((batch, h, window, hd)) for i in
                       range(layers)})
        return {"input_ids": rng.integers(0, cfg.vocab_size, (batch, 3)),
                "start": np.array([5, 17]), "logit_rows": rng.integers(0, 3, (batch, 2)),
                "memory": memory, "norm": norm,
                **{k: v.astype(np.float32) for k, v in caches.items()}}
    return {"k_cache": rng.standard_normal((layers, batch, h, hd, n)).astype(np.float32),
            "v_cache": rng.standard_normal((layers, batch, h, n, hd)).astype(np.float32),
            "memory": memory, "norm": norm, "fold": np.array([True, False])}


def model_outputs(model, graph, feeds):
    """What `graph` computes, by the PyTorch model (export/model.py) in float64."""
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    state = (t["memory"].double(), t["norm"].double())
    with torch.no_grad():
        if graph in ("segment", "prefill"):
            return model.step(t["input_ids"], *state, last_only=graph == "prefill")
        if graph == "extend":
            layers = range(model.cfg.n_layers)
            return model.extend(t["input_ids"], t["start"], *state,
                                [t[f"k_cache_{i}"].double() for i in layers],
                                [t[f"v_cache_{i}"].double() for i in layers],
                                t["logit_rows"])
        return model.fold_cache(t["k_cache"].double(), t["v_cache"].double(), *state, t["fold"])


def run_graph(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def assert_graphs_match_model(model, out, seed):
    manifest = read_manifest(out)
    assert set(manifest.graphs) == set(GRAPH_FILES)
    for graph in GRAPH_FILES:
        feeds = random_inputs(model.cfg, graph, seed)
        want = model_outputs(model, graph, feeds)
        got = run_graph(manifest.graph_file(graph), feeds)
        names = manifest.graph(graph).output_names
        assert len(got) == len(want) == len(names)
        for name, w, g in zip(names, want, got):
            assert_close(w, g, MODEL_TOLERANCE, what=f"{graph} {name}")


def test_stamped_tiny_matches_the_model(exported):
    ckpt, out = exported(TINY)
    from infini_trt.export import load_checkpoint

    assert_graphs_match_model(load_checkpoint(ckpt, dtype=torch.float64), out, seed=1)


def test_stamped_variant_matches_the_model(variant):
    model, out, _ = variant
    assert_graphs_match_model(model, out, seed=2)


def test_memory_matters_in_these_inputs(variant):
    """Guard against a vacuous comparison: the state's row 0 changes the segment's logits,
    and the fold writes row 0's memory only."""
    model, _, _ = variant
    feeds = random_inputs(model.cfg, "segment", 3)
    logits = model_outputs(model, "segment", feeds)[0]
    empty = {**feeds, "memory": np.zeros_like(feeds["memory"]),
             "norm": np.zeros_like(feeds["norm"])}
    assert (model_outputs(model, "segment", empty)[0][0] - logits[0]).abs().max() > 1e-2
    fold = random_inputs(model.cfg, "fold", 3)
    memory, _ = model_outputs(model, "fold", fold)
    assert (memory[:, 0] - torch.from_numpy(fold["memory"][:, 0])).abs().max() > 1e-2
    assert torch.equal(memory[:, 1], torch.from_numpy(fold["memory"][:, 1]).double())


def _nodes(out, graph):
    return list(onnx.load(str(out / GRAPH_FILES[graph])).graph.node)


def test_memory_update_nodes_layer_metadata_and_function(variant):
    model, out, _ = variant
    rule, layers = model.cfg.update_rule, model.cfg.n_layers
    for graph in ("segment", "prefill", "fold"):
        proto = onnx.load(str(out / GRAPH_FILES[graph]))
        custom = [n for n in proto.graph.node if n.domain == contract.NAMESPACE]
        assert [n.name for n in custom] == [f"/layers.{i}/memory_update" for i in range(layers)]
        assert all(n.op_type == contract.op_type(rule) for n in custom)
        layer_of = [{p.key: p.value for p in n.metadata_props}[memory_op.LAYER_METADATA]
                    for n in custom]
        assert layer_of == [str(i) for i in range(layers)]
        assert [(f.domain, f.name) for f in proto.functions] == \
            [(contract.NAMESPACE, contract.op_type(rule))]
        onnx.checker.check_model(str(out / GRAPH_FILES[graph]), full_check=True)
    assert not any(n.domain == contract.NAMESPACE for n in _nodes(out, "extend"))


def test_each_layer_reads_its_own_weights(variant):
    """The projections of layer i are named by their module path and read layer i's
    parameters (transposed for MatMul, in parts for q/k/v and gate/up)."""
    model, out, _ = variant
    graph = onnx.load(str(out / "model.onnx")).graph
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    by_name = {n.name: n for n in graph.node}
    assert len(by_name) == len(graph.node)                       # names are unique
    assert all(n.name.startswith("/") for n in graph.node)
    cfg = model.cfg
    params = {name: p.detach() for name, p in model.named_parameters()}
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for i in range(cfg.n_layers):
        qkv = params[f"layers.{i}.attn.qkv_proj.weight"].float()
        parts = {"attn/qkv_proj/MatMul": qkv[:q], "attn/qkv_proj/MatMul_1": qkv[q:q + kv],
                 "attn/qkv_proj/MatMul_2": qkv[q + kv:],
                 "attn/o_proj/MatMul": params[f"layers.{i}.attn.o_proj.weight"].float(),
                 "mlp/down_proj/MatMul": params[f"layers.{i}.mlp.down_proj.weight"].float()}
        for path, want in parts.items():
            node = by_name[f"/layers.{i}/{path}"]
            assert node.op_type == "MatMul"
            np.testing.assert_array_equal(weights[node.input[1]], want.T.numpy(), err_msg=path)


def test_nothing_computes_on_weights_alone(variant):
    """`fold_weight_parts` computed every node that read initializers only (the weight parts,
    the gate's sigmoid(beta)): nothing is computed from weights at run time."""
    _, out, _ = variant
    for graph in GRAPH_FILES:
        g = onnx.load(str(out / GRAPH_FILES[graph])).graph
        weights = {t.name for t in g.initializer}
        assert [n.name for n in g.node if n.input and all(i in weights for i in n.input if i)] \
            == [], graph


def test_progress_is_logged_per_graph_and_layer(variant):
    _, _, lines = variant
    for graph in GRAPH_FILES:
        assert f"stamping the {graph} graph" in lines
        assert [line.strip() for line in lines if line.strip().startswith(f"{graph}: layer")] \
            == [f"{graph}: layer {i}/3 stamped" for i in (1, 2, 3)]


def test_portable_stamped_export_has_no_custom_node(exported):
    _, out = exported(TINY, memory_op="portable", graphs=("segment",))   # test_onnx_export's
    proto = onnx.load(str(out / "model.onnx"))
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    assert len(proto.functions) == 0


def test_int8_quantization_of_a_stamped_export_runs(variant, tmp_path):
    from infini_trt.export.quantize import quantize_export

    model, out, _ = variant
    target = tmp_path / "int8"
    quantize_export(out, target, "int8")
    manifest = read_manifest(target)
    ops = [n.op_type for n in _nodes(target, "segment")]
    assert ops.count("MatMulNBits") == 7 * model.cfg.n_layers + 1      # 7 a layer, LM head
    feeds = random_inputs(model.cfg, "segment", 4)
    want = model_outputs(model, "segment", feeds)
    got = run_graph(manifest.graph_file("segment"), feeds)
    assert_close(want[0], got[0], 0.1, what="int8 logits")
    assert_close(want[1], got[1], 0.1, what="int8 memory")


# --------------------------------------------------------------------- against the trace
@pytest.fixture(scope="module")
def traced_pairs(variant, exported, tmp_path_factory):
    """[(stamped dir, whole-trace dir)] for TINY and VARIANT."""
    from infini_trt.export import load_checkpoint

    ckpt, tiny_stamped = exported(TINY)
    pairs = []
    for model, stamped in ((load_checkpoint(ckpt), tiny_stamped),
                           (copy.deepcopy(variant[0]).float(), variant[1])):
        traced = tmp_path_factory.mktemp("traced") / "onnx"
        export_model(model, traced, method="trace")
        pairs.append((stamped, traced))
    return pairs


@pytest.mark.slow
def test_stamped_graphs_compute_what_whole_traces_do(traced_pairs):
    for stamped, traced in traced_pairs:
        cfg = read_manifest(stamped).config
        for graph, file in GRAPH_FILES.items():
            feeds = random_inputs(cfg, graph, 5)
            want, got = run_graph(traced / file, feeds), run_graph(stamped / file, feeds)
            for name, w, g in zip(read_manifest(traced).graph(graph).output_names, want, got):
                assert_close(w, g, TRACE_TOLERANCE, what=f"{cfg.n_layers} layers {graph} {name}")


@pytest.mark.slow
def test_stamped_graphs_have_the_whole_traces_names_and_manifest(traced_pairs):
    for stamped, traced in traced_pairs:
        for graph, file in GRAPH_FILES.items():
            ops = [{n.name: n.op_type for n in _nodes(d, graph)} for d in (stamped, traced)]
            assert ops[0] == ops[1], graph
            functions = [[(f.domain, f.name) for f in onnx.load(str(d / file)).functions]
                         for d in (stamped, traced)]
            assert functions[0] == functions[1], graph
        manifests = [read_manifest(d) for d in (stamped, traced)]
        assert manifests[0].config == manifests[1].config
        assert manifests[0].plugin == manifests[1].plugin
        assert {g: m["io"] for g, m in manifests[0].graphs.items()} == \
            {g: m["io"] for g, m in manifests[1].graphs.items()}


def test_large_graphs_save_their_weights_as_external_data(exported, tmp_path, monkeypatch):
    """Above EXTERNAL_DATA_BYTES a graph's weights go to <file>.data; the saved pair is
    checked, hashed and runs as the single file does."""
    from infini_trt.export import onnx_export
    from infini_trt.export.files import sha256_file

    _, out = exported(TINY)
    proto = onnx.load(str(out / "model.onnx"))
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1 << 10)
    files = onnx_export.save_onnx(proto, tmp_path / "model.onnx")
    assert set(files) == {"model.onnx", "model.onnx.data"}
    assert all(sha256_file(tmp_path / f) == digest for f, digest in files.items())
    assert (tmp_path / "model.onnx").stat().st_size < 1 << 20
    feeds = random_inputs(TINY, "segment", 6)
    want, got = run_graph(out / "model.onnx", feeds), run_graph(tmp_path / "model.onnx", feeds)
    assert all(torch.equal(w, g) for w, g in zip(want, got))


def test_the_check_of_saved_graphs_finds_what_the_checker_finds(exported, tmp_path,
                                                               monkeypatch):
    """`check_onnx` checks the large weights apart from the graph: a weight of the wrong size
    and a node the schema refuses both fail."""
    from infini_trt.export import onnx_export
    from infini_trt.export.onnx_export import check_onnx

    monkeypatch.setattr(onnx_export, "CHECKED_APART_BYTES", 1 << 10)
    _, out = exported(TINY)
    proto = onnx.load(str(out / "model.onnx"))
    check_onnx(proto, tmp_path)
    big = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    big.raw_data = big.raw_data[:-4]
    with pytest.raises(RuntimeError, match=big.name):
        check_onnx(proto, tmp_path)
    proto = onnx.load(str(out / "model.onnx"))
    matmul = next(n for n in proto.graph.node if n.op_type == "MatMul")
    matmul.input.append(matmul.input[0])                      # MatMul takes two inputs
    with pytest.raises(onnx.checker.ValidationError):
        check_onnx(proto, tmp_path)



def test_an_export_is_the_same_bytes_whatever_the_process(tmp_path):
    """Two exports of one checkpoint, in processes with other hash seeds (set iteration
    order) and other addresses, write the same files: the graphs keep no record of where they
    were traced from (source paths, Python objects' addresses), only their name scopes."""
    import os
    import subprocess
    import sys

    from infini_trt.export import save_checkpoint

    save_checkpoint(random_model(TINY, seed=31).float(), tmp_path / "ck")
    for seed in ("1", "2"):
        subprocess.run([sys.executable, "-m", "infini_trt.runtime.cli", "export",
                        str(tmp_path / "ck"), "-o", str(tmp_path / seed)], check=True,
                       capture_output=True, env={**os.environ, "PYTHONHASHSEED": seed})
    for file in GRAPH_FILES.values():
        first, second = ((tmp_path / seed / file).read_bytes() for seed in ("1", "2"))
        assert first == second, file
        assert os.path.dirname(memory_op.__file__).encode() not in first      # no source path
        assert b" at 0x" not in first                                          # no addresses
    assert read_manifest(tmp_path / "1").graphs == read_manifest(tmp_path / "2").graphs
