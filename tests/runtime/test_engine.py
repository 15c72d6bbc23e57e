"""TensorRT engines: RTX builds on the CPU from tiny exports, the engine cache, the manifest
records and the checks on load, the build CLI, and the TensorRT runner's binding logic on a
stand-in runtime (tests/fake_tensorrt.py). Tests that need the full TensorRT and a GPU are
marked `trt`/`gpu` and say why they skip."""
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fake_tensorrt import FakeRuntime, record_fake_engines
from infini_trt.export import preset
from infini_trt.export.io_spec import extend_graph, segment_graph
from infini_trt.export.manifest import read_manifest
from infini_trt.runtime import engine as engines
from infini_trt.runtime.cli import main
from infini_trt.runtime.engine import BuildSettings, EngineError, build_engines
from infini_trt.runtime.runners.ort_runner import OrtRunner
from infini_trt.runtime.runners.trt_runner import TrtRunner
from infini_trt.runtime.validate import validate_export

TINY = preset("tiny")
RTX = BuildSettings(backend="tensorrt-rtx", compute_capability="8.9", max_batch=4)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(autouse=True)
def engine_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INFINI_TRT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def export_copy(exported, tmp_path):
    """A private copy of the session's tiny export (segment, extend, fold) and its checkpoint:
    builds write into the export's manifest."""
    ckpt, out = exported(TINY)
    return ckpt, shutil.copytree(out, tmp_path / "onnx")


def test_profiles_come_from_the_io_table():
    seg = engines.profile_shapes(segment_graph(TINY), max_batch=4)
    assert seg["input_ids"] == [[1, 1], [4, 32], [4, 32]]
    assert seg["memory"] == [[2, b, 2, 16, 16] for b in (1, 4, 4)]
    ext = engines.profile_shapes(extend_graph(TINY, "float16"), max_batch=3)
    assert ext["input_ids"] == [[1, 1], [3, 1], [3, 32]]            # decode tunes for 1 token
    assert ext["k_cache_1"][2] == [3, 2, 16, 32] and ext["start"] == [[1], [3], [3]]
    with pytest.raises(EngineError, match="at least 1"):
        engines.profile_shapes(segment_graph(TINY), max_batch=0)


def test_rtx_builds_every_graph_on_cpu(export_copy):
    pytest.importorskip("tensorrt_rtx")
    _, out = export_copy
    entry = build_engines(out, RTX)
    manifest = read_manifest(out)
    assert list(entry["graphs"]) == list(manifest.graphs) == ["segment", "prefill", "extend",
                                                               "fold"]
    assert manifest.engines["engines/tensorrt-rtx-sm89-b4.engine"] == entry
    assert (entry["backend"], entry["compute_capability"], entry["gpu"]) == \
        ("tensorrt-rtx", "8.9", None)
    assert entry["plugin"] is None                   # RTX: the node runs its ONNX function
    for name, graph in entry["graphs"].items():
        path = out / graph["file"]
        assert path.stat().st_size == graph["bytes"] > 10_000 and not graph["cached"]
        assert graph["plugin_layers"] == 0
        assert graph["profile"] == engines.profile_shapes(manifest.graph(name), 4)
    again = build_engines(out, RTX)                  # the engine cache
    assert all(g["cached"] for g in again["graphs"].values())
    assert [g["sha256"] for g in again["graphs"].values()] == \
        [g["sha256"] for g in entry["graphs"].values()]
    other = build_engines(out, BuildSettings("tensorrt-rtx", 2, "8.9"))
    assert other["graphs"]["segment"]["key"] != entry["graphs"]["segment"]["key"]
    assert len(read_manifest(out).engines) == 2


def test_rtx_builds_a_portable_export(exported, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    _, out = exported(TINY, memory_op="portable", graphs=("segment",))
    out = shutil.copytree(out, tmp_path / "portable")
    entry = build_engines(out, RTX, engine=tmp_path / "seg.plan")
    assert list(entry["graphs"]) == ["segment"] and (tmp_path / "seg.plan").is_file()
    assert engines.select_engine(read_manifest(out), tmp_path / "seg.plan")[1] == entry


def test_build_cli(export_copy):
    pytest.importorskip("tensorrt_rtx")
    _, out = export_copy
    result = invoke("build", out, "--backend", "tensorrt-rtx", "--compute-capability", "8.9",
                    "--max-batch", 2)
    assert result.exit_code == 0, result.output
    assert "engines/tensorrt-rtx-sm89-b2.fold.engine" in result.output
    entry = json.loads((out / "manifest.json").read_text())["engines"]
    assert list(entry) == ["engines/tensorrt-rtx-sm89-b2.engine"]
    result = invoke("build", out, "--backend", "tensorrt-rtx", "--compute-capability", "9.0")
    assert result.exit_code == 1 and "cannot build for compute capability 9.0" in result.output


def test_build_without_tensorrt_says_what_to_install(export_copy, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)          # as if not installed
    _, out = export_copy
    result = invoke("build", out, "--backend", "tensorrt")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pip install tensorrt" in lines[0], result.output
    assert not (out / "engines").exists()


def test_rtx_needs_a_target_without_gpu(export_copy):
    pytest.importorskip("tensorrt_rtx")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU to build for")
    result = invoke("build", export_copy[1], "--backend", "tensorrt-rtx")
    assert result.exit_code == 1 and "--compute-capability" in result.output


def test_engine_checks_on_load():
    entry = {"backend": "tensorrt", "tensorrt": "10.9.0", "compute_capability": "8.9"}
    engines.check_engine(entry, "10.9.0", ("NVIDIA L4", "8.9"))
    with pytest.raises(EngineError, match="built with tensorrt 10.9.0 and this is 10.13.0"):
        engines.check_engine(entry, "10.13.0", ("NVIDIA L4", "8.9"))
    with pytest.raises(EngineError, match=r"compute capability 8.9 and this GPU \(NVIDIA H200\)"):
        engines.check_engine(entry, "10.9.0", ("NVIDIA H200", "9.0"))
    with pytest.raises(EngineError, match="none is visible"):
        engines.check_engine(entry, "10.9.0", None)


def test_engine_selection(export_copy):
    _, out = export_copy
    with pytest.raises(EngineError, match="has no engine; build one"):
        engines.select_engine(read_manifest(out))
    name = record_fake_engines(out)
    assert engines.select_engine(read_manifest(out), out / name)[0] == name
    with pytest.raises(EngineError, match="is not an engine of"):
        engines.select_engine(read_manifest(out), "elsewhere.engine")


def test_trt_runner_against_reference_via_validate(export_copy):
    """The runner on the stand-in runtime, beside PyTorch and ONNX Runtime, over 8 segments
    (the `validate --engine` path), binding token/logit addresses once and ping-ponging state."""
    ckpt, out = export_copy
    name = record_fake_engines(out)
    runner = TrtRunner(out, engine=name, runtime=FakeRuntime(out))
    report = validate_export(ckpt, out, segments=8, batch=2, extra=[runner], progress=False,
                             decode_tokens=0)         # its engine calls are counted below
    assert [b.backend for b in report.backends][-1] == "tensorrt-onnx-function (float32)"
    assert report.passed, report.table()
    # validate alternates: even segments (and the partial 9th) through the segment engine,
    # odd ones through the prefill engine
    segment, prefill = (runner.runtime.engines[g].contexts[0] for g in ("segment", "prefill"))
    assert (segment.calls["execute"], prefill.calls["execute"]) == (5, 4)
    assert segment.calls["address:input_ids"] == segment.calls["address:logits"] == 1
    assert prefill.calls["address:last_logits"] == 1
    # ping-pong: each engine always sees the same parity here, one buffer in, the other out
    assert segment.addresses["memory"] == prefill.addresses["memory_out"]
    assert segment.addresses["memory_out"] == prefill.addresses["memory"]
    assert segment.addresses["memory"] != segment.addresses["memory_out"]


def test_trt_runner_decodes_like_onnxruntime(export_copy):
    _, out = export_copy
    name = record_fake_engines(out)
    trt_runner, ort_runner = TrtRunner(out, engine=name, runtime=FakeRuntime(out)), OrtRunner(out)
    rng = np.random.default_rng(1)
    for r in (trt_runner, ort_runner):
        r.reset(2)
    ids = rng.integers(0, TINY.vocab_size, (2, 20))
    assert np.array_equal(trt_runner.step(ids), ort_runner.step(ids))
    ids = rng.integers(0, TINY.vocab_size, (2, TINY.segment_len))
    assert np.array_equal(trt_runner.advance(ids), ort_runner.advance(ids))      # prefill engine
    prompt = rng.integers(0, TINY.vocab_size, (2, 5))
    start, length = np.zeros(2, np.int64), np.array([5, 3])
    for _ in range(2):
        assert np.array_equal(trt_runner.extend(prompt, start, length),
                           ort_runner.extend(prompt, start, length))
        start, prompt, length = start + length, prompt[:, :1], np.ones(2, np.int64)
    for r in (trt_runner, ort_runner):
        r.fold(np.array([True, False]))
    for got, want in zip(trt_runner.state(), ort_runner.state()):
        np.testing.assert_array_equal(got, want)


def test_trt_runner_refusals(export_copy):
    _, out = export_copy
    name = record_fake_engines(out, max_batch=2)
    runner = TrtRunner(out, engine=name, runtime=FakeRuntime(out))
    with pytest.raises(Exception, match="batch <= 2"):
        runner.reset(3)
    with pytest.raises(Exception, match="call extend"):
        runner.reset(1)
        runner.fold(np.array([True]))
    (out / "engines" / "fake.fold.engine").write_bytes(b"tampered")
    with pytest.raises(EngineError, match="changed since it was built"):
        runner.graph_engine("fold")


def test_trt_runner_decoding_phase_via_validate(export_copy):
    """validate's decoding phase on the stand-in runtime: the extend and fold engines, and a
    context saved from the engines' buffers and written back into them."""
    ckpt, out = export_copy
    runner = TrtRunner(out, engine=record_fake_engines(out), runtime=FakeRuntime(out))
    report = validate_export(ckpt, out, segments=1, batch=2, extra=[runner], progress=False,
                             decode_tokens=12)
    trt = report.decoding.backends[-1]
    assert trt.backend.startswith("tensorrt") and trt.passed, report.table()
    assert trt.outputs["logits"].rel_rms <= 1e-5 and len(trt.outputs["logits"].per_segment) == 13
    contexts = {g: runner.runtime.engines[g].contexts[0] for g in ("extend", "fold")}
    assert contexts["extend"].calls["execute"] >= 12 and contexts["fold"].calls["execute"] >= 1


def test_validate_engine_without_tensorrt_is_one_line(export_copy, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    ckpt, out = export_copy
    name = record_fake_engines(out)
    result = invoke("validate", ckpt, "--onnx", out, "--engine", out / name)
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1 and "pip install tensorrt" in result.output


# ---- the full TensorRT on a GPU ----------------------------------------------------------------
def need_tensorrt_gpu():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pytest.skip("needs the full TensorRT (tensorrt), which PyPI alone cannot install")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_engine_parity_with_and_without_plugin(exported, tmp_path, rule):
    need_tensorrt_gpu()
    ckpt, out = exported(TINY.replace(update_rule=rule))
    out = shutil.copytree(out, tmp_path / "onnx")
    runners = []
    for plugin in (True, False):
        entry = build_engines(out, BuildSettings(max_batch=2, plugin=plugin),
                              engine=out / f"plugin-{plugin}.engine")
        assert (entry["plugin"] is not None) == plugin
        assert entry["graphs"]["segment"]["plugin_layers"] == (TINY.n_layers if plugin else 0)
        runners.append(TrtRunner(out, engine=out / f"plugin-{plugin}.engine"))
    report = validate_export(ckpt, out, segments=8, batch=2, extra=runners, progress=False)
    assert report.passed, report.table()


@pytest.mark.trt
@pytest.mark.gpu
def test_cuda_graphs_replay_like_eager(exported, tmp_path):
    need_tensorrt_gpu()
    _, out = exported(TINY)
    out = shutil.copytree(out, tmp_path / "onnx")
    build_engines(out, BuildSettings(max_batch=2))
    eager, graphed = TrtRunner(out), TrtRunner(out, cuda_graphs=True)
    rng = np.random.default_rng(2)
    for r in (eager, graphed):
        r.reset(2)
    for s in (32, 32, 7, 7, 32):
        ids = rng.integers(0, TINY.vocab_size, (2, s))
        assert np.array_equal(eager.step(ids), graphed.step(ids))
    assert len(graphed.engines["segment"].graphs) == 4             # (2 shapes) x (2 parities)


def test_tensorrt_backend_refuses_cpu(export_copy):
    with pytest.raises(Exception, match="runs on a CUDA GPU"):
        TrtRunner(export_copy[1], device="cpu")


def test_parse_without_plugin_namespace_inlines_the_function(exported):
    """--no-plugin with the full TensorRT hides the nodes' plugin_namespace from the parser;
    checked with TensorRT-RTX's parser: the graph still parses, via the ONNX function."""
    trt = pytest.importorskip("tensorrt_rtx")
    _, out = exported(TINY)
    logger = engines.make_logger(trt)
    network = trt.Builder(logger).create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert engines.parse_onnx(parser, out / "model.onnx", hide_plugin=True), \
        [parser.get_error(i).desc() for i in range(parser.num_errors)]
    assert network.num_layers > 50 and network.num_outputs == 3
