"""`prefill`, `run --state/--save-state` and `score --state`: a document read once and then
continued gives what reading it whole gives."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import assert_close
from infini_trt.export import preset
from infini_trt.runtime.cli import main

TINY = preset("tiny")
N = TINY.segment_len
DOC = "The grass is green. The sky is blue. " * 9          # 333 bytes: a segment and a bit


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def greedy(out, *args, tokens=24):
    result = invoke("run", out, *args, "--max-new-tokens", tokens, "--json", "--no-progress")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["sequences"]


def test_a_prefilled_document_answers_as_the_whole_prompt(exported, tmp_path):
    _, out = exported(TINY)
    (tmp_path / "doc.txt").write_text(DOC)
    result = invoke("prefill", out, "--prompt-file", tmp_path / "doc.txt", "-o",
                    tmp_path / "doc.ctx", "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"read {len(DOC):,} tokens" in result.output and "wrote" in result.output
    whole = greedy(out, "--prompt", DOC + " What")
    for backend in ("onnxruntime", "torch"):
        resumed = greedy(out, "--state", tmp_path / "doc.ctx", "--prompt", " What",
                         "--backend", backend)
        assert resumed[0]["token_ids"] == whole[0]["token_ids"], backend
    forks = greedy(out, "--state", tmp_path / "doc.ctx", "--prompt", " What", "--prompt", " Why")
    assert forks[0]["token_ids"] == whole[0]["token_ids"]
    assert forks[1]["token_ids"] == greedy(out, "--prompt", DOC + " Why")[0]["token_ids"]


def test_a_conversation_goes_on_across_runs(exported, tmp_path):
    _, out = exported(TINY)
    once = greedy(out, "--prompt", DOC, tokens=2 * N + 8)[0]["token_ids"]
    first = greedy(out, "--prompt", DOC, "--save-state", tmp_path / "a.ctx", tokens=N + 3)
    second = greedy(out, "--state", tmp_path / "a.ctx", "--save-state", tmp_path / "b.ctx",
                    tokens=N + 5)
    assert first[0]["token_ids"] + second[0]["token_ids"] == once
    assert (tmp_path / "b.ctx").stat().st_size > 0


def test_score_continues_a_context(exported, tmp_path):
    _, out = exported(TINY)
    ids = np.random.default_rng(0).integers(0, 256, 3 * N + 5)
    np.save(tmp_path / "head.npy", ids[:2 * N + 7])
    np.save(tmp_path / "tail.npy", ids[2 * N + 7:])
    np.save(tmp_path / "all.npy", ids)
    assert invoke("prefill", out, "--prompt-file", tmp_path / "head.npy", "-o",
                  tmp_path / "h.ctx", "--no-progress").exit_code == 0
    for name, extra in (("all", ()), ("tail", ("--state", tmp_path / "h.ctx"))):
        result = invoke("score", out, "--tokens", tmp_path / f"{name}.npy", "--logits-out",
                        tmp_path / f"{name}.logits.npy", "--json", "--no-progress", *extra)
        assert result.exit_code == 0, result.output
    whole, tail = np.load(tmp_path / "all.logits.npy"), np.load(tmp_path / "tail.logits.npy")
    assert_close(whole[2 * N + 7:], tail, 1e-5)


def test_a_context_of_another_model_is_refused_before_any_work(exported, tmp_path,
                                                              monkeypatch):
    ckpt, out = exported(TINY)
    assert invoke("prefill", out, "--prompt", DOC, "-o", tmp_path / "doc.ctx",
                  "--no-progress").exit_code == 0
    other, _ = exported(TINY, seed=7, graphs=("segment",))
    monkeypatch.setenv("INFINI_TRT_CACHE", str(tmp_path / "cache"))
    result = invoke("run", other, "--state", tmp_path / "doc.ctx", "--prompt", "x")
    assert result.exit_code == 1 and "other weights" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "cache" / "exports").exists()       # nothing was exported
    (tmp_path / "doc.ctx").write_bytes(b"no context")
    result = invoke("score", ckpt, "--state", tmp_path / "doc.ctx", "--tokens", tmp_path /
                    "doc.ctx")
    assert result.exit_code == 1 and "not a readable context file" in result.output


@pytest.mark.parametrize("args,message", [
    (("--prompt", "a", "--prompt", "b"), "a context holds one sequence"),
    ((), "give --prompt TEXT or --prompt-file FILE"),
])
def test_prefill_takes_one_prompt(exported, tmp_path, args, message):
    _, out = exported(TINY)
    result = invoke("prefill", out, *args, "-o", tmp_path / "c.ctx")
    assert result.exit_code == 1 and message in result.output
    assert not (tmp_path / "c.ctx").exists()
