"""export/template_cache.py: the traced templates kept between exports of the same shape. An
export that takes them from the cache writes the bytes that tracing writes; a damaged entry
is traced again and replaced; INFINI_TRT_TEMPLATE_CACHE=0 traces and keeps nothing."""
import pytest
import torch

from helpers import random_model
from infini_trt.export import preset
from infini_trt.export.manifest import read_manifest
from infini_trt.export.onnx_export import export_model

TINY = preset("tiny")
TRACED, CACHED = "tracing one of each piece", "as traced before for this shape"


def _export(model, out) -> tuple[dict, list[str]]:
    lines = []
    export_model(model, out, log=lines.append)
    return {g: m["files"] for g, m in read_manifest(out).graphs.items()}, lines


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INFINI_TRT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("INFINI_TRT_TEMPLATE_CACHE", raising=False)
    return tmp_path / "cache" / "templates"


def test_the_cached_templates_make_the_same_export_and_a_damaged_entry_is_traced_again(
        cache, tmp_path):
    model = random_model(TINY, seed=int(torch.randint(0, 1 << 30, ())), dtype=torch.float32)
    traced, lines = _export(model, tmp_path / "a")
    assert any(TRACED in line for line in lines)
    (entry,) = cache.iterdir()
    assert sorted(p.name for p in entry.iterdir()) == [
        "head.onnx", "layer_extend.onnx", "layer_fold.onnx", "layer_step.onnx", "tail.onnx"]
    cached, lines = _export(model, tmp_path / "b")
    assert any(CACHED in line for line in lines) and not any(TRACED in line for line in lines)
    assert cached == traced                           # every graph file, byte for byte
    # other weights, the same shape: the same templates, other weights in the graphs
    other, lines = _export(random_model(TINY, seed=1, dtype=torch.float32), tmp_path / "c")
    assert any(CACHED in line for line in lines)
    assert other["fold"] == traced["fold"] and other["segment"] != traced["segment"]
    # a truncated template: traced again, the same bytes, the entry whole again
    step = entry / "layer_step.onnx"
    step.write_bytes(step.read_bytes()[:len(step.read_bytes()) // 2])
    again, lines = _export(model, tmp_path / "d")
    assert any(TRACED in line for line in lines) and again == traced
    assert _export(model, tmp_path / "e")[0] == traced
    # another shape is another entry
    _export(random_model(TINY.replace(d_model=32, head_dim=8), seed=0, dtype=torch.float32),
            tmp_path / "f")
    assert len(list(cache.iterdir())) == 2


def test_the_cache_can_be_turned_off(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("INFINI_TRT_TEMPLATE_CACHE", "0")
    _, lines = _export(random_model(TINY, seed=0, dtype=torch.float32), tmp_path / "a")
    assert any(TRACED in line for line in lines)
    assert not cache.exists()
