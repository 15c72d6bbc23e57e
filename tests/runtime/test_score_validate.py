"""`score` and `validate` end to end through the CLI, against the reference."""
import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import Wrapping, assert_close
from infini_trt.export import load_checkpoint, preset
from infini_trt.runtime.cli import main
from infini_trt.runtime.runners.torch_runner import TorchRunner
from infini_trt.runtime.validate import validate

TINY = preset("tiny")
N = TINY.segment_len


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_score_logits_and_perplexity_match_the_reference(exported, tmp_path, backend):
    ckpt, out = exported(TINY)
    tokens = np.random.default_rng(6).integers(0, 256, (2, 5 * N + 9))
    np.save(tmp_path / "t.npy", tokens)
    result = invoke("score", out, "--tokens", tmp_path / "t.npy", "--backend", backend,
                    "--logits-out", tmp_path / "l.npy", "--json", "--no-progress")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)                 # the logits' size goes to stderr
    with torch.no_grad():
        want = load_checkpoint(ckpt, dtype=torch.float64)(torch.from_numpy(tokens))[0]
    assert_close(want, np.load(tmp_path / "l.npy"), 1e-5)
    logp = torch.log_softmax(want[:, :-1], -1).gather(-1, torch.from_numpy(tokens[:, 1:, None]))
    assert data["nll"] == pytest.approx(float(-logp.mean()), rel=1e-5)
    assert data["perplexity"] == pytest.approx(float(torch.exp(-logp.mean())), rel=1e-5)
    assert data["predicted"] == 2 * (tokens.shape[1] - 1) and data["tokens_per_s"] > 0


def test_score_text_file_uses_the_byte_tokenizer(exported, tmp_path):
    ckpt, _ = exported(TINY)
    (tmp_path / "t.txt").write_text("héllo world, " * 20)
    result = invoke("score", ckpt, "--tokens", tmp_path / "t.txt", "--backend", "torch",
                    "--json", "--no-progress")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["tokens"] == len("héllo world, ".encode()) * 20


@pytest.mark.parametrize("content,message", [
    (None, "no such token file"),
    (np.array([[0.5, 1.5]]), "token ids must be integers"),
    (np.array([1, 999]), "token id 999 is outside the vocabulary"),
    (np.zeros((1, 1, 1), np.int64), "must hold token ids of shape"),
], ids=["missing", "floats", "out-of-vocab", "3d"])
def test_score_bad_token_files(exported, tmp_path, content, message):
    _, out = exported(TINY)
    path = tmp_path / "t.npy"
    if content is not None:
        np.save(path, content)
    result = invoke("score", out, "--tokens", path, "--logits-out", tmp_path / "l.npy",
                    "--no-progress")
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "l.npy").exists()


def test_validate_cli_passes_and_writes_report(exported, tmp_path):
    ckpt, out = exported(TINY)
    result = invoke("validate", ckpt, "--onnx", out, "--segments", 8, "--report",
                    tmp_path / "r.json", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output and "onnxruntime-cpu" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["segments"] == 8 and 0 < report["partial_segment_tokens"] < N
    ort = report["backends"][-1]
    assert ort["greedy_agreement"] >= 0.99
    assert len(ort["outputs"]["memory_out"]["per_segment"]) == 9
    assert ort["outputs"]["logits"]["rel_rms"] <= 1e-5
    from infini_trt.runtime.cpu import cpu_summary

    assert report["machine"] == cpu_summary() and f"CPU: {cpu_summary()}" in result.output


class Recording(Wrapping):
    """A backend that records the ids it is given."""

    backend = "recording"

    def __init__(self, inner):
        super().__init__(inner)
        self.seen = []

    def _step(self, ids):
        self.seen.append(np.asarray(ids).copy())
        return super()._step(ids)


def test_validate_runs_on_the_given_tokens_as_they_are(tiny_model):
    tokens = np.random.default_rng(11).integers(0, 256, (3, 2 * N + 5))
    ref, seen = TorchRunner(tiny_model), Recording(TorchRunner(copy.deepcopy(tiny_model).float()))
    report = validate(ref, [seen], tokens=tokens, tokens_label="t.npy", progress=False)
    assert np.array_equal(np.concatenate(seen.seen, axis=1), tokens)
    assert (report.batch, report.segments, report.partial) == (3, 2, 5)
    assert report.to_dict()["tokens"] == "t.npy" and "the tokens of t.npy" in report.table()
    assert report.passed and report.backends[0].positions == 3 * (N + 1 + 5)


def test_validate_cli_on_a_text_file(exported, tmp_path):
    ckpt, out = exported(TINY)
    text = "The compressive memory carries the key across segments. " * 12
    (tmp_path / "t.txt").write_text(text)
    result = invoke("validate", ckpt, "--onnx", out, "--tokens", tmp_path / "t.txt",
                    "--batch", 3, "--segments", 4, "--report", tmp_path / "r.json",
                    "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    rows = len(text.encode()) // 3                        # bytes; each row cut to 4 segments
    assert report["batch"] == 3 and report["segments"] * N + report["partial_segment_tokens"] \
        == min(rows, 4 * N)
    assert report["backends"][-1]["greedy_agreement"] >= 0.99


@pytest.mark.parametrize("content,message", [
    (None, "no such token file"),
    (np.array([1]), "holds 1 tokens, fewer than --batch 2"),
    (np.array([[1, 999]]), "token id 999 is outside the vocabulary"),
], ids=["missing", "too-short", "out-of-vocab"])
def test_validate_bad_token_files(exported, tmp_path, content, message):
    ckpt, out = exported(TINY)
    path = tmp_path / "t.npy"
    if content is not None:
        np.save(path, content)
    result = invoke("validate", ckpt, "--onnx", out, "--tokens", path, "--report",
                    tmp_path / "r.json", "--no-progress")
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "r.json").exists()


def test_validate_cli_fails_with_exit_1(exported):
    ckpt, out = exported(TINY)
    result = invoke("validate", ckpt, "--onnx", out, "--segments", 1, "--tol", "1e-12",
                    "--no-progress")
    assert result.exit_code == 1 and "FAILED" in result.output


def test_validate_refuses_an_export_of_another_model(exported):
    ckpt, _ = exported(TINY)
    _, other = exported(TINY.replace(update_rule="delta"))
    result = invoke("validate", ckpt, "--onnx", other, "--no-progress")
    assert result.exit_code == 1 and "another config" in result.output


class NaNAfter(Wrapping):
    """A backend that goes wrong in its third segment: validation must catch it."""

    backend = "broken"

    def _reset(self, batch):
        super()._reset(batch)
        self.calls = 0

    def _step(self, ids):
        self.calls += 1
        logits = super()._step(ids)
        return logits * float("nan") if self.calls == 3 else logits


def test_validate_catches_nan_in_a_late_segment(tiny_model):
    ref = TorchRunner(tiny_model)
    bad = NaNAfter(TorchRunner(copy.deepcopy(tiny_model).float()))
    report = validate(ref, [bad], segments=4, batch=1, progress=False)
    logits = report.backends[0].outputs["logits"]
    assert not report.passed and not logits.finite
    assert [e.finite for e in logits.per_segment] == [True, True, False, True, True]
