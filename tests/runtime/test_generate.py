"""Generation: prefill + token-by-token decoding reproduces the logits of the sequence
forward (the definition) on every backend, and sampling behaves as configured."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import assert_close
from infini_trt.export import load_checkpoint, preset
from infini_trt.export.errors import InfiniTrtError, InputError
from infini_trt.runtime.cli import main
from infini_trt.runtime.generation import generate
from infini_trt.runtime.runners import open_runner
from infini_trt.runtime.kv_cache import DecodeCaches
from infini_trt.runtime.session import Session
from infini_trt.runtime.sampling import (SamplingConfig, apply_repetition_penalty, next_tokens,
                                         top_k_filter, top_p_filter)
from infini_trt.runtime.tokenizer import ByteTokenizer

TINY = preset("tiny")
N = TINY.segment_len


def teacher_forced_decode(runner, sequences, prompt_lengths):
    """Prefill each prompt, then feed the rest of its sequence one token per call (as
    decoding does). -> per sequence, logits (T - P + 1, V) predicting tokens P .. T."""
    session = Session(runner, len(sequences))
    last = session.feed([s[:p] for s, p in zip(sequences, prompt_lengths)], progress=False)
    out = [[last[b]] for b in range(len(sequences))]
    steps = max(len(s) - p for s, p in zip(sequences, prompt_lengths))
    for i in range(steps):
        active = np.array([p + i < len(s) for s, p in zip(sequences, prompt_lengths)])
        ids = np.array([s[p + i] if a else 0 for s, p, a in
                        zip(sequences, prompt_lengths, active)], dtype=np.int64)
        logits = session.decode(ids, active)
        for b in np.flatnonzero(active):
            out[b].append(logits[b])
    return [np.stack(o) for o in out]


@pytest.mark.parametrize("backend,attention", [("torch", "portable"), ("onnxruntime", "portable"),
                                               ("onnxruntime", "gqa")])
@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_prefill_and_decode_equal_the_sequence_forward(exported, backend, attention, rule):
    """Prompts inside one segment, ending exactly at a boundary, and across many segments,
    batched together, each continued token by token over more segment boundaries (rows of
    other lengths padded, finished rows idle); with both decode attentions of ONNX Runtime
    (gqa: GroupQueryAttention writing the caches in place)."""
    ckpt, out = exported(TINY.replace(update_rule=rule), decode_attention=attention)
    rng = np.random.default_rng(5)
    prompt_lengths = [5, N, 3 * N + 7, 2 * N]
    sequences = [rng.integers(0, 256, p + 2 * N + 3) for p in prompt_lengths]
    model = load_checkpoint(ckpt, dtype=torch.float64)
    with open_runner(out, backend) as runner:
        got = teacher_forced_decode(runner, sequences, prompt_lengths)
    for seq, p, g in zip(sequences, prompt_lengths, got):
        with torch.no_grad():
            want = model(torch.from_numpy(seq)[None])[0][0, p - 1:]
        assert_close(want, g, 1e-5, what=f"prompt of {p} tokens")


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_decode_through_cache_windows_equals_the_sequence_forward(exported, backend,
                                                                  monkeypatch):
    """A segment of 160 slots is read in windows of 64, 128 and 160 (`cache_window`): prompts
    ending in each window, batched, decoded token by token across the windows' moves, a fold,
    and the windows of the next segment (which shrink when the batch's longest restarts)."""
    cfg = TINY.replace(segment_len=160)
    ckpt, out = exported(cfg)
    rng = np.random.default_rng(11)
    prompt_lengths = [3, 100, 160 + 150]
    sequences = [rng.integers(0, 256, p + 140) for p in prompt_lengths]
    model = load_checkpoint(ckpt, dtype=torch.float64)
    windows, fit = [], DecodeCaches.fit

    def recorded_fit(caches, end):
        inputs = fit(caches, end)
        windows.append(caches.window)
        return inputs

    monkeypatch.setattr(DecodeCaches, "fit", recorded_fit)
    with open_runner(out, backend) as runner:
        got = teacher_forced_decode(runner, sequences, prompt_lengths)
    assert set(windows) == ({64, 128, 160} if backend == "onnxruntime" else set())
    for seq, p, g in zip(sequences, prompt_lengths, got):
        with torch.no_grad():
            want = model(torch.from_numpy(seq)[None])[0][0, p - 1:]
        assert_close(want, g, 1e-5, what=f"prompt of {p} tokens")


@pytest.mark.parametrize("prompt_graph", [[], ["--prompt-graph", "extend"]],
                         ids=["prefill", "extend"])
def test_greedy_run_equals_argmax_of_score_logits(exported, tmp_path, prompt_graph):
    """`run --json` greedy tokens are the argmax of `score` logits at every generated
    position (same model, same backend), the prompt's 3 full segments read by either
    graph."""
    _, out = exported(TINY)
    prompt = "The pass key is 12345. Remember it. " * 3
    result = CliRunner().invoke(main, ["run", str(out), "--prompt", prompt, "--max-new-tokens",
                                       "40", "--json", "--no-progress", *prompt_graph])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    generated = data["sequences"][0]["token_ids"]
    assert len(generated) == 40
    ids = np.array(ByteTokenizer().encode(prompt) + generated)
    np.save(tmp_path / "ids.npy", ids)
    result = CliRunner().invoke(main, ["score", str(out), "--tokens", str(tmp_path / "ids.npy"),
                                       "--logits-out", str(tmp_path / "logits.npy"),
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    logits = np.load(tmp_path / "logits.npy")
    p = len(ids) - len(generated)
    assert logits[p - 1:-1].argmax(-1).tolist() == generated
    timings = data["timings"]
    assert timings["prefill_tokens_per_s"] > 0 and timings["decode_tokens_per_s"] > 0
    assert data["peak_rss_mb"] > 0


def test_prompt_graph_goes_with_onnxruntime_only(exported):
    _, out = exported(TINY)
    result = CliRunner().invoke(main, ["run", str(out), "--backend", "torch", "--prompt",
                                       "hi", "--prompt-graph", "extend"])
    assert result.exit_code == 2
    assert "--prompt-graph goes with --backend onnxruntime" in result.output


def test_sampling_is_reproducible_with_a_seed(exported):
    _, out = exported(TINY)
    cfg = SamplingConfig(max_new_tokens=12, greedy=False, temperature=1.5, top_k=50,
                         top_p=0.95, seed=7)
    with open_runner(out, "onnxruntime") as runner:
        a = generate(runner, [[1, 2, 3], [4] * 40], cfg, progress=False)
        b = generate(runner, [[1, 2, 3], [4] * 40], cfg, progress=False)
        c = generate(runner, [[1, 2, 3], [4] * 40],
                     SamplingConfig(**{**cfg.__dict__, "seed": 8}), progress=False)
    tokens = lambda r: [s.token_ids for s in r.sequences]
    assert tokens(a) == tokens(b)
    assert tokens(a) != tokens(c)


def test_eos_and_stop_strings_end_a_sequence(exported):
    _, out = exported(TINY)
    tok = ByteTokenizer()
    with open_runner(out, "torch") as runner:
        free = generate(runner, [tok.encode("abc")], SamplingConfig(max_new_tokens=10),
                        tok, progress=False).sequences[0]
        eos = free.token_ids[3]
        stopped = generate(runner, [tok.encode("abc")],
                           SamplingConfig(max_new_tokens=10, eos_id=eos), tok,
                           progress=False).sequences[0]
        stop = tok.decode(free.token_ids[4:6])
        by_string = generate(runner, [tok.encode("abc")],
                             SamplingConfig(max_new_tokens=10, stop=(stop,)), tok,
                             progress=False).sequences[0]
    first_eos = free.token_ids.index(eos)
    assert stopped.finish_reason == "eos" and stopped.token_ids == free.token_ids[:first_eos + 1]
    assert stopped.text == tok.decode(free.token_ids[:first_eos])     # the end token: no text
    assert by_string.finish_reason == "stop"
    assert stop not in by_string.text and free.text.startswith(by_string.text)


def test_filters():
    logits = np.array([[1.0, 3.0, 2.0, 0.0]], np.float32)
    assert np.isinf(top_k_filter(logits, 2)).tolist() == [[True, False, False, True]]
    probs = np.exp(logits[0]) / np.exp(logits[0]).sum()       # 0.032 0.644 0.237 0.087
    kept = ~np.isinf(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[False, True, True, False]]      # 0.644 < 0.7 <= 0.644 + 0.237
    assert (~np.isinf(top_p_filter(logits, float(probs[1]) / 2))).sum() == 1
    seen = np.array([[True, True, False, False]])
    penalized = apply_repetition_penalty(np.array([[-1.0, 3.0, 2.0, 0.0]], np.float32), seen,
                                         2.0)
    assert penalized.tolist() == [[-2.0, 1.5, 2.0, 0.0]]
    cfg = SamplingConfig(greedy=False, temperature=1.0, top_k=1, seed=0)
    assert next_tokens(logits, cfg, seen & False, np.random.default_rng()).tolist() == [1]


def test_sampling_draws_tokens_with_their_probabilities():
    """20,000 draws from fresh random logits at temperature 0.7: each token's frequency within
    5 standard errors of its softmax probability; a token at -inf (filtered) is never drawn;
    the same seed draws the same tokens."""
    rng = np.random.default_rng()
    logits = rng.normal(size=(1, 6)).astype(np.float32)
    logits[0, 2] = -np.inf
    draws = 20_000
    cfg = SamplingConfig(greedy=False, temperature=0.7, seed=1)
    tokens = next_tokens(np.repeat(logits, draws, 0), cfg, None, np.random.default_rng(1))
    scaled = np.exp((logits[0].astype(np.float64) - logits.max()) / 0.7)
    probs = scaled / scaled.sum()
    freq = np.bincount(tokens, minlength=6) / draws
    assert freq[2] == 0
    assert (np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / draws) + 1e-12).all()
    again = next_tokens(np.repeat(logits, draws, 0), cfg, None, np.random.default_rng(1))
    assert np.array_equal(tokens, again)


def test_bad_generation_requests(exported):
    _, out = exported(TINY)
    with pytest.raises(InfiniTrtError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with open_runner(out, "onnxruntime") as runner:
        with pytest.raises(InputError, match="at least one token"):
            generate(runner, [[]], SamplingConfig(), progress=False)
        with pytest.raises(InputError, match=r"token id 300 is outside the vocabulary \[0, 256\)"):
            generate(runner, [[300]], SamplingConfig(), progress=False)
        runner.reset(1)
        with pytest.raises(InputError, match="must not pass the segment length"):
            runner.extend(np.zeros((1, 2), np.int64), [N - 1], [2])
    result = CliRunner().invoke(main, ["run", str(out)])
    assert result.exit_code == 1 and "give --prompt" in result.output


def test_streamed_text_is_all_given_and_non_byte_ids_show():
    """A text that ends in U+FFFD (an unfinished UTF-8 character) is held back and given at
    the end if it stays so; ids beyond the 256 bytes (a random 32K-vocabulary model on the
    byte tokenizer) show as U+FFFD instead of vanishing, at once (such an id ends the bytes
    before it: they can no longer become a character)."""
    from infini_trt.runtime.text_stream import TextStream

    tok = ByteTokenizer()
    assert tok.decode(tok.encode("é") + [300] + tok.encode("x")) == "é\ufffdx"
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in tok.encode("ok ") + [tok.encode("é")[0]]]
    assert "".join(pieces) == "ok "                          # the lone byte is held back ...
    assert stream.push(1000) == "\ufffd\ufffd"                # ... until an id ends it
    assert stream.finish() == "" and stream.text == "ok \ufffd\ufffd"
