"""The rotation as one node (export/rotary.py): ONNX's RotaryEmbedding from opset 23, against
the element-wise rotation and the float64 reference, in ONNX Runtime and TensorRT-RTX; below
opset 23 the graphs keep the element-wise form."""
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from helpers import assert_close
from infini_trt.export import load_checkpoint, preset
from infini_trt.export.model import apply_rope, rope_tables

TINY = preset("tiny")
N = TINY.segment_len


class _Rotations(torch.nn.Module):
    """x (B, H, S, hd), positions (B, S) -> x rotated in both styles, scaled by 0.25."""

    def forward(self, x, positions):
        from infini_trt.export.model import rotate_at

        out = []
        for style in ("half", "interleaved"):
            cos, sin = rope_tables(0, 64, x.shape[-1], 10000.0, style, x.dtype, x.device)
            out.append(rotate_at(x, cos, sin, style, 0.25, positions))
        return tuple(out)


def _export_rotations(opset: int) -> onnx.ModelProto:
    from torch.export import Dim

    from infini_trt.export import rotary

    batch, seq = Dim("batch", min=1), Dim("seq", min=1, max=64)
    example = (torch.zeros(2, 4, 3, 16), torch.zeros(2, 3, dtype=torch.int64))
    with rotary.rotation_nodes(opset), torch.no_grad():
        program = torch.onnx.export(
            _Rotations().eval(), example, dynamo=True, opset_version=opset,
            dynamic_shapes=({0: batch, 2: seq}, {0: batch, 1: seq}),
            custom_translation_table=rotary.translation(), verbose=False)
    return program.model_proto


def test_rotary_embedding_node_is_the_rotation():
    """At opset 23 each rotation is one RotaryEmbedding node, and ONNX Runtime's result is the
    rotation of the float64 tables at each row's own positions (rows start apart), for both
    styles; at opset 20 it stays element-wise."""
    import onnxruntime as ort

    proto = _export_rotations(23)
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["RotaryEmbedding"] == 2 and ops["Neg"] == 0
    assert "RotaryEmbedding" not in Counter(n.op_type for n in _export_rotations(20).graph.node)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(3)
    for length in (1, 5, 17):
        x = torch.randn(2, 4, length, 16, generator=gen)
        positions = torch.stack([torch.arange(length) + 7, torch.arange(length) + 40])
        got = session.run(None, {"x": x.numpy(), "positions": positions.numpy()})
        for style, g in zip(("half", "interleaved"), got):
            cos, sin = rope_tables(0, 64, 16, 10000.0, style, torch.float64, x.device)
            want = apply_rope(x.double(), cos[positions][:, None] * 0.25,
                              sin[positions][:, None] * 0.25, style)
            assert_close(want, torch.from_numpy(g), 1e-6, what=f"{style}, {length} tokens")


def test_opset_23_export_reads_and_decodes_like_the_reference(exported):
    """A whole export at opset 23: two RotaryEmbedding nodes a layer in the graphs that rotate
    (the fold rotates keys back element-wise), none at opset 20; in ONNX Runtime the segment
    graph over 3 segments and a partial one, the prefill graph, and tokens decoded through
    the extend graph after a fold, against the float64 reference."""
    from infini_trt.runtime.runners import open_runner

    cfg = TINY.replace(update_rule="delta")
    ckpt, out = exported(cfg, opset=23)
    _, plain = exported(cfg)
    for graph in ("model", "prefill", "extend"):
        ops = Counter(n.op_type for n in onnx.load(str(out / f"{graph}.onnx")).graph.node)
        assert ops["RotaryEmbedding"] == 2 * cfg.n_layers, graph
        assert "RotaryEmbedding" not in Counter(
            n.op_type for n in onnx.load(str(plain / f"{graph}.onnx")).graph.node)
    tokens = np.random.default_rng(5).integers(0, 256, (2, 3 * N + 9))
    model = load_checkpoint(ckpt, dtype=torch.float64)
    with torch.no_grad():
        want_logits, want_memory, want_norm = model(torch.from_numpy(tokens))
    with open_runner(out, "onnxruntime") as runner:
        runner.reset(2)
        logits = np.concatenate([runner.step(tokens[:, s:s + N])
                                 for s in range(0, tokens.shape[1], N)], axis=1)
        assert_close(want_logits, logits, 1e-5, what="segment graph")
        for name, want, got in zip(("memory", "norm"), (want_memory, want_norm),
                                   runner.state()):
            assert_close(want, got, 1e-5, what=name)
        runner.reset(2)
        for start in range(0, 3 * N, N):
            last = runner.advance(tokens[:, start:start + N])
            assert_close(want_logits[:, start + N - 1], last, 1e-5, what="prefill graph")
        for i in range(3 * N, 3 * N + 9):
            got = runner.extend(tokens[:, i:i + 1], np.full(2, i - 3 * N),
                                np.ones(2, np.int64), last_only=True)
            assert_close(want_logits[:, i], got, 1e-5, what=f"decoded token {i}")


def test_rtx_builds_an_opset_23_export(exported, tmp_path, monkeypatch):
    """TensorRT-RTX parses RotaryEmbedding (its own rotary layer) and builds every graph."""
    pytest.importorskip("tensorrt_rtx")
    from infini_trt.runtime.engine import BuildSettings, build_engines

    monkeypatch.setenv("INFINI_TRT_CACHE", str(tmp_path / "cache"))
    _, out = exported(TINY, opset=23)
    out = shutil.copytree(out, tmp_path / "onnx")
    entry = build_engines(out, BuildSettings(backend="tensorrt-rtx", compute_capability="8.9",
                                             max_batch=2))
    assert list(entry["graphs"]) == ["segment", "prefill", "extend", "fold"]
