"""`bench`: the FLOP and byte formulas against counted values, the peers against their own
definitions, and a short run of the whole benchmark (tiny preset, short lengths)."""
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import assert_close, random_model
from infini_trt.export import InfiniLM, init_weights, preset
from infini_trt.export.errors import InfiniTrtError
from infini_trt.export.model import apply_rope, expand_kv, rope_tables
from infini_trt.runtime import roofline
from infini_trt.runtime.baselines import FullAttentionRunner, LucidrainsRunner
from infini_trt.runtime.bench import BenchSettings, run_bench
from infini_trt.runtime.lengths import parse_length
from infini_trt.runtime.bench_measure import PeakMemory
from infini_trt.runtime.bench_report import table
from infini_trt.runtime.kv_cache import empty_caches
from infini_trt.runtime.cli import main

TINY = preset("tiny")
N = TINY.segment_len


def counted_flops(fn) -> int:
    """Matmul FLOPs torch counts while fn runs (SDPA through its math path, so counted)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as c:
        fn()
    return c.get_total_flops()


@pytest.mark.parametrize("cfg", [TINY, TINY.replace(update_rule="delta"),
                                 TINY.replace(n_kv_heads=4)], ids=["gqa-linear", "delta", "mha"])
def test_segment_flops_equal_counted(cfg):
    model = init_weights(InfiniLM(cfg), 0).eval()
    batch, s = 2, 20
    memory, norm = model.init_state(batch)
    ids = torch.randint(0, cfg.vocab_size, (batch, s))
    got = counted_flops(lambda: model.step(ids, memory, norm))
    assert got == batch * roofline.segment_flops(cfg, s, dense=True)


def test_causal_pairs_count_the_mask():
    for start, length in [(0, 1), (0, 32), (100, 7), (5, 1)]:
        keys = torch.arange(start + length)
        mask = keys[None, :] <= (start + torch.arange(length))[:, None]
        assert roofline.causal_pairs(start, length) == int(mask.sum())


def test_prefill_flops_sum_of_chunks():
    cfg = TINY
    linear = 2 * roofline.matmul_params(cfg) + roofline.memory_flops_per_token(cfg)
    for tokens in (N, 5 * N, 3 * N + 7):
        chunks = [min(N, tokens - i) for i in range(0, tokens, N)]
        want = sum(c * linear + roofline.attention_flops(cfg, c * (c + 1) / 2) for c in chunks)
        head = 2 * cfg.d_model * cfg.vocab_size        # logits of the last token only
        assert roofline.prefill_flops(cfg, tokens) == pytest.approx(want - (tokens - 1) * head)
    # full attention: every token attends to all earlier ones, no memory terms
    want = 1000 * 2 * roofline.matmul_params(cfg) + roofline.attention_flops(cfg, 1000 * 1001 / 2)
    assert roofline.prefill_flops(cfg, 1000, full_attention=True) == pytest.approx(
        want - 999 * head)


def test_full_attention_flops_equal_counted():
    cfg = TINY
    runner = FullAttentionRunner(init_weights(InfiniLM(cfg), 0), capacity=3 * N)
    runner.reset(1)
    runner.step(np.zeros((1, N), np.int64))
    s = 9
    got = counted_flops(lambda: runner.step(np.zeros((1, s), np.int64)))
    # a dense kernel computes all s x (N + s) scores of the chunk
    want = s * 2 * roofline.matmul_params(cfg) + roofline.attention_flops(cfg, s * (N + s))
    assert got == want


def test_matmul_params_and_decode_bytes_count_the_weights():
    model = InfiniLM(TINY)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert roofline.matmul_params(TINY) == linear
    moved = roofline.decode_bytes_per_token(TINY, batch=4, bytes_per_weight=1, cache_len=N)
    assert moved["weights"] == linear / 4
    k_cache, _ = empty_caches(TINY, 1, torch.float32)
    memory, norm = model.init_state(1)
    assert moved["cache"] == 2 * k_cache.numel() * 4
    assert moved["state"] == (memory.numel() + norm.numel()) * 4
    assert moved["total"] == moved["weights"] + moved["cache"] + moved["state"]


def full_attention_reference(model, ids):
    """Causal attention over the whole sequence at once, RoPE at absolute positions."""
    cfg = model.cfg
    x = model.embed(ids)
    cos, sin = rope_tables(0, ids.shape[1], cfg.head_dim, cfg.rope_theta, cfg.rope_style,
                           x.dtype, x.device)
    for block in model.layers:
        q, k, v = block.attn.project(block.attn_norm(x))
        q, k = apply_rope(q, cos, sin, cfg.rope_style), apply_rope(k, cos, sin, cfg.rope_style)
        a = F.scaled_dot_product_attention(q, expand_kv(k, cfg.group_size),
                                           expand_kv(v, cfg.group_size), is_causal=True)
        x = x + block.attn.o_proj(a.transpose(1, 2).flatten(2))
        x = x + block.mlp(block.mlp_norm(x))
    return model.lm_head(model.final_norm(x))


def test_full_attention_baseline_prefill_and_decode_equal_one_pass():
    from infini_trt.runtime.session import Session

    model = random_model(TINY, seed=3)
    tokens = np.random.default_rng(0).integers(0, 256, (2, 2 * N + 5 + 6))
    with torch.no_grad():
        want = full_attention_reference(model, torch.from_numpy(tokens))
    runner = FullAttentionRunner(model, capacity=tokens.shape[1])
    session = Session(runner, 2)
    got = [session.feed(list(tokens[:, :2 * N + 5]), progress=False)]
    for i in range(2 * N + 5, tokens.shape[1] - 1):
        got.append(session.decode(tokens[:, i]))
    assert_close(want[:, 2 * N + 4:-1], np.stack(got, 1), 1e-6)   # float32 logits


def test_lucidrains_runner_follows_its_model():
    """Its segment loop, then token-by-token decoding with its K/V cache, give the logits of
    its own forward over the segment."""
    pytest.importorskip("infini_transformer_pytorch")
    runner = LucidrainsRunner(TINY, seed=1)
    tokens = np.random.default_rng(2).integers(0, 256, (1, 2 * N))
    runner.reset(1)
    runner.step(tokens[:, :N])
    memories = runner.memories
    logits, position = [], np.zeros(1, np.int64)
    for i in range(N, 2 * N):
        logits.append(runner.extend(tokens[:, i:i + 1], position, np.ones(1, np.int64))[:, 0])
        position += 1
    runner.fold(position == N)
    with torch.no_grad():
        want, _, _ = runner.model(torch.from_numpy(tokens[:, N:]), past_memories=memories,
                                  return_new_memories=True)
    assert_close(want, np.stack(logits, 1), 1e-5)
    assert runner.memories is not memories and runner.cached_kv is None


def test_peak_memory_sees_an_allocation():
    meter = PeakMemory()
    meter.reset()
    before = meter.peak()
    block = torch.ones(64 << 20, dtype=torch.uint8)          # 64 MiB, touched
    assert meter.peak() >= before + (60 << 20)
    del block


def test_parse_length():
    assert [parse_length(x) for x in ("4K", "16k", "1M", "1000")] == [4096, 16384, 1 << 20, 1000]
    for bad in ("4X", "0", "", "-1K"):
        with pytest.raises(InfiniTrtError):
            parse_length(bad)


@pytest.fixture(scope="module")
def short_run(exported, tmp_path_factory):
    ckpt, out = exported(TINY)
    subjects = ["torch", "onnxruntime", "onnxruntime:int8", "onnxruntime:int8-rows",
                "tensorrt", "infini-transformer-pytorch", "full-attention"]
    settings = BenchSettings(lengths=(2 * N, 4 * N + 5), batch=2, decode_tokens=3,
                             isolate=False, threads=1, calibrate_s=0.1, rounds=1,
                             rounds_min_s=0.0)
    with pytest.MonkeyPatch.context() as mp:                  # the int8 copy goes here
        mp.setenv("INFINI_TRT_CACHE", str(tmp_path_factory.mktemp("cache")))
        return run_bench(out, subjects, settings, log=lambda s: None)


def test_bench_measures_every_subject_or_says_why(short_run):
    report = short_run
    json.dumps(report)                                        # JSON-able as it is
    names = [s["name"] for s in report["subjects"]]
    assert names[:4] == ["torch", "onnxruntime", "onnxruntime:int8", "onnxruntime:int8-rows"]
    trt = next(s for s in report["subjects"] if s["name"] == "tensorrt")
    if not torch.cuda.is_available():
        assert trt["status"] == "skipped" and "GPU" in trt["reason"]
    limits = report["limits"]
    assert limits["matmul_fp32_flops_per_s"] > 1e9
    assert limits["matmul_fp32_flops_per_s"] == max(limits["start"]["matmul_fp32_flops_per_s"],
                                                    limits["end"]["matmul_fp32_flops_per_s"])
    assert report["limits"]["memory_read_bytes_per_s"] > 1e8
    for subject in report["subjects"]:
        if subject["status"] != "ok":
            continue
        assert [p["length"] for p in subject["points"]] == [2 * N, 4 * N + 5]
        for p in subject["points"]:
            assert p["prefill_tokens_per_s"] > 0 and p["decode_tokens_per_s"] > 0
            assert p["prefill_tokens_per_s_p50"] > 0 and p["decode_tokens_per_s_p50"] > 0
            assert p["decode_tokens"] == 2 * 3
            assert p["ttft_s"] >= p["prefill_s"] > 0
            lat = p["segment_latency_ms"]
            assert lat["count"] >= 2 and lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
            assert p["inter_token_latency_ms"]["count"] == 3
            assert p["peak_rss_mb"] > 50
            assert 0 < p["prefill_efficiency"] and 0 < p["decode_bandwidth_use"]
            assert p["vs_torch"]["prefill"] > 0
    torch_points = report["subjects"][0]["points"]
    assert all(p["vs_torch"] == {"prefill": 1.0, "decode": 1.0} for p in torch_points)
    for int8, method in zip(report["subjects"][2:4], ("int8", "int8-rows")):
        assert int8["precision"] == method and f"({method})" in int8["label"]
        assert int8["points"][0]["decode_bytes_per_token"]["weights"] == \
            roofline.matmul_params(TINY) / 2


def test_bench_table_and_plot(short_run, tmp_path):
    from infini_trt.runtime.cpu import cpu_features, cpu_summary

    text = table(short_run)
    assert "prefill tok/s" in text and "onnxruntime:int8" in text
    assert f"CPU: {cpu_summary()}" in text                   # the model and its features
    assert short_run["machine"]["cpu_features"] == cpu_features()
    assert "tensorrt: skipped" in text or torch.cuda.is_available()
    pytest.importorskip("matplotlib")
    from infini_trt.runtime.bench_report import plot

    plot(short_run, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_budget_skips_a_length(exported):
    ckpt, _ = exported(TINY)
    settings = BenchSettings(lengths=(N, 64 * N), decode_tokens=1, isolate=False, threads=1,
                             budget_s=1e-6, calibrate_s=0.1)
    report = run_bench(ckpt, ["full-attention"], settings, log=lambda s: None)
    points = report["subjects"][0]["points"]
    assert all("budget" in p["skipped"] for p in points)


def test_bench_cli(exported, tmp_path):
    _, out = exported(TINY)
    result = CliRunner().invoke(main, [
        "bench", str(out), "--backends", "onnxruntime", "--peers", "none", "--lengths", "64",
        "--decode-tokens", "2", "--threads", "1", "--no-isolate", "--calibrate", "0.1",
        "--rounds", "0", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["subjects"][0]["points"][0]["length"] == 64
    bad = CliRunner().invoke(main, ["bench", str(out), "--backends", "onnx", "--peers", "none",
                                    "--no-isolate"])
    assert bad.exit_code == 1 and "unknown backend 'onnx'" in bad.output
    assert "Traceback" not in bad.output


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_isolated_worker_dies_with_its_parent():
    """A bench killed with SIGTERM must not leave its worker measuring on alone."""
    import signal

    from helpers import death_signal
    from infini_trt.runtime.isolate import run_isolated as _isolated

    assert death_signal() == 0                            # this process: not set
    assert _isolated(death_signal) == signal.SIGTERM


def _sleep(seconds):
    import time

    time.sleep(seconds)


def test_interrupted_isolated_run_leaves_no_pool_thread():
    """Ctrl-C while the worker runs: the worker is killed and the pool's manager thread has
    ended before run_isolated re-raises, so the interpreter's exit hook finds no pipe being
    closed under it (the race printed a traceback after a Ctrl-C of bench)."""
    import signal
    import threading

    from infini_trt.runtime.isolate import run_isolated as _isolated

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    def managers():                         # other tests' pools may be alive: only new ones
        return {t for t in threading.enumerate() if "ExecutorManager" in type(t).__name__}

    before = managers()
    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 3.0)           # the worker is running by then
    try:
        with pytest.raises(KeyboardInterrupt):
            _isolated(_sleep, 60)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    left = managers() - before
    assert not left, left


def test_bench_isolated_subject(exported):
    """Each subject in its own process: the report comes back the same way."""
    ckpt, _ = exported(TINY)
    settings = BenchSettings(lengths=(N,), decode_tokens=2, threads=1, calibrate_s=0.1)
    report = run_bench(ckpt, ["full-attention"], settings, log=lambda s: None)
    point = report["subjects"][0]["points"][0]
    assert report["subjects"][0]["status"] == "ok" and point["decode_tokens_per_s"] > 0


def test_measure_keeps_the_state_its_prompt_left(exported):
    """What `interleaved` starts from: the state after the prompt (float64 reference) and the
    first greedy token; a prompt that ends inside a segment keeps nothing."""
    from infini_trt.export import load_checkpoint
    from infini_trt.runtime.bench_measure import measure
    from infini_trt.runtime.runners import open_runner

    ckpt, out = exported(TINY)
    states = {}
    with open_runner(out, "onnxruntime") as runner:
        measure(runner, 2 * N, 2, 3, seed=5, states=states)
        measure(runner, 2 * N + 3, 2, 3, seed=6, states=states)
    assert list(states) == [2 * N]
    memory, norm, token = states[2 * N]
    prompts = np.random.default_rng(5).integers(0, TINY.vocab_size, (2, 2 * N))
    with torch.no_grad():
        logits, want_memory, want_norm = load_checkpoint(ckpt, dtype=torch.float64)(
            torch.from_numpy(prompts))
    assert_close(want_memory, memory, 1e-5, what="memory")
    assert_close(want_norm, norm, 1e-5, what="norm")
    assert (token == logits[:, -1].argmax(-1)).all()


def test_rounds_read_length_0_from_an_empty_context(exported):
    """Length 0 of the rounds (bench_measure.empty_context): each segment it reads, the warm
    one and the timed ones, starts from the empty context (z = 0: nothing read), while a
    prompt's length continues from the state that prompt left."""
    from infini_trt.runtime.bench_measure import empty_context, interleaved, measure
    from infini_trt.runtime.runners import open_runner

    _, out = exported(TINY)
    with open_runner(out, "onnxruntime") as runner:
        states = {}
        measure(runner, N, 1, 1, seed=1, states=states)
        states[0] = empty_context(runner, 1, seed=2, room=0)
        assert not states[0].norm.any() and not states[0].memory.any()
        advance, starts = runner.advance, []

        def recording(ids):
            starts.append(bool(runner.state()[1].any()))           # z: anything read?
            return advance(ids)

        runner.advance = recording
        result = interleaved({"ort": runner}, {"ort": states}, rounds=2, segments=3,
                             decode_tokens=2, seed=0, min_seconds=0.0, matmul_s=0.01)
    visits = [starts[i:i + 4] for i in range(0, len(starts), 4)]   # a warm + 3 timed each
    assert len(starts) == 2 * 2 * 4
    assert sorted(visits) == [[False] * 4] * 2 + [[True] * 4] * 2
    points = result["points"]["ort"]
    assert [p["length"] for p in points] == [0, N]
    assert all(p["segment_ms"]["count"] == 2 * 3 and p["decode_token_ms"]["count"] == 2 * 2
               for p in points)


def test_bench_rounds_in_alternation(exported):
    """Every (subject, length) whose prompt ended on a segment boundary, and the empty
    context (length 0), is measured in each round: the segments and decoded tokens asked for
    (a fold among them), decoding from a position that changes with the round, ratios to the
    first length and to torch; the peers have no restorable state and are left out."""
    ckpt, out = exported(TINY)
    settings = BenchSettings(lengths=(N, 2 * N, 3 * N + 1), batch=2, decode_tokens=2,
                             isolate=False, threads=1, calibrate_s=0.1, rounds=3,
                             round_segments=2, round_decode_tokens=N + 2, rounds_min_s=0.0)
    report = run_bench(out, ["torch", "onnxruntime", "full-attention"], settings,
                       log=lambda s: None)
    alternation = report["alternation"]
    assert alternation["rounds"] == 3 and alternation["segments"] == 2
    positions = alternation["decode_positions"]                # spread over the segment
    assert positions[0] == 0 and len(set(positions)) == 3 and max(positions) < N
    rate = alternation["matmul_fp32_flops_per_s"]
    assert rate > 1e9
    torch_rounds, ort_rounds, full = (s["interleaved"] for s in report["subjects"])
    assert full is None
    for rounds in (torch_rounds, ort_rounds):
        assert [p["length"] for p in rounds] == [0, N, 2 * N]
        for p in rounds:
            assert p["segment_ms"]["count"] == 3 * 2
            assert p["decode_token_ms"]["count"] == 3 * (N + 2)
            assert p["prefill_tokens_per_s"] > 0 and p["decode_tokens_per_s"] > 0
            assert p["prefill_efficiency"] == pytest.approx(
                2 * roofline.prefill_flops(TINY, N) / (p["segment_ms"]["p50"] / 1e3) / rate)
        assert rounds[0]["vs_first"] == {"prefill": 1.0, "decode": 1.0}
    assert all(p["vs_torch"] == {"prefill": 1.0, "decode": 1.0} for p in torch_rounds)
    for p, base in zip(ort_rounds, torch_rounds):
        assert p["vs_torch"]["prefill"] == pytest.approx(
            p["prefill_tokens_per_s"] / base["prefill_tokens_per_s"])
    text = table(report)
    assert "in alternation (3 rounds" in text


def test_bench_without_rounds(exported):
    _, out = exported(TINY)
    settings = BenchSettings(lengths=(N, 2 * N), decode_tokens=1, isolate=False, threads=1,
                             calibrate_s=0.1, rounds=0)
    report = run_bench(out, ["onnxruntime"], settings, log=lambda s: None)
    assert report["subjects"][0]["interleaved"] is None and report["alternation"] is None
    assert "in alternation" not in table(report)
