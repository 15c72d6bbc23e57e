"""Quantized projections for ONNX Runtime (every method: int8, int8-rows, int4): what is
quantized, what is not, and parity with the float64 reference within the stated default
tolerance (int4's own checks: test_quantize_int4.py)."""
import json

import onnx
import pytest
import torch
from click.testing import CliRunner

from infini_trt.export import preset
from infini_trt.export.errors import InfiniTrtError
from infini_trt.export.manifest import read_manifest
from infini_trt.export.quantize import METHODS, blocks, quantize_export, row_gemms
from infini_trt.runtime.cli import main
from infini_trt.runtime.validate import DEFAULT_MIN_GREEDY, DEFAULT_TOLERANCES, validate_export

TINY = preset("tiny")


def _op(method, graph):
    """The node a projection of `graph` becomes: row GEMMs (int8-rows, int4) in the graphs
    that read segments, else MatMulNBits."""
    return "MatMulIntegerToFloat" if row_gemms(method, graph) else "MatMulNBits"


@pytest.fixture(scope="module", params=METHODS)
def int8_export(exported, tmp_path_factory, request):
    ckpt, out = exported(TINY)
    target = tmp_path_factory.mktemp(request.param) / "onnx"
    quantize_export(out, target, request.param)
    return ckpt, out, target


def _ops(path):
    model = onnx.load(str(path))
    constants = {t.name for t in model.graph.initializer}
    ops = [n.op_type for n in model.graph.node]
    weight_matmuls = [n for n in model.graph.node
                      if n.op_type == "MatMul" and n.input[1] in constants]
    bits = {a.i for n in model.graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "bits"}
    return ops, weight_matmuls, bits


def test_int8_export_quantizes_the_projections_only(int8_export):
    _, fp32, int8 = int8_export
    manifest = read_manifest(int8)
    method = manifest.precision
    assert method in METHODS and manifest.dtype == "float32"
    projections = 7 * TINY.n_layers + 1        # q, k, v, o, gate, up, down; LM head
    assert row_gemms("int8-rows", "segment") and not row_gemms("int8-rows", "extend")
    for graph in ("segment", "prefill", "extend"):
        ops, weight_matmuls, bits = _ops(manifest.graph_file(graph))
        # the prefill graph's LM head too: a MatMul on the last row, as in the other graphs
        assert ops.count(_op(method, graph)) == projections, graph
        assert bits == (set() if row_gemms(method, graph) else {blocks(method).bits}), graph
        assert weight_matmuls == [], graph               # no float32 projection left
        assert ops.count("LinearMemoryUpdate") == (0 if graph == "extend" else TINY.n_layers)
        assert ops.count("Gather") >= 1                  # the embedding lookup stays float32
    # the fold graph has no weights: copied unchanged
    assert manifest.graphs["fold"]["files"] == read_manifest(fp32).graphs["fold"]["files"]
    io = manifest.graph("segment")
    assert io.input("memory").dtype == io.output("memory_out").dtype == "float32"


def test_int8_export_passes_validate_with_its_default_tolerance(int8_export):
    ckpt, _, int8 = int8_export
    method = read_manifest(int8).precision
    report = validate_export(ckpt, int8, segments=4, batch=2, include_torch=False)
    assert report.dtype == method
    ort = report.backends[0]
    assert ort.backend == f"onnxruntime-cpu ({method})"
    assert ort.min_greedy == DEFAULT_MIN_GREEDY[method]
    for name, out in ort.outputs.items():
        assert out.tolerance == DEFAULT_TOLERANCES[method][name]
    assert report.passed, report.table()
    # and it is really quantized: far from float32 parity
    assert ort.outputs["logits"].rel_rms > 1e-4


def test_quantize_refusals(int8_export, exported, tmp_path):
    _, _, int8 = int8_export
    with pytest.raises(InfiniTrtError, match="already quantized"):
        quantize_export(int8, tmp_path / "again")
    _, fp16 = exported(TINY, dtype=torch.float16, graphs=("segment",))
    with pytest.raises(InfiniTrtError, match="--dtype fp32"):
        quantize_export(fp16, tmp_path / "fp16")
    assert not (tmp_path / "fp16").exists()


def test_export_cli_refuses_int8_of_fp16(exported, tmp_path):
    ckpt, _ = exported(TINY)
    result = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(tmp_path / "x"),
                                       "--dtype", "fp16", "--quantize", "int8"])
    assert result.exit_code == 1
    assert "--dtype fp32" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_build_refuses_int8_export_before_touching_tensorrt(int8_export):
    _, _, int8 = int8_export
    before = (int8 / "manifest.json").read_text()
    for backend in ("tensorrt", "tensorrt-rtx"):
        result = CliRunner().invoke(main, ["build", str(int8), "--backend", backend,
                                           "--compute-capability", "8.9"])
        assert result.exit_code == 1
        assert "without --quantize" in result.output and "Traceback" not in result.output
    assert (int8 / "manifest.json").read_text() == before
    assert not (int8 / "engines").exists()


def test_manifest_of_int8_export_is_json_with_the_record(int8_export):
    _, _, int8 = int8_export
    data = json.loads((int8 / "manifest.json").read_text())
    record = data["quantization"]
    for graph in ("segment", "prefill", "extend"):
        graph_record = record["graphs"][graph] if "graphs" in record else record
        op = graph_record["op"]
        assert op == _op(record["method"], graph)
        assert graph_record["bits"] == (8 if op == "MatMulIntegerToFloat"
                                        else blocks(record["method"]).bits)
        if op == "MatMulIntegerToFloat":            # the weights' range, and why it is safe
            rows = record["graphs"][graph]
            assert "[-127, 127]" in rows["weights"] and "<= 128" in rows["weights"]
            assert "int16" in rows["weights_why"] and "255 * 128 <= 32767" in rows["weights_why"]
    assert data["source"]["quantized_from"]


def test_bench_runs_a_quantized_export_only_as_its_own_method(int8_export):
    from infini_trt.runtime.bench_subjects import resolve

    _, _, int8 = int8_export
    method = read_manifest(int8).precision
    own = resolve(f"onnxruntime:{method}", int8, log=lambda s: None)
    assert own.status == "ok" and own.path == str(int8) and own.precision == method
    for other in ("onnxruntime", *(f"onnxruntime:{m}" for m in METHODS if m != method)):
        subject = resolve(other, int8, log=lambda s: None)
        assert subject.status == "skipped" and f"use onnxruntime:{method}" in subject.reason
