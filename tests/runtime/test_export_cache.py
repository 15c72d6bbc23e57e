"""The export cache: one export per (weights, config, options, exporter code, versions)."""
from infini_trt.export import InfiniLM, init_weights, preset, save_checkpoint
from infini_trt.export.manifest import is_export_dir, read_manifest
from infini_trt.runtime import export_cache as cache


def test_cached_export_is_made_once_and_keyed_by_what_matters(tmp_path, monkeypatch):
    monkeypatch.setenv("INFINI_TRT_CACHE", str(tmp_path / "cache"))
    save_checkpoint(init_weights(InfiniLM(preset("tiny")), 0), tmp_path / "a")
    save_checkpoint(init_weights(InfiniLM(preset("tiny")), 1), tmp_path / "b")
    first = cache.cached_export(tmp_path / "a", log=lambda s: None)
    assert is_export_dir(first) and first.parent == tmp_path / "cache" / "exports"
    made = (first / "manifest.json").stat().st_mtime_ns
    assert cache.cached_export(tmp_path / "a", log=lambda s: None) == first
    assert (first / "manifest.json").stat().st_mtime_ns == made          # not exported again
    assert read_manifest(first).source["checkpoint"] == str((tmp_path / "a").resolve())
    key = cache.export_key(tmp_path / "a", None, "plugin", 20)
    assert key != cache.export_key(tmp_path / "b", None, "plugin", 20)   # other weights
    assert key != cache.export_key(tmp_path / "a", "float16", "plugin", 20)
    assert key != cache.export_key(tmp_path / "a", None, "portable", 20)
    assert key != cache.export_key(tmp_path / "a", None, "plugin", 20, decode_attention="gqa")
    monkeypatch.setattr(cache, "exporter_code_hash", lambda: "other code")
    assert key != cache.export_key(tmp_path / "a", None, "plugin", 20)


def test_score_json_stays_json_when_the_export_is_made_first(tmp_path, monkeypatch):
    """The export's progress lines go to stderr: stdout holds the JSON alone."""
    import json

    import numpy as np
    from click.testing import CliRunner

    from infini_trt.runtime.cli import main

    monkeypatch.setenv("INFINI_TRT_CACHE", str(tmp_path / "cache"))
    save_checkpoint(init_weights(InfiniLM(preset("tiny")), 0), tmp_path / "ckpt")
    np.save(tmp_path / "t.npy", np.arange(40) % 256)
    result = CliRunner().invoke(main, ["score", str(tmp_path / "ckpt"), "--tokens",
                                       str(tmp_path / "t.npy"), "--backend", "onnxruntime",
                                       "--json"])
    assert result.exit_code == 0, result.output
    assert "exporting" in result.stderr                     # it did export
    assert json.loads(result.stdout)["tokens"] == 40


def test_a_checkpoint_for_onnxruntime_on_the_cpu_gets_its_fastest_graphs(tmp_path, monkeypatch):
    """`prepare` exports a checkpoint for ONNX Runtime on the CPU at opset 23 with the gqa
    decode attention; TensorRT, and ONNX Runtime where it has CUDA, get the portable graphs
    (TensorRT cannot parse GroupQueryAttention; CUDA's takes fp16 and bf16 only)."""
    import onnxruntime

    from infini_trt.runtime.runners import prepare

    monkeypatch.setenv("INFINI_TRT_CACHE", str(tmp_path / "cache"))
    save_checkpoint(init_weights(InfiniLM(preset("tiny")), 0), tmp_path / "a")
    manifest = read_manifest(prepare(tmp_path / "a", "onnxruntime", log=lambda s: None))
    assert (manifest.opset, manifest.decode_attention) == (23, "gqa")
    assert cache.export_settings("tensorrt") == {}
    assert cache.export_settings("onnxruntime", "cpu") == cache.ORT_CPU_EXPORT
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert cache.export_settings("onnxruntime") == {}
    assert cache.export_settings("onnxruntime", "cpu") == cache.ORT_CPU_EXPORT
