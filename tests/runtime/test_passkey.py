"""The passkey task: the prompt generator, the grid through torch and ONNX Runtime with the
bundled model, the bundled checkpoint itself, and the `passkey` command."""
import json

import numpy as np
import pytest
import torch

from infini_trt.export import load_checkpoint, read_checkpoint
from infini_trt.export.errors import InputError
from infini_trt.runtime.models import bundled_model
from infini_trt.runtime.lengths import parse_lengths
from infini_trt.runtime.passkey import parse_depths, run_passkey
from infini_trt.runtime.passkey_data import (ANSWER_TOKEN, KEY_TOKEN, QUESTION_TOKEN,
                                             PasskeyGenerator, vocabulary)
from infini_trt.runtime.runners.torch_runner import TorchRunner
from infini_trt.runtime.tokenizer import model_tokenizer

N = 64


@pytest.fixture(scope="module")
def bundled():
    return bundled_model()


@pytest.fixture(scope="module")
def tokenizer(bundled):
    return model_tokenizer(bundled, len(vocabulary()))


@pytest.fixture(scope="module")
def gen(tokenizer):
    return PasskeyGenerator(tokenizer.encode, N, tokenizer.decode)


def words(tokenizer, ids):
    return [tokenizer.tok.id_to_token(int(i)) for i in ids]


# the generator ---------------------------------------------------------------------------
def test_prompts_are_deterministic_from_the_seed(gen):
    a = gen.batch(np.random.default_rng(5), 4, 1024)
    b = gen.batch(np.random.default_rng(5), 4, 1024)
    c = gen.batch(np.random.default_rng(6), 4, 1024)
    assert all((p.ids == q.ids).all() for p, q in zip(a, b))
    assert any(p.key != q.key for p, q in zip(a, c))


@pytest.mark.parametrize("length", [gen_len for gen_len in (200, 1024, 5000)])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_key_where_it_should_be(gen, tokenizer, length, depth):
    p = gen.prompt(length, depth, "70135")
    ids, kinds = p.ids, p.kinds
    assert len(ids) == len(kinds) == p.length == length
    key = ids[p.key_start:p.key_start + gen.key_len]
    assert words(tokenizer, key) == \
        "The pass key is 7 0 1 3 5 . Remember it . 7 0 1 3 5 is the pass key .".split()
    assert (kinds[p.key_start:p.key_start + gen.key_len] == KEY_TOKEN).all()
    assert (kinds == KEY_TOKEN).sum() == gen.key_len
    assert words(tokenizer, p.answer_ids) == list("70135")
    assert (kinds[p.answer_start:] == ANSWER_TOKEN).all()
    question_at = int(np.argmax(kinds == QUESTION_TOKEN))
    assert words(tokenizer, ids[question_at:p.answer_start]) == \
        "What is the pass key ? The pass key is".split()
    # the whole key lies before the question's segment: only the memory can carry it
    assert p.key_start + gen.key_len <= question_at // N * N
    assert (p.window(37, 37 + 300) == ids[37:37 + 300]).all()


def test_depth_orders_the_key(gen):
    starts = [gen.prompt(4096, d, "12345").key_start for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert starts == sorted(starts) and starts[0] == len(gen.intro)
    assert starts[-1] + gen.key_len > 4096 - 2 * N - 20       # 'end': the segment before


def test_million_token_prompt_is_generated_lazily(gen, tokenizer):
    p = gen.prompt(2 ** 20, 0.5, "99999")
    tail = p.window(2 ** 20 - N, 2 ** 20)
    assert len(tail) == N and words(tokenizer, tail[-5:]) == list("99999")
    head = p.window(p.key_start, p.key_start + 4)
    assert words(tokenizer, head) == "The pass key is".split()
    assert 2 ** 19 - 2 * N < p.key_start < 2 ** 19 + 2 * N          # middle


def test_too_short_and_bad_inputs(gen):
    with pytest.raises(InputError, match="too short"):
        gen.prompt(gen.min_length() - 1, 0.0, "12345")
    gen.prompt(gen.min_length(), 0.0, "12345")
    with pytest.raises(InputError, match="5 digits"):
        gen.prompt(1024, 0.0, "1234")
    assert parse_lengths("1K, 4k,100,1M") == [1024, 4096, 100, 2 ** 20]
    assert parse_depths("start,end,0.25") == [("start", 0.0), ("end", 1.0), ("0.25", 0.25)]
    for bad in ("1G", "", "0"):
        with pytest.raises(InputError):
            parse_lengths(bad)
    with pytest.raises(InputError):
        parse_depths("bottom")


# the bundled model -----------------------------------------------------------------------
def test_bundled_checkpoint_loads_and_is_small(bundled, tokenizer):
    ckpt = read_checkpoint(bundled)
    model = load_checkpoint(bundled)
    size = sum(f.stat().st_size for f in bundled.iterdir())
    assert size <= 20 * 2 ** 20
    assert ckpt.config.vocab_size == len(vocabulary()) == tokenizer.tok.get_vocab_size()
    assert ckpt.config.segment_len == N
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_grid_torch_and_onnxruntime_agree_and_retrieve(bundled, gen, shared_cache,
                                                       monkeypatch):
    """Tiny lengths (the key 1 to 7 segments back): the trained model answers, and ONNX
    Runtime (the bundled checkpoint exported, which is the export test) agrees with torch."""
    from infini_trt.runtime.runners import load

    monkeypatch.setenv("INFINI_TRT_CACHE", str(shared_cache))
    lengths, depths = [256, 512], parse_depths("start,end")
    results = {}
    for backend in ("torch", "onnxruntime"):
        with load(bundled, backend) as runner:
            results[backend] = run_passkey(runner, gen, lengths, depths, trials=4, seed=1,
                                           progress=False)
    torch_cells, ort_cells = results["torch"].cells, results["onnxruntime"].cells
    assert [c.answers for c in torch_cells] == [c.answers for c in ort_cells]
    assert all(c.accuracy == 1.0 for c in torch_cells), results["torch"].table()
    assert len(results["torch"].lengths) == 2 and results["torch"].lengths[0].tokens == 256 * 8
    assert "start" in results["torch"].table() and "512" in results["torch"].table()


def test_a_wrong_model_scores_zero(gen):
    """A check that can fail: random weights of the same shape do not retrieve the key."""
    from infini_trt.export import InfiniLM, init_weights

    model = init_weights(InfiniLM(read_checkpoint(bundled_model()).config), seed=3)
    result = run_passkey(TorchRunner(model), gen, [256], parse_depths("start"), trials=4,
                         progress=False)
    assert result.cells[0].exact == 0


# the command -----------------------------------------------------------------------------
def test_passkey_command(tmp_path):
    from click.testing import CliRunner

    from infini_trt.runtime.cli import main

    out = tmp_path / "grid.json"
    result = CliRunner().invoke(main, ["passkey", "--backend", "torch", "--lengths", "256",
                                       "--depths", "middle", "--trials", "2", "--json",
                                       str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "exact match of greedy decoding" in result.output and "middle" in result.output
    report = json.loads(out.read_text())
    assert report["cells"][0]["length"] == 256 and report["cells"][0]["trials"] == 2
    bad = CliRunner().invoke(main, ["passkey", "--backend", "torch", "--lengths", "50"])
    assert bad.exit_code == 1 and "too short" in bad.output
    assert "Traceback" not in bad.output
