"""onnxruntime-genai as a peer of `bench`: the builder's export is the Hugging Face model it was
given (greedy tokens of the HF model in torch, logits against float64), it is cached, it is
measured like our subjects (sequentially and in the rounds in alternation), a converted
checkpoint's source is measured in its place, and a peer that cannot run is skipped with why."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_close
from infini_trt.export import preset
from infini_trt.export.errors import InputError
from infini_trt.runtime.bench import BenchSettings, run_bench
from infini_trt.runtime.bench_report import table

TINY = preset("tiny")
N = TINY.segment_len


@pytest.fixture
def genai():
    return pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed "
                               "(pip install \"infini-trt[peers]\")")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One export cache for this module: each builder export is made once."""
    return tmp_path_factory.mktemp("genai-cache")


@pytest.fixture
def in_cache(cache, monkeypatch):
    monkeypatch.setenv("INFINI_TRT_CACHE", str(cache))
    return cache


SOURCE_POSITIONS = 4 * N                     # the sources' max_position_embeddings


def hf_source(cfg, directory, seed=0, max_positions=SOURCE_POSITIONS):
    """A random Llama of cfg's shape saved as a Hugging Face checkpoint, without a tokenizer
    (the peer adds one) -> the model. The same arguments give the same files (one cache
    entry for every test that builds from them)."""
    from infini_trt.runtime.peer_genai import random_llama

    model = random_llama(cfg, seed, max_positions)
    model.save_pretrained(directory)
    return model


def test_peer_export_is_the_hf_model(genai, in_cache, tmp_path):
    """The builder's export, read in segments and decoded greedily through GenaiRunner (the
    bench's path), gives the HF model's greedy tokens (torch float32) and its logits (float64
    reference: relative RMS <= 1e-5) on a fresh random prompt. The source has no tokenizer:
    the peer adds one."""
    from infini_trt.runtime.peer_genai import GenaiRunner, cached_genai
    from infini_trt.runtime.session import Session

    hf = hf_source(TINY, tmp_path / "hf")
    export = cached_genai(TINY, "float32", source=tmp_path / "hf", log=lambda s: None)
    prompt_len, steps = 2 * N + 7, 12
    prompt = np.random.default_rng().integers(0, TINY.vocab_size, prompt_len)
    with torch.no_grad():
        want = hf.generate(torch.from_numpy(prompt)[None], max_new_tokens=steps,
                           min_new_tokens=steps, do_sample=False)[0, prompt_len:].numpy()
    runner = GenaiRunner(export, TINY, threads=1)
    runner.capacity = prompt_len + steps
    session = Session(runner, 1)
    logits = [session.feed([prompt], progress=False)[0]]
    for token in want[:-1]:                                 # teacher-forced: HF's tokens
        logits.append(session.decode(np.array([token]))[0])
    got = np.stack(logits)
    assert np.isfinite(got).all()
    with torch.no_grad():
        reference = hf.double()(torch.from_numpy(np.concatenate([prompt, want[:-1]]))[None]
                                ).logits[0, prompt_len - 1:].numpy()
    assert_close(torch.from_numpy(reference), torch.from_numpy(got), 1e-5, what="logits")
    # greedy: og's own choice at every step is HF's (where HF's top two differ beyond the
    # float32 error of either)
    top2 = np.sort(reference, -1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > 1e-4
    assert decisive.sum() >= steps - 2
    assert (got.argmax(-1) == want)[decisive].all(), (got.argmax(-1), want)


def test_bench_measures_the_peer(genai, exported, in_cache):
    """Prefill, segment latency, TTFT, decode and peak RSS of the peer (positive, finite),
    in the rounds in alternation too, with the ratios ours/theirs; its random weights are
    those of `random_llama` from the seed."""
    from infini_trt.export.files import sha256_file
    from infini_trt.runtime.peer_genai import context_positions, random_llama

    _, out = exported(TINY)
    settings = BenchSettings(lengths=(2 * N,), decode_tokens=3, isolate=False, threads=1,
                             calibrate_s=0.1, rounds=1, round_segments=1,
                             round_decode_tokens=4, rounds_min_s=0.0)
    report = run_bench(out, ["onnxruntime", "onnxruntime-genai"], settings, log=lambda s: None)
    json.dumps(report)
    ours, peer = report["subjects"]
    assert peer["status"] == "ok", peer["reason"]
    assert peer["kind"] == "genai" and not peer["infini"] and "onnxruntime-genai" in peer["label"]
    (p,) = peer["points"]
    figures = [p["prefill_tokens_per_s"], p["ttft_s"], p["decode_tokens_per_s"],
               p["peak_rss_mb"], p["segment_latency_ms"]["p50"], p["prefill_efficiency"],
               p["decode_bandwidth_use"]]
    assert all(math.isfinite(x) and x > 0 for x in figures), figures
    assert p["ttft_s"] >= p["prefill_s"] and p["segment_latency_ms"]["count"] == 2
    assert p["inter_token_latency_ms"]["count"] == 3
    ratios = ours["points"][0]["vs_genai"]["onnxruntime-genai"]
    assert ratios["prefill"] == pytest.approx(ours["points"][0]["prefill_tokens_per_s"]
                                              / p["prefill_tokens_per_s"])
    assert ratios["peak"] == pytest.approx(p["peak_rss_mb"] / ours["points"][0]["peak_rss_mb"])
    assert [r["length"] for r in peer["interleaved"]] == [0, 2 * N]   # like ours
    for r in peer["interleaved"]:
        assert r["segment_ms"]["count"] == 1
        assert r["decode_token_ms"]["count"] == 4 and r["decode_tokens_per_s"] > 0
    assert all(p["vs_genai"]["onnxruntime-genai"]["decode"] > 0 for p in ours["interleaved"])
    text = table(report)
    assert "against onnxruntime-genai" in text and "in alternation against" in text
    # the peer's weights: transformers' init from the seed, reproducible
    record = json.loads((Path(peer["path"]) / "manifest.json").read_text())["source"]
    positions = record["hf_config"]["max_position_embeddings"]
    assert positions == context_positions(2 * N + N + N + 4 + 1)     # the rounds' room
    model = random_llama(TINY, 0, positions)
    model.save_pretrained(in_cache / "again")
    assert sha256_file(in_cache / "again" / "model.safetensors") == record["weights_sha256"]


def test_builder_export_is_cached(genai, in_cache, monkeypatch, tmp_path):
    """A second resolve uses the cache entry (the builder is not run again); a damaged entry
    is made again."""
    import shutil

    from infini_trt.runtime import peer_genai

    hf_source(TINY, tmp_path / "hf")
    entry = peer_genai.cached_genai(TINY, "float32", source=tmp_path / "hf", log=lambda s: None)
    made = []
    monkeypatch.setattr(peer_genai, "run_builder", lambda *args: made.append(args) or 0.0)
    assert peer_genai.cached_genai(TINY, "float32", source=tmp_path / "hf") == entry
    assert not made
    good = tmp_path / "good"
    shutil.copytree(entry, good)

    def builder(hf_dir, output, precision, log_file, work):     # the same files, fast
        made.append(precision)
        for path in good.iterdir():
            if path.name != "manifest.json":
                shutil.copyfile(path, output / path.name)
        return 0.0

    monkeypatch.setattr(peer_genai, "run_builder", builder)
    data = entry / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:100])              # truncated
    said = []
    assert peer_genai.cached_genai(TINY, "float32", source=tmp_path / "hf",
                                   log=said.append) == entry
    assert made == ["float32"] and any("damaged" in s for s in said)
    assert data.read_bytes() == (good / "model.onnx.data").read_bytes()


def test_converted_checkpoint_measures_its_source(genai, in_cache, tmp_path):
    """MODEL converted from a Hugging Face checkpoint: with --peer-source the peer is built from
    that checkpoint, and a length beyond its max_position_embeddings is skipped with why."""
    from infini_trt.export.convert.hf import convert_hf

    hf_source(TINY, tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "ckpt", segment_len=N)
    settings = BenchSettings(lengths=(N, 4 * N), decode_tokens=2, isolate=False, threads=1,
                             calibrate_s=0.1, rounds=0, peer_source=str(tmp_path / "hf"))
    report = run_bench(tmp_path / "ckpt", ["onnxruntime-genai"], settings, log=lambda s: None)
    (peer,) = report["subjects"]
    assert peer["status"] == "ok", peer["reason"]
    source = json.loads((Path(peer["path"]) / "manifest.json").read_text())["source"]
    assert "files_sha256" in source and "seed" not in source
    short, long = peer["points"]
    assert short["decode_tokens_per_s"] > 0
    assert f"context length {SOURCE_POSITIONS}" in long["skipped"]


def test_peer_source_of_another_shape_is_refused(genai, exported, in_cache, tmp_path):
    _, out = exported(TINY)
    hf_source(TINY.replace(ffn_dim=96), tmp_path / "hf")
    settings = BenchSettings(lengths=(N,), isolate=False, threads=1, calibrate_s=0.1,
                             peer_source=str(tmp_path / "hf"))
    with pytest.raises(InputError, match="ffn_dim 96 .MODEL: 176."):
        run_bench(out, ["onnxruntime-genai"], settings, log=lambda s: None)
    with pytest.raises(InputError, match="add them to --peers"):
        run_bench(out, ["onnxruntime"], settings, log=lambda s: None)
    from click.testing import CliRunner

    from infini_trt.runtime.cli import main

    result = CliRunner().invoke(main, ["bench", str(out), "--backends", "none", "--peers",
                                       "onnxruntime-genai", "--peer-source", str(tmp_path / "hf"),
                                       "--lengths", "32", "--no-isolate"])
    assert result.exit_code == 1 and "is not the shape of MODEL" in result.output
    assert "Traceback" not in result.output


def test_builder_failure_is_one_line_with_its_log(genai, tmp_path):
    from infini_trt.runtime.peer_genai import BuilderError, run_builder

    (tmp_path / "hf").mkdir()                                   # no config.json
    with pytest.raises(BuilderError) as caught:
        run_builder(tmp_path / "hf", tmp_path / "out", "float32", tmp_path / "b.log",
                    tmp_path / "work")
    message = str(caught.value)
    assert "\n" not in message and "model builder failed" in message
    assert str(tmp_path / "b.log") in message and (tmp_path / "b.log").read_text()


def test_peer_that_cannot_run_is_skipped_with_why(exported, monkeypatch):
    """Not installed: the install command; batch > 1: why it runs at batch 1 only."""
    from infini_trt.runtime.bench_subjects import resolve

    _, out = exported(TINY)
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)     # import fails
    subject = resolve("onnxruntime-genai:int4", out, lambda s: None, context=N)
    assert subject.status == "skipped" and 'pip install "infini-trt[peers]"' in subject.reason
    subject = resolve("onnxruntime-genai", out, lambda s: None, batch=2, context=N)
    assert subject.status == "skipped" and "batch 1" in subject.reason
