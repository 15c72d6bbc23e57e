"""Sessions and contexts: a saved context resumed equals the sequence run without a break, on
the same backend bit for bit and across backends within fp32 tolerance; rows are
independent; forks do not interfere; every bad context file is refused with one line."""
import json

import numpy as np
import pytest
import torch

from helpers import assert_close
from infini_trt.export import load_checkpoint, preset
from infini_trt.export.errors import InfiniTrtError
from infini_trt.runtime.context import Context
from infini_trt.runtime.generation import generate
from infini_trt.runtime.runners import open_runner
from infini_trt.runtime.sampling import SamplingConfig
from infini_trt.runtime.session import Session

TINY = preset("tiny")
N = TINY.segment_len


def tokens(seed: int, length: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, length)


def continue_(session: Session, rest: np.ndarray, decoded: int = 5) -> np.ndarray:
    """Feed `rest` (ragged across a segment boundary), then decode `decoded` greedy tokens
    -> every logits row seen after the feed, stacked (1 + decoded, V)."""
    out = [session.feed([rest], progress=False)[0]]
    for _ in range(decoded):
        out.append(session.decode(out[-1].argmax(-1)[None])[0])
    return np.stack(out)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("cut", [2 * N, 2 * N + 7, N - 1], ids=["boundary", "mid-segment",
                                                                  "first-segment"])
def test_resume_equals_continuous_bit_for_bit(exported, tmp_path, backend, cut):
    _, out = exported(TINY)
    head, rest = tokens(1, cut), tokens(2, N + 9)
    with open_runner(out, backend) as runner:
        whole = Session(runner)
        whole.feed([head], progress=False)
        saved = whole.save(0)
        want = continue_(whole, rest)
        size = saved.save(tmp_path / "ctx.safetensors")
        resumed = Session(runner)
        resumed.load(0, Context.load(tmp_path / "ctx.safetensors"))
        got = continue_(resumed, rest)
    assert np.array_equal(want, got)
    assert saved.tokens == cut and saved.position == cut % N
    assert size == (tmp_path / "ctx.safetensors").stat().st_size


def test_resume_after_generation_equals_continuous(exported, tmp_path):
    _, out = exported(TINY)
    cfg = SamplingConfig(max_new_tokens=N + 3)          # crosses a segment boundary
    with open_runner(out, "onnxruntime") as runner:
        session = Session(runner)
        answer = generate(session, [tokens(3, 40)], cfg, feed_last=True).sequences[0]
        session.save(0).save(tmp_path / "ctx.safetensors")
        want = continue_(session, tokens(4, 10))
        resumed = Session(runner)
        resumed.load(0, Context.load(tmp_path / "ctx.safetensors"))
        assert resumed.seen[0] == 40 + len(answer.token_ids)
        got = continue_(resumed, tokens(4, 10))
    assert np.array_equal(want, got)


@pytest.mark.parametrize("source,target", [("onnxruntime", "torch"), ("torch", "onnxruntime")])
def test_a_context_moves_between_backends(exported, tmp_path, source, target):
    ckpt, out = exported(TINY)
    head, rest = tokens(5, 3 * N + 11), tokens(6, 2 * N)
    with open_runner(out, source) as runner:
        session = Session(runner)
        session.feed([head], progress=False)
        session.save(0).save(tmp_path / "ctx.safetensors")
    with open_runner(out, target) as runner:
        session = Session(runner)
        session.load(0, Context.load(tmp_path / "ctx.safetensors"))
        got = session.feed([rest[:-1]], progress=False)[0]
    model = load_checkpoint(ckpt, dtype=torch.float64)
    with torch.no_grad():
        want = model(torch.from_numpy(np.concatenate([head, rest[:-1]]))[None])[0][0, -1]
    assert_close(want, got, 1e-5, what=f"{source} -> {target}")


def test_rows_are_independent_and_forks_do_not_interfere(exported):
    _, out = exported(TINY)
    heads = [tokens(7, 2 * N + 3), tokens(8, 5), tokens(9, 4 * N)]
    rests = [tokens(10, N + 4), tokens(11, 2), tokens(12, 3 * N)]
    with open_runner(out, "onnxruntime") as runner:
        contexts, alone = [], []
        for head, rest in zip(heads, rests):
            session = Session(runner)
            session.feed([head], progress=False)
            contexts.append(session.save(0))
            alone.append(continue_(session, rest, decoded=3))
        batch = Session(runner, 4)
        for row, context in enumerate(contexts):
            batch.load(row, context)
        batch.load(3, contexts[0])                       # a fork of row 0
        batch.reset(1)                                   # row 1 starts over ...
        batch.load(1, contexts[1])                       # ... and is loaded again
        first = batch.feed(rests + [tokens(13, 7)], progress=False)
        rows = [[first[b]] for b in range(4)]
        for _ in range(3):
            nxt = batch.decode(np.stack([r[-1] for r in rows]).argmax(-1))
            for b in range(4):
                rows[b].append(nxt[b])
        fork = Session(runner)
        fork.load(0, contexts[0])
        fork_alone = continue_(fork, tokens(13, 7), decoded=3)
    for b in range(3):
        assert_close(alone[b], np.stack(rows[b]), 1e-6, what=f"row {b}")
    assert_close(fork_alone, np.stack(rows[3]), 1e-6, what="the fork")


def test_the_file_size_does_not_grow_with_the_context(exported, tmp_path):
    _, out = exported(TINY)
    sizes = {}
    with open_runner(out, "onnxruntime") as runner:
        for length in (2 * N, 40 * N, 2 * N + 5, 40 * N + 5):
            session = Session(runner)
            session.feed([tokens(length, length)], progress=False)
            sizes[length] = session.save(0).save(tmp_path / f"{length}.safetensors")
    # equal but for the digits of the token count in the header
    assert abs(sizes[2 * N] - sizes[40 * N]) <= 8
    assert abs(sizes[2 * N + 5] - sizes[40 * N + 5]) <= 8
    state = 4 * TINY.n_layers * TINY.n_kv_heads * TINY.dk * (TINY.dv + 1)
    assert state + 4 * TINY.vocab_size < sizes[2 * N] < state + 4 * TINY.vocab_size + 4096


@pytest.fixture
def saved(exported, tmp_path):
    _, out = exported(TINY)
    with open_runner(out, "onnxruntime") as runner:
        session = Session(runner)
        session.feed([tokens(14, N + 3)], progress=False)
        session.save(0).save(tmp_path / "ctx.safetensors")
    return tmp_path / "ctx.safetensors"


def _rewrite_metadata(path, change):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), "np") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    change(metadata, tensors)
    save_file(tensors, str(path), metadata=metadata)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _flip_a_value(path):
    data = bytearray(path.read_bytes())
    data[-50] ^= 0x40
    path.write_bytes(bytes(data))


def _newer(path):
    _rewrite_metadata(path, lambda m, t: m.update(format_version="2"))


def _not_a_context(path):
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3, np.float32)}, str(path))


def _header_edited(path):
    def edit(metadata, tensors):
        header = json.loads(metadata["header"])
        header["position"] += 1
        metadata["header"] = json.dumps(header)
    _rewrite_metadata(path, edit)


@pytest.mark.parametrize("damage,message", [
    (_truncate, "not a readable context file (corrupt or truncated"),
    (_flip_a_value, "do not match the hash in its header"),
    (_newer, "written by a newer infini-trt (context format 2; this one reads 1)"),
    (_not_a_context, "is not an infini-trt context file"),
    (_header_edited, "its tensors' shapes disagree"),
    (lambda p: p.unlink(), "no such context file"),
], ids=["truncated", "flipped-byte", "newer-version", "not-a-context", "header-edited",
        "missing"])
def test_bad_context_files_are_refused(saved, damage, message):
    damage(saved)
    with pytest.raises(InfiniTrtError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Context.load(saved)


def test_another_models_context_is_refused(exported, saved):
    context = Context.load(saved)
    _, other = exported(TINY, seed=7, graphs=("segment",))           # other weights
    with open_runner(other, "onnxruntime") as runner:
        with pytest.raises(InfiniTrtError, match="other weights"):
            Session(runner).load(0, context)
    _, delta = exported(TINY.replace(update_rule="delta"))           # another config
    with open_runner(delta, "onnxruntime") as runner:
        with pytest.raises(InfiniTrtError, match="another configuration"):
            Session(runner).load(0, context)
