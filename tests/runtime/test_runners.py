"""Every runner against the float64 PyTorch reference, over many segments with the state
carried, and the same clear errors for bad inputs on every backend."""
import numpy as np
import pytest
import torch

from helpers import assert_close
from infini_trt.export import load_checkpoint, preset
from infini_trt.export.errors import InfiniTrtError, InputError
from infini_trt.runtime.runners import open_runner

TINY = preset("tiny")
N = TINY.segment_len


def reference(ckpt, tokens):
    model = load_checkpoint(ckpt, dtype=torch.float64)
    with torch.no_grad():
        return model(torch.from_numpy(tokens))


def streamed(runner, tokens):
    """Every segment of tokens (B, T) through the segment graph (step), from a reset."""
    n = runner.config.segment_len
    runner.reset(tokens.shape[0])
    logits = np.concatenate([runner.step(tokens[:, s:s + n])
                             for s in range(0, tokens.shape[1], n)], axis=1)
    return (logits, *runner.state())


CASES = [
    pytest.param(TINY, 2, "plugin", torch.float32, 1e-5, id="gqa-linear-batch2"),
    pytest.param(TINY.replace(update_rule="delta"), 3, "plugin", torch.float32, 1e-5,
                 id="gqa-delta-batch3"),
    pytest.param(TINY.replace(n_kv_heads=4, empty_memory="bypass"), 1, "plugin", torch.float32,
                 1e-5, id="mha-bypass"),
    pytest.param(TINY.replace(update_rule="delta"), 2, "portable", torch.float32, 1e-5,
                 id="delta-portable"),
    # fp16 graph against the float64 reference of the same (fp16-rounded) weights
    pytest.param(TINY, 2, "plugin", torch.float16, 2e-2, id="fp16"),
]


@pytest.mark.parametrize("cfg,batch,memory_op,dtype,tol", CASES)
def test_onnxruntime_matches_reference_over_8_segments(exported, cfg, batch, memory_op, dtype,
                                                        tol):
    ckpt, out = exported(cfg, dtype=dtype, memory_op=memory_op, graphs=("segment",))
    tokens = np.random.default_rng(1).integers(0, 256, (batch, 8 * N + 13))  # + a partial one
    want = reference(ckpt, tokens)
    with open_runner(out, "onnxruntime") as runner:
        got = streamed(runner, tokens)
    for name, w, g in zip(("logits", "memory", "norm"), want, got):
        assert_close(w, g, tol, what=name)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_advance_reads_a_prompt_like_step(exported, backend, rule):
    """advance (the prefill graph): the logits of each segment's last token and the state of
    the sequence forward, over 4 segments and a partial one."""
    cfg = TINY.replace(update_rule=rule)
    ckpt, out = exported(cfg, graphs=("segment", "prefill"))
    tokens = np.random.default_rng(3).integers(0, 256, (2, 4 * N + 9))
    want_logits, want_memory, want_norm = reference(ckpt, tokens)
    with open_runner(out, backend) as runner:
        runner.reset(2)
        for start in range(0, tokens.shape[1], N):
            ids = tokens[:, start:start + N]
            last = runner.advance(ids)
            assert last.shape == (2, cfg.vocab_size)
            assert_close(want_logits[:, start + ids.shape[1] - 1], last, 1e-5,
                         what=f"last logits of the segment at {start}")
        memory, norm = runner.state()
        if backend == "onnxruntime":
            assert set(runner.sessions) == {"prefill"}   # the segment graph was not needed
    assert_close(want_memory, memory, 1e-5, what="memory")
    assert_close(want_norm, norm, 1e-5, what="norm")


@pytest.mark.parametrize("rule,batch,chunk,attention",
                         [("linear", 2, 8, "portable"), ("delta", 1, 12, "gqa")])
def test_advance_through_the_extend_graph(exported, monkeypatch, rule, batch, chunk, attention):
    """prompt_graph="extend": whole segments through the decoding graph in chunks (8: four
    per segment; 12: the last one shorter), then a fold, on one weights session: the last
    logits of each segment and the state against the float64 reference, over 3 segments; only
    the last chunk computes logits where the graph allows none (the in-place one); a shorter
    segment still goes through the prefill graph (a fold takes a whole one), and decoding
    after it continues the stream; a reset to the same batch starts clean; a long extend call
    asking for every token's logits goes in chunks too and gets them all."""
    from infini_trt.runtime.runners import ort_runner

    monkeypatch.setattr(ort_runner, "PROMPT_CHUNK", chunk)
    cfg = TINY.replace(update_rule=rule)
    ckpt, out = exported(cfg, opset=23 if attention == "gqa" else 20,
                         decode_attention=attention)
    tokens = np.random.default_rng(11).integers(0, 256, (batch, 3 * N + 5))
    want_logits = reference(ckpt, tokens)[0]
    _, want_memory, want_norm = reference(ckpt, tokens[:, :3 * N])    # after 3 segments
    calls = []
    with open_runner(out, "onnxruntime", prompt_graph="extend") as runner:
        real = runner._extend_call
        runner._extend_call = lambda ids, start, length, rows, release: calls.append(
            (ids.shape[1], rows.shape[1])) or real(ids, start, length, rows, release)
        runner.reset(batch)
        for start in range(0, 3 * N, N):
            last = runner.advance(tokens[:, start:start + N])
            assert_close(want_logits[:, start + N - 1], last, 1e-5,
                         what=f"last logits of the segment at {start}")
        assert set(runner.sessions) == {"extend", "fold"}      # no prefill session
        widths = [min(chunk, N - b) for b in range(0, N, chunk)]
        unused = 0 if attention == "gqa" else 1
        assert calls == [(w, 1 if i == len(widths) - 1 else unused)
                         for i, w in enumerate(widths)] * 3
        memory, norm = runner.state()
        assert_close(want_memory, memory, 1e-5, what="memory")
        assert_close(want_norm, norm, 1e-5, what="norm")
        if attention == "gqa":
            # the layers skip the retrieval while the memory is empty only: told it is empty
            # now, they give other logits
            assert not runner.memory_empty
            ids = tokens[:, 3 * N:3 * N + 1]
            runner.memory_empty[...] = True
            wrong = runner.extend(ids, np.zeros(batch, np.int64), np.ones(batch, np.int64),
                                  last_only=True)
            runner.memory_empty[...] = False
            assert np.abs(wrong - want_logits[:, 3 * N].numpy()).max() > 1e-3
        for i in range(3 * N, 3 * N + 5):                      # decoding from there
            got = runner.extend(tokens[:, i:i + 1], np.full(batch, i - 3 * N),
                                np.ones(batch, np.int64), last_only=True)
            assert_close(want_logits[:, i], got, 1e-5, what=f"decoded token {i}")
        runner.reset(batch)
        assert runner.memory_empty
        short = runner.advance(tokens[:, :N - 3])
        assert "prefill" in runner.sessions
        runner.reset(batch)         # same batch: the buffers are kept, no stale key may leak
        again = runner.advance(tokens[:, :N])
        runner.reset(batch)
        calls.clear()
        every = runner.extend(tokens[:, :N - 3], np.zeros(batch, np.int64),
                              np.full(batch, N - 3, np.int64))
        assert [w for w, _ in calls] == [min(chunk, N - 3 - b) for b in range(0, N - 3, chunk)]
    assert_close(reference(ckpt, tokens[:, :N - 3])[0][:, -1], short, 1e-5, what="short")
    assert_close(want_logits[:, N - 1], again, 1e-5, what="a segment after a reset")
    assert_close(want_logits[:, :N - 3], every, 1e-5, what="every token of a chunked call")


def test_prompt_graph_is_checked_and_falls_back_on_old_exports(exported):
    """A prompt graph is one of auto, prefill, extend; "auto" takes the extend graph for an
    unquantized gqa export only; an export without the graph asked for reads prompts as it
    can."""
    from dataclasses import replace

    from infini_trt.export.manifest import read_manifest
    from infini_trt.runtime.runners.ort_runner import OrtRunner, choose_prompt_graph

    _, out = exported(TINY, seed=7, graphs=("segment",))
    with pytest.raises(InfiniTrtError, match="prompt_graph must be one of auto, prefill, extend"):
        OrtRunner(out, prompt_graph="decode")
    assert OrtRunner(out, prompt_graph="extend").prompt_graph == "segment"
    _, out = exported(TINY, seed=8, graphs=("segment", "prefill"))
    assert OrtRunner(out, prompt_graph="extend").prompt_graph == "prefill"
    _, gqa = exported(TINY.replace(update_rule="delta"), seed=3, opset=23,
                      decode_attention="gqa")
    assert OrtRunner(gqa).prompt_graph == "extend"
    assert OrtRunner(gqa, prompt_graph="prefill").prompt_graph == "prefill"
    _, portable = exported(TINY)
    assert OrtRunner(portable).prompt_graph == "prefill"
    quantized = replace(read_manifest(gqa), quantization={"method": "int4"})
    assert choose_prompt_graph(quantized) == "prefill"


def test_advance_falls_back_to_step_without_a_prefill_graph(exported):
    from infini_trt.export.manifest import read_manifest

    ckpt, out = exported(TINY, seed=7, graphs=("segment",))    # an export of older versions
    assert "prefill" not in read_manifest(out).graphs
    tokens = np.random.default_rng(4).integers(0, 256, (1, N))
    with open_runner(out, "onnxruntime") as runner:
        runner.reset(1)
        got = runner.advance(tokens)
        assert set(runner.sessions) == {"segment"}
    assert_close(reference(ckpt, tokens)[0][:, -1], got, 1e-5)


def test_torch_runner_from_export_dir_uses_its_checkpoint(exported):
    ckpt, out = exported(TINY)
    tokens = np.random.default_rng(2).integers(0, 256, (1, 3 * N))
    want = reference(ckpt, tokens)
    with open_runner(out, "torch") as runner:
        assert runner.dtype == "float32"
        got = streamed(runner, tokens)
    assert_close(want[0], got[0], 1e-5)


def test_bf16_export_within_tolerance(exported):
    """onnxruntime's CPU provider has no bf16 kernels (a clear error says so); the bf16 graph
    runs in ONNX's reference evaluator instead, over 8 segments with the state carried."""
    from onnx.reference import ReferenceEvaluator

    ckpt, out = exported(TINY, dtype=torch.bfloat16, graphs=("segment",))
    with pytest.raises(InfiniTrtError, match="no bfloat16 kernels"):
        open_runner(out, "onnxruntime", device="cpu")
    tokens = np.random.default_rng(3).integers(0, 256, (2, 8 * N + 5))
    want = reference(ckpt, tokens)
    graph = ReferenceEvaluator(str(out / "model.onnx"))
    memory = np.zeros(TINY.memory_shape(2), np.float32)
    norm = np.zeros(TINY.norm_shape(2), np.float32)
    logits = []
    for s in range(0, tokens.shape[1], N):
        lg, memory, norm = graph.run(None, {"input_ids": tokens[:, s:s + N], "memory": memory,
                                            "norm": norm})
        logits.append(lg)
    for name, w, g in zip(("logits", "memory", "norm"), want,
                          (np.concatenate(logits, axis=1), memory, norm)):
        assert_close(w, g, 6e-2, what=name)


def test_state_round_trip_continues_the_stream(exported):
    """set_state(state()) on a fresh runner continues exactly where the first one was."""
    ckpt, out = exported(TINY)
    tokens = np.random.default_rng(4).integers(0, 256, (2, 4 * N))
    with open_runner(out, "onnxruntime") as a, open_runner(out, "onnxruntime") as b:
        full = streamed(a, tokens)[0]
        a.reset(2)
        head = streamed(a, tokens[:, :2 * N])[0]
        b.reset(2)
        b.set_state(*a.state())
        tail = np.concatenate([b.step(tokens[:, s:s + N]) for s in (2 * N, 3 * N)], axis=1)
    assert np.array_equal(full, np.concatenate([head, tail], axis=1))


BAD_IDS = [
    pytest.param(np.array([[1, 2, 256]]), "token id 256 is outside the vocabulary", id="out-of-vocab"),
    pytest.param(np.array([[1, -1]]), "token id -1 is outside the vocabulary", id="negative"),
    pytest.param(np.array([[1.0, 2.0]]), "must be integers", id="float-ids"),
    pytest.param(np.zeros((1, N + 1), np.int64), "a segment step takes 1 to 32 tokens", id="too-long"),
    pytest.param(np.zeros((2, 4), np.int64), "must have shape (batch=1, seq)", id="wrong-batch"),
    pytest.param(np.zeros(4, np.int64), "must have shape (batch=1, seq)", id="1d"),
]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("ids,message", BAD_IDS)
def test_bad_inputs_are_refused_clearly(exported, backend, ids, message):
    _, out = exported(TINY)
    with open_runner(out, backend) as runner:
        runner.reset(1)
        with pytest.raises(InputError) as info:
            runner.step(ids)
    assert message in str(info.value)


def test_bad_state_shape_and_missing_model(exported, tmp_path):
    ckpt, out = exported(TINY)
    with open_runner(out, "onnxruntime") as runner:
        runner.reset(2)
        with pytest.raises(InputError, match="memory must have shape"):
            runner.set_state(np.zeros((2, 1, 2, 16, 16), np.float32), np.zeros((2, 2, 2, 16)))
    with pytest.raises(InfiniTrtError, match="no such model"):
        open_runner(tmp_path / "missing", "onnxruntime")
    with pytest.raises(InfiniTrtError, match="unknown backend"):
        open_runner(out, "jax")
    with pytest.raises(InfiniTrtError, match="is not an export directory: the onnxruntime "
                                             "backend runs exported graphs; export it first"):
        open_runner(ckpt, "onnxruntime")                 # opening makes nothing


def test_onnxruntime_refuses_a_corrupt_or_missing_graph(exported, tmp_path):
    import shutil

    _, out = exported(TINY)
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(InfiniTrtError, match="model.onnx is not the file .* sha256 differs"):
        open_runner(broken, "onnxruntime")                 # before any session loads
    shutil.copy(out / "model.onnx", broken / "model.onnx")
    open_runner(broken, "onnxruntime").close()
    (broken / "prefill.onnx").unlink()
    with pytest.raises(InfiniTrtError, match="prefill graph.*missing"):
        open_runner(broken, "onnxruntime")


@pytest.mark.parametrize("seq", [1, 2, 3, N - 1])
def test_onnxruntime_segment_of_any_length_from_a_carried_state(exported, seq):
    """Segments of 1, 2, 3 and N-1 tokens (the graph's split attention has an empty or uneven
    block there), from the state left by two full segments, against the float64 step."""
    ckpt, out = exported(TINY, graphs=("segment", "prefill"))
    rng = np.random.default_rng(seq)
    history = rng.integers(0, 256, (2, 2 * N))
    ids = rng.integers(0, 256, (2, seq))
    model = load_checkpoint(ckpt, dtype=torch.float64)
    with torch.no_grad():
        _, memory, norm = model(torch.from_numpy(history))
        want, want_memory, want_norm = model.step(torch.from_numpy(ids), memory, norm)
    with open_runner(out, "onnxruntime") as runner:
        runner.reset(2)
        runner.set_state(memory.float().numpy(), norm.float().numpy())
        got = runner.step(ids)
        got_memory, got_norm = runner.state()
        runner.set_state(memory.float().numpy(), norm.float().numpy())
        last = runner.advance(ids)
    assert_close(want, got, 1e-5, what="logits")
    assert_close(want[:, -1], last, 1e-5, what="prefill logits")
    assert_close(want_memory, got_memory, 1e-5, what="memory")
    assert_close(want_norm, got_norm, 1e-5, what="norm")


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_extend_last_only_gives_each_rows_last_logits(exported, backend):
    """extend(last_only=True), which a prompt shorter than a segment goes through: the logits
    after each row's last real token (rows of unequal lengths, one of them idle in the second
    call), equal to every token's logits at that token and to the float64 reference."""
    ckpt, out = exported(TINY, graphs=("segment", "extend", "fold"))
    rng = np.random.default_rng()
    tokens = rng.integers(0, 256, (3, N))
    calls = [(np.array([0, 0, 0]), np.array([19, 5, 12])),      # (start, length) per row
             (np.array([19, 5, 12]), np.array([9, 0, 20]))]     # row 2 ends the segment

    def run_calls(runner, last_only):
        runner.reset(3)
        got = []
        for start, length in calls:
            ids = np.zeros((3, int(length.max())), np.int64)        # padded after each row
            for b in range(3):
                ids[b, :length[b]] = tokens[b, start[b]:start[b] + length[b]]
            got.append(runner.extend(ids, start, length, last_only=last_only))
        return got

    with open_runner(out, backend) as runner:
        got_last, got_all = run_calls(runner, True), run_calls(runner, False)
    want = reference(ckpt, tokens)[0]
    for (start, length), last, every in zip(calls, got_last, got_all):
        assert last.shape == (3, TINY.vocab_size)
        for b in np.flatnonzero(length):
            end = int(start[b] + length[b])
            assert_close(want[b, end - 1], last[b], 1e-5, what=f"row {b} last logits")
            np.testing.assert_allclose(last[b], every[b, length[b] - 1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_short_prompt_from_a_segment_start_then_decoding(exported, backend):
    """A prompt shorter than a segment, of one length in every row, from a segment's start
    (the LM head on its last token only), then tokens decoded after it past the segment's
    end: every logit against the float64 reference."""
    ckpt, out = exported(TINY, graphs=("segment", "prefill", "extend", "fold"))
    rng = np.random.default_rng()
    prompt, decoded = 21, N - 21 + 4                   # the decoding crosses a fold
    tokens = rng.integers(0, 256, (2, prompt + decoded))
    want = reference(ckpt, tokens)[0]
    from infini_trt.runtime.session import Session

    with open_runner(out, backend) as runner:
        session = Session(runner, 2)
        got = [session.feed(list(tokens[:, :prompt]), progress=False)]
        for t in range(prompt, prompt + decoded - 1):
            got.append(session.decode(tokens[:, t]))
        memory = runner.state()[0]
    for i, logits in enumerate(got):
        assert_close(want[:, prompt - 1 + i], logits, 1e-5, what=f"logits after token "
                                                               f"{prompt - 1 + i}")
    assert np.isfinite(memory).all() and np.abs(memory).max() > 0      # one fold happened
