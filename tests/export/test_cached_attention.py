"""The "gqa" decode attention (export/cached_attention.py): each layer's attention to the cache
as one com.microsoft GroupQueryAttention writing the caches in place, checked against the
portable decoding path and the float64 reference, in eager PyTorch and in ONNX Runtime."""
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from helpers import assert_close, random_model
from infini_trt.export import load_checkpoint, preset
from infini_trt.export.errors import InfiniTrtError
from infini_trt.runtime import kv_cache
from infini_trt.runtime.kv_cache import (column_pieces, empty_caches, in_place_pieces,
                                         write_cache)

TINY = preset("tiny")
N = TINY.segment_len


def _reference_logits(ckpt, sequence) -> np.ndarray:
    model = load_checkpoint(ckpt, dtype=torch.float64)
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(sequence))[None])[0][0].numpy()


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_extend_in_place_computes_what_extend_does(style):
    """Eager float64, a batch of 3 through four calls: rows of other lengths (padding), a row
    with no token (idle), rows at other positions. Each real token's logits and the caches'
    rows equal those of the portable `extend` with `write_cache` (both take the softmax in
    float32, hence 1e-6 in float64); padding writes nothing."""
    cfg = TINY.replace(rope_style=style)
    model = random_model(cfg, seed=4).eval()
    gen = torch.Generator().manual_seed(1)
    batch, layers = 3, cfg.n_layers
    memory = torch.randn(layers, batch, cfg.n_kv_heads, cfg.dk, cfg.dv, generator=gen,
                         dtype=torch.float64) * 0.1
    norm = torch.rand(layers, batch, cfg.n_kv_heads, cfg.dk, generator=gen,
                      dtype=torch.float64) + 1
    k_cache, v_cache = empty_caches(cfg, batch, torch.float64)
    rows_k = [torch.zeros(batch, cfg.n_kv_heads, N, cfg.head_dim, dtype=torch.float64)
              for _ in range(layers)]
    rows_v = [torch.zeros_like(t) for t in rows_k]
    start = torch.zeros(batch, dtype=torch.long)
    with torch.no_grad():
        for length in ([5, 3, 0], [1, 1, 7], [4, 0, 2], [1, 1, 1]):
            length = torch.tensor(length)
            seq = int(length.max())
            ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
            rows = torch.arange(seq).expand(batch, seq)
            want, k_new, v_new = model.extend(ids, start, memory, norm, list(k_cache),
                                              list(v_cache), rows)
            write_cache(k_cache, v_cache, k_new, v_new, start.numpy(), length.numpy())
            got, rows_k, rows_v = model.extend_in_place(ids, start, length, memory, norm,
                                                        rows_k, rows_v, rows)
            for b in range(batch):
                real = int(length[b])
                if real:
                    assert_close(want[b, :real], got[b, :real], 1e-6, what=f"row {b}")
            start = start + length
            for i in range(layers):
                for b in range(batch):
                    end = int(start[b])
                    assert_close(k_cache[i, b].transpose(-1, -2)[:, :end], rows_k[i][b, :, :end],
                                 1e-6, what="keys")
                    assert_close(v_cache[i, b][:, :end], rows_v[i][b, :, :end], 1e-6,
                                 what="values")
                    assert not rows_k[i][b, :, end:].any(), "padding was written"


def test_in_place_pieces_fit_the_caches_and_cover_every_token():
    """Every piece fits each row's chunk in the caches (P + width <= N, P >= 1 for a row with
    nothing to write), and the pieces give each real token exactly once, in order."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 40))
        batch = int(rng.integers(1, 5))
        start = rng.integers(0, n, batch)
        length = np.array([rng.integers(0, n - s + 1) for s in start])
        seq = max(1, int(length.max()) + int(rng.integers(0, 3)))
        seq = min(seq, n)
        pieces = in_place_pieces(start, length, seq, n)
        seen = [[] for _ in range(batch)]
        for first, width, piece_start, piece_length in pieces:
            for b in range(batch):
                before = piece_start[b] if piece_length[b] else max(piece_start[b], 1)
                assert before + width <= n
                if piece_length[b]:
                    assert piece_start[b] == start[b] + first
                    seen[b].extend(range(first, first + piece_length[b]))
        for b in range(batch):
            assert seen[b] == list(range(length[b]))
    assert len(in_place_pieces(np.array([N - 2, 0]), np.array([1, N]), N, N)) == 2
    assert len(in_place_pieces(np.array([7, 3]), np.array([1, 1]), 1, N)) == 1


def test_column_pieces_cover_every_token_and_keep_each_row_in_its_slots():
    """The portable graph's pieces: at most `widest` columns, each real token exactly once
    and in order at its own position, and a row with nothing left starts at its end (never
    before a slot it holds, never past the segment)."""
    rng = np.random.default_rng(1)
    for _ in range(300):
        n, batch = int(rng.integers(2, 40)), int(rng.integers(1, 5))
        widest = int(rng.integers(1, 9))
        start = rng.integers(0, n, batch)
        length = np.array([rng.integers(0, n - s + 1) for s in start])
        seq = max(1, int(length.max()))
        seen = [[] for _ in range(batch)]
        for first, width, piece_start, piece_length in column_pieces(start, length, seq,
                                                                     widest):
            assert 1 <= width <= widest
            for b in range(batch):
                assert piece_start[b] == start[b] + min(length[b], first) <= n
                seen[b].extend(range(first, first + piece_length[b]))
        for b in range(batch):
            assert seen[b] == list(range(length[b]))


def test_gqa_export_has_one_attention_node_a_layer(exported):
    """The decoding graph: one GroupQueryAttention a layer and none of the portable form's
    softmax; each layer's state and caches are inputs of their own, and its caches outputs;
    so in the fold graph, whose outputs are each layer's state; the other graphs are as in
    the portable export. The manifest records it, and TensorRT engines are refused with the
    reason."""
    from infini_trt.export.manifest import read_manifest
    from infini_trt.runtime.engine import BuildSettings, EngineError, build_engines

    _, out = exported(TINY, decode_attention="gqa")
    _, plain = exported(TINY)
    proto = onnx.load(str(out / "extend.onnx"))
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["GroupQueryAttention"] == TINY.n_layers and ops["Softmax"] == 0
    names = {i.name for i in proto.graph.input}
    assert {"length", "memory_0", "norm_1", "k_cache_1"} <= names and "memory" not in names
    # each layer's retrieval under an If on memory_empty (export/empty_memory.py): the memory
    # is read inside its "else" branch only
    assert "memory_empty" in names and ops["If"] == TINY.n_layers
    for node in (n for n in proto.graph.node if n.op_type == "If"):
        branches = {a.name: a.g for a in node.attribute}
        assert [n.op_type for n in branches["then_branch"].node] == ["Identity"]
        read = {i for n in branches["else_branch"].node for i in n.input}
        assert read & {f"memory_{i}" for i in range(TINY.n_layers)}
    assert not {f"memory_{i}" for i in range(TINY.n_layers)} & {
        i for n in proto.graph.node for i in n.input}
    assert [o.name for o in proto.graph.output][1:3] == ["k_cache_out_0", "k_cache_out_1"]
    # the fold graph takes the same buffers, each layer's, and writes each layer's state: no
    # slice of stacked inputs (a copy of both caches), no stacking of its outputs (a Split
    # of a layer's keys is the un-rotation's halves)
    fold = onnx.load(str(out / "fold.onnx"))
    layers = range(TINY.n_layers)
    assert [i.name for i in fold.graph.input] == [
        *(f"{n}_{i}" for n in ("k_cache", "v_cache", "memory", "norm") for i in layers), "fold"]
    assert [o.name for o in fold.graph.output] == [
        *(f"{n}_{i}" for n in ("memory_out", "norm_out") for i in layers)]
    state = {i.name for i in fold.graph.input} - {"fold"}
    assert not {"Gather", "Unsqueeze", "Concat"} & {n.op_type for n in fold.graph.node
                                                    if set(n.input) & state}
    assert (Counter(n.op_type for n in onnx.load(str(out / "prefill.onnx")).graph.node)
            == Counter(n.op_type for n in onnx.load(str(plain / "prefill.onnx")).graph.node))
    assert read_manifest(out).decode_attention == "gqa"
    assert read_manifest(plain).decode_attention == "portable"
    with pytest.raises(EngineError, match="decode-attention portable"):
        build_engines(out, BuildSettings())


@pytest.mark.parametrize("opset", [20, 23])
def test_gqa_decoding_beside_a_long_prompt_and_rows_moved(exported, monkeypatch, opset):
    """ONNX Runtime on the gqa export against the float64 reference: a row two tokens before
    its segment's end reads one token while the other reads a 30-token chunk (two pieces of
    columns, `in_place_pieces`), then both decode across the fold; a row read out
    (`read_row`: keys in the portable layout, equal to the portable export's) and written into
    a fresh runner continues the same. At opset 23 the other graphs rotate with
    RotaryEmbedding (what a checkpoint is exported with for ONNX Runtime on the CPU), and the
    fold rotates the cached keys back with it."""
    from infini_trt.runtime.runners import open_runner
    from infini_trt.runtime.session import Session

    ckpt, out = exported(TINY.replace(update_rule="delta"), seed=3, opset=opset,
                         decode_attention="gqa")
    _, plain = exported(TINY.replace(update_rule="delta"), seed=3, opset=opset)
    if opset == 23:             # the fold rotates the keys back with one node a layer
        fold = Counter(n.op_type for n in onnx.load(str(out / "fold.onnx")).graph.node)
        assert fold["RotaryEmbedding"] == TINY.n_layers and fold["Neg"] == 0
    rng = np.random.default_rng(9)
    a, b = rng.integers(0, 256, N + 12), rng.integers(0, 256, N + 40)
    calls = []
    pieces = kv_cache.in_place_pieces

    def counted(*args):
        made = pieces(*args)
        calls.append(len(made))
        return made

    import infini_trt.runtime.runners.ort_runner as ort_runner
    monkeypatch.setattr(ort_runner, "in_place_pieces", counted)
    with open_runner(out, "onnxruntime") as runner, open_runner(plain, "onnxruntime") as ref:
        session = Session(runner, 2)
        session.feed([a[:N - 2], b[:2]], progress=False)
        last = session.feed([a[N - 2:N - 1], b[2:32]], progress=False)
        assert 2 in calls
        want_a, want_b = _reference_logits(ckpt, a), _reference_logits(ckpt, b)
        assert_close(want_a[N - 2], last[0], 1e-5, what="row a")
        assert_close(want_b[31], last[1], 1e-5, what="row b")
        for i in range(N - 1, N + 12):
            logits = session.decode(np.array([a[i], b[i + 32 - (N - 1)]]))
            assert_close(want_a[i], logits[0], 1e-5, what=f"row a, token {i}")
            assert_close(want_b[i + 32 - (N - 1)], logits[1], 1e-5, what=f"row b, token {i}")
        position = int(session.position[1])
        row = runner.read_row(1, position)
        other = Session(ref, 2)
        other.feed([a[:N + 12], b[:position + N]], progress=False)
        plain_row = ref.read_row(1, position)
        for name in ("memory", "norm", "k", "v"):
            assert_close(getattr(plain_row, name), getattr(row, name), 1e-5, what=name)
        fresh = Session(runner, 2)                   # resets the runner
        runner.write_row(0, row)
        fresh.position[0], fresh.seen[0] = position, N + position
        nxt = N + position
        logits = fresh.decode(np.array([b[nxt], 0]), np.array([True, False]))
        assert_close(want_b[nxt], logits[0], 1e-5, what="the row written into a fresh runner")


def test_export_refuses_an_unknown_decode_attention(tmp_path):
    from infini_trt.export.onnx_export import export_model

    with pytest.raises(InfiniTrtError, match="decode-attention"):
        export_model(random_model(TINY, dtype=torch.float32), tmp_path / "out",
                     decode_attention="fused")


def test_onnxruntime_on_cuda_refuses_a_gqa_export(exported, monkeypatch):
    """ONNX Runtime's CUDA GroupQueryAttention takes fp16 and bf16 only: an fp32 node would
    run on the CPU, away from the caches it writes in place. The runner says so at once."""
    import infini_trt.runtime.runners.ort_runner as ort_runner

    _, out = exported(TINY, decode_attention="gqa")
    monkeypatch.setattr(ort_runner, "providers_for",
                        lambda ort, device: (["CUDAExecutionProvider"], "cuda"))
    with pytest.raises(InfiniTrtError, match="--decode-attention portable for CUDA"):
        ort_runner.OrtRunner(out)


def test_onnxruntime_refuses_a_gqa_export_whose_fold_takes_stacked_caches(exported, tmp_path):
    """Before the fold graph took each layer's caches and state apart, it took them stacked;
    such an export (its manifest says so) is refused with what to do, not fed wrong inputs."""
    import shutil

    from infini_trt.export.io_spec import FOLD, fold_graph
    from infini_trt.export.manifest import read_manifest
    from infini_trt.runtime.runners.ort_runner import OrtRunner

    _, out = exported(TINY, decode_attention="gqa")
    old = tmp_path / "old"
    shutil.copytree(out, old)
    manifest = read_manifest(old)
    manifest.graphs[FOLD]["io"] = fold_graph(TINY, manifest.dtype).to_dict()   # stacked
    manifest.write()
    with pytest.raises(InfiniTrtError, match="fold graph takes the caches stacked; export it"):
        OrtRunner(old)
    OrtRunner(out).close()                           # the export of today loads
