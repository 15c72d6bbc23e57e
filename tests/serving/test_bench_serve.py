"""`infini-trt bench-serve`: a short run on the bundled model gives every figure, finite and
positive, for the token counts it asked, and leaves no server behind; bad options are one line
before anything starts; and `ignore_eos`, which its requests send, runs past the end token."""
import json
import math

import pytest
from click.testing import CliRunner

from infini_trt.runtime.cli import main

pytest.importorskip("httpx", reason="the serve extra (httpx) is not installed")


def positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_a_short_run_reports_every_figure(server, shared_cache, tmp_path, monkeypatch):
    """(`server` makes the bundled export in the shared cache, which the child server uses.)"""
    import psutil

    from infini_trt.runtime.commands.serve import serve

    monkeypatch.setenv("INFINI_TRT_CACHE", str(shared_cache))
    out = tmp_path / "report.json"
    before = {p.pid for p in psutil.Process().children(recursive=True)}   # other tests' servers
    result = CliRunner().invoke(main, [
        "bench-serve", "--concurrency", "1,2", "--prompt-tokens", "8", "--max-tokens", "5",
        "--requests-per-stream", "2", "--document-tokens", "200", "--question-tokens", "4",
        "--document-runs", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    left = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert left == set()                                          # the server is stopped
    report = json.loads(out.read_text())
    assert report["model_name"] == "passkey" and report["max_batch"] == 2
    assert [level["concurrency"] for level in report["levels"]] == [1, 2]
    for level in report["levels"]:
        assert level["requests"] == 2 * level["concurrency"]
        assert level["completion_tokens"] == 5 * level["requests"] == level["text_chunks"]
        assert level["ttft_s"]["source"] == "client"            # a chunk per word
        for value in (level["wall_s"], level["tokens_per_s"], level["ttft_s"]["p50"],
                      level["ttft_s"]["p99"], level["itl_s"]["p50"]):
            assert positive(value), level
        assert level["ttft_s"]["p50"] <= level["ttft_s"]["p99"]
    doc = report["document"]
    has_prefix_cache = any(p.name == "prefix_cache_bytes" for p in serve.params)
    rows = ["miss", "hit"] + (["prefix_cache"] if has_prefix_cache else [])
    assert [key for key in ("miss", "hit", "prefix_cache") if key in doc] == rows
    for key in rows:
        assert len(doc[key]["ttft_s"]) == 1 and positive(doc[key]["p50_s"])
    assert set(doc["miss"]["cached_tokens"]) <= {0, None}
    assert positive(doc["miss_over_hit"]) and positive(doc["context_create_s"])
    for text in ("| streams |", "| 1 | 2 | 10 |", "| 2 | 4 | 20 |", "200-token document",
                 "hit against miss"):
        assert text in result.stdout, text


def test_fit_batch_gives_each_level_a_server_of_its_streams(server, shared_cache, tmp_path,
                                                             monkeypatch):
    monkeypatch.setenv("INFINI_TRT_CACHE", str(shared_cache))
    out = tmp_path / "report.json"
    result = CliRunner().invoke(main, [
        "bench-serve", "--fit-batch", "--concurrency", "3", "--max-tokens", "3",
        "--requests-per-stream", "1", "--document-tokens", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["max_batch"] is None and "document" not in report
    assert [(level["concurrency"], level["max_batch"], level["completion_tokens"])
            for level in report["levels"]] == [(3, 3, 9)]
    assert "| streams | rows |" in result.stdout and "--max-batch its streams" in result.stdout


@pytest.mark.parametrize("args, message, code", [
    pytest.param(["--concurrency", "1,0"], "is not a list of numbers of streams", 2,
                 id="zero-streams"),
    pytest.param(["--concurrency", "4,x"], "is not a list of numbers of streams", 2,
                 id="not-a-number"),
    pytest.param(["--document-tokens", "12X"], "is not a number of tokens", 2,
                 id="bad-document"),
    pytest.param(["--max-tokens", "0"], "--max-tokens", 2, id="no-tokens"),
    pytest.param(["--backend", "nope"], "--backend", 2, id="unknown-backend"),
    pytest.param(["/no/such/model"], "no such model: /no/such/model", 1, id="no-model"),
    pytest.param(["--fit-batch", "--max-batch", "4"], "give it without --max-batch", 1,
                 id="fit-and-max-batch"),
])
def test_a_bad_option_is_one_line(args, message, code):
    result = CliRunner().invoke(main, ["bench-serve", *args])
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output
    if code == 1:
        assert result.output.count("\n") == 1


def test_histogram_quantiles_as_prometheus():
    from infini_trt.runtime.serving.bench_client import histogram_delta, histogram_quantile

    buckets = [(0.1, 2.0), (0.2, 6.0), (0.4, 10.0), (math.inf, 10.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.175)    # 5th of 10: in (0.1, 0.2]
    assert histogram_quantile(0.1, buckets) == pytest.approx(0.05)
    assert histogram_quantile(1.0, buckets) == pytest.approx(0.4)
    assert histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None
    assert histogram_quantile(0.9, [(0.1, 1.0), (math.inf, 5.0)]) == 0.1  # past the last bound
    earlier = [(0.1, 2.0), (0.2, 2.0), (0.4, 2.0), (math.inf, 2.0)]
    assert histogram_delta(buckets, earlier)[-1] == (math.inf, 8.0)


def test_ignore_eos_runs_past_the_end_token(server, tokenizer, monkeypatch):
    """The bundled tokenizer has no end token: make the first greedy token one."""
    client = server.client()
    prompt = "The grass is green. The sky is"
    first = client.completions.create(model="passkey", prompt=prompt, max_tokens=1,
                                      temperature=0).choices[0].text
    monkeypatch.setattr(server.engine.tokenizer, "eos_id", tokenizer.encode(first)[0])
    stopped = client.completions.create(model="passkey", prompt=prompt, max_tokens=6,
                                        temperature=0)
    assert (stopped.choices[0].finish_reason, stopped.usage.completion_tokens) == ("stop", 1)
    for stream in (False, True):
        body = dict(model="passkey", prompt=prompt, max_tokens=6, temperature=0,
                    extra_body={"ignore_eos": True})
        if stream:
            chunks = list(client.completions.create(stream=True, **body,
                                                    stream_options={"include_usage": True}))
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            tokens = chunks[-1].usage.completion_tokens
        else:
            got = client.completions.create(**body)
            finish, tokens = got.choices[0].finish_reason, got.usage.completion_tokens
        assert (finish, tokens) == ("length", 6)
