"""The decoding phase of `validate`: extend, fold and context files against the reference, and
the faults it exists to catch (a wrong cache position, a missed fold, a row loaded without its
K/V rows, NaN in one step)."""
import copy
import json

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import Wrapping

from infini_trt.export import preset
from infini_trt.runtime.cli import main
from infini_trt.runtime.runners.base import RowState
from infini_trt.runtime.runners.torch_runner import TorchRunner
from infini_trt.runtime.validate import limits
from infini_trt.runtime.validate_decoding import (DecodingPlan, decoding_tokens,
                                                  validate_decoding)

TINY = preset("tiny")
N = TINY.segment_len


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("n", [2, 3, 32, 64, 2048])
@pytest.mark.parametrize("decode", [2, 3, 8, 32, 100])
def test_every_plan_ends_its_prompt_mid_segment_and_crosses_a_fold(n, decode):
    plan = DecodingPlan.for_segment(n, decode)
    assert plan.prompt > n and plan.prompt % n != 0          # the prompt's tail goes by extend
    assert plan.folds >= 1 and 1 <= plan.snapshot < plan.decode
    first_fold = n - plan.prompt % n                         # decoded tokens before it
    assert plan.snapshot <= first_fold
    if first_fold >= 2:                                      # the file carries K/V rows
        assert plan.snapshot < first_fold


def test_plan_refusals():
    with pytest.raises(Exception, match="at least 2"):
        DecodingPlan.for_segment(N, 1)
    with pytest.raises(Exception, match="at least 2 tokens"):
        DecodingPlan.for_segment(1, 8)


class ShiftedCache(Wrapping):
    """Writes each token one K/V slot too far (as a wrong position input would)."""

    def _extend(self, ids, start, length, rows):
        shifted = np.where(start + length < self.config.segment_len, start + 1, start)
        return super()._extend(ids, shifted, length, rows)


class MissedFold(Wrapping):
    """Never folds row 0: its memory stops at what the prompt wrote."""

    def _fold(self, mask):
        mask = mask.copy()
        mask[0] = False
        if mask.any():
            self.inner.fold(mask)


class LoadsWithoutKV(Wrapping):
    """Loads memory and norm but leaves the segment's K/V rows empty (zeros)."""

    def write_row(self, b, row):
        self.inner.write_row(b, RowState(row.memory, row.norm, np.zeros_like(row.k),
                                         np.zeros_like(row.v)))


class NaNOnce(Wrapping):
    """Gives NaN logits for one decoded token."""

    def _reset(self, batch):
        super()._reset(batch)
        self.calls = getattr(self, "calls", 0)

    def _extend(self, ids, start, length, rows):
        self.calls += 1
        logits = super()._extend(ids, start, length, rows)
        return logits * float("nan") if self.calls == 5 else logits


def run(tiny_model, candidates, decode=16, batch=2, seed=None):
    plan = DecodingPlan.for_segment(N, decode)
    seed = np.random.SeedSequence().entropy % 2**32 if seed is None else seed
    ids = decoding_tokens(plan, batch, TINY.vocab_size, seed)
    tol, greedy = limits("float32")
    return validate_decoding(TorchRunner(tiny_model), candidates, plan, ids, tol, greedy,
                             progress=False)


def fp32(model):
    return TorchRunner(copy.deepcopy(model).float())


def test_float32_passes_with_every_step_and_state_compared(tiny_model):
    report = run(tiny_model, [fp32(tiny_model), Wrapping(fp32(tiny_model))], decode=20)
    assert report.passed, report.to_dict()
    for backend in report.backends:
        assert len(backend.outputs["logits"].per_segment) == 1 + 20   # prompt + each token
        assert len(backend.outputs["memory_out"].per_segment) == 2    # snapshot, end
        assert backend.outputs["logits"].rel_rms <= 1e-5
        assert backend.greedy_agreement >= 0.99 and backend.positions == 2 * 21
    data = report.to_dict()
    assert data["folds"] >= 1 and data["states_at"] == ["snapshot", "end"]
    assert len(data["backends"][0]["outputs"]["logits"]["per_step"]) == 21
    assert len(data["backends"][0]["outputs"]["norm_out"]["per_state"]) == 2


@pytest.mark.parametrize("broken,where", [
    (ShiftedCache, "logits"),
    (MissedFold, "memory_out"),
    (LoadsWithoutKV, "logits"),
], ids=["shifted-cache", "missed-fold", "load-without-kv"])
def test_decoding_faults_fail(tiny_model, broken, where):
    report = run(tiny_model, [fp32(tiny_model), broken(fp32(tiny_model))])
    good, bad = report.backends
    assert good.passed and not bad.passed and not report.passed
    assert not bad.outputs[where].passed and bad.outputs[where].finite


def test_a_load_without_kv_goes_wrong_only_after_the_snapshot(tiny_model):
    report = run(tiny_model, [LoadsWithoutKV(fp32(tiny_model))])
    steps = report.backends[0].outputs["logits"].per_segment
    snapshot = report.plan.snapshot
    assert all(e.rel_rms <= 1e-5 for e in steps[:snapshot + 1])      # prompt .. the snapshot
    assert steps[snapshot + 1].rel_rms > 1e-3


def test_nan_in_one_decoded_token_fails(tiny_model):
    report = run(tiny_model, [NaNOnce(fp32(tiny_model))])
    logits = report.backends[0].outputs["logits"]
    assert not report.passed and not logits.finite
    assert sum(not e.finite for e in logits.per_segment) == 1


def test_validate_cli_reports_the_decoding_phase(exported, tmp_path):
    ckpt, out = exported(TINY)
    result = invoke("validate", ckpt, "--onnx", out, "--segments", 2, "--decode-tokens", 12,
                    "--report", tmp_path / "r.json", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "decoding: a prompt of" in result.output and "PASSED" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    decoding = report["decoding"]
    assert decoding["passed"] and decoding["decode_tokens"] == 12 and decoding["folds"] >= 1
    ort = decoding["backends"][-1]
    assert ort["backend"].startswith("onnxruntime") and ort["greedy_agreement"] >= 0.99
    assert len(ort["outputs"]["logits"]["per_step"]) == 13
    assert ort["outputs"]["logits"]["rel_rms"] <= 1e-5


def test_a_decoding_fault_fails_the_whole_validation(exported):
    """The segment phase never folds: only the decoding phase sees a missed fold, and its
    verdict is the report's (the CLI's exit code is report.passed)."""
    from infini_trt.runtime.validate import validate_export

    ckpt, out = exported(TINY)
    broken = MissedFold(TorchRunner.from_checkpoint(ckpt))
    report = validate_export(ckpt, out, segments=2, decode_tokens=8, extra=[broken],
                             progress=False)
    assert all(b.passed for b in report.backends)                 # the segment phase
    assert not report.decoding.backends[-1].passed and not report.passed
    assert report.to_dict()["passed"] is False and report.table().endswith("FAILED")


def test_validate_cli_decode_tokens(exported, tmp_path):
    ckpt, out = exported(TINY)
    skipped = invoke("validate", ckpt, "--onnx", out, "--segments", 1, "--decode-tokens", 0,
                     "--report", tmp_path / "r.json", "--no-progress")
    assert skipped.exit_code == 0
    assert "decoding: not checked (--decode-tokens 0)" in skipped.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["decoding"] is None and report["decoding_skipped"] == "--decode-tokens 0"
    refused = invoke("validate", ckpt, "--onnx", out, "--decode-tokens", 1, "--no-progress")
    assert refused.exit_code == 1 and "--decode-tokens must be at least 2" in refused.output
    assert "Traceback" not in refused.output and "comparing" not in refused.output


def test_validate_cli_token_file_too_short_for_decoding(exported, tmp_path):
    ckpt, out = exported(TINY)
    np.save(tmp_path / "t.npy", np.random.default_rng(3).integers(0, 256, (2, N + 4)))
    result = invoke("validate", ckpt, "--onnx", out, "--tokens", tmp_path / "t.npy",
                    "--report", tmp_path / "r.json", "--no-progress")
    assert result.exit_code == 1 and "the decoding phase needs" in result.output
    assert "--decode-tokens 0" in result.output and not (tmp_path / "r.json").exists()
    ok = invoke("validate", ckpt, "--onnx", out, "--tokens", tmp_path / "t.npy",
                "--decode-tokens", 0, "--no-progress")
    assert ok.exit_code == 0, ok.output


def test_an_export_without_decoding_graphs_is_validated_without_the_phase(exported, tmp_path):
    ckpt, out = exported(TINY.replace(segment_len=16), graphs=("segment",))
    result = invoke("validate", ckpt, "--onnx", out, "--segments", 2, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "decoding: not checked (the export has no extend or fold graph)" in result.output
