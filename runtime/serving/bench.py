"""`infini-trt bench-serve`: the server measured as its clients see it.

The real server runs in its own process (bench_server.py) and a client (bench_client.py) sends
it greedy streamed completions of random token ids that run to `max_tokens` (ignore_eos):

- per concurrency level c: c streams at once, each sending `requests_per_stream` requests one
  after the other -> aggregate tokens/s (completion tokens / wall time of the level), time to
  first token p50/p99, and inter-token latency p50 within a stream;
- a document of D random tokens and a question: the time to first token of the whole prompt
  (a new document each time: a true miss), of the question after the document's stored context
  (POST /v1/contexts once), and, where the server has a prefix cache, of the same document sent
  again with another question.

Time to first token in the levels is from sending a request to the first SSE chunk carrying
text, inter-token latency between such chunks of one request. Where the stream sends fewer
chunks than tokens (it holds text back: a random model's ids decode as U+FFFD, which the
server's TextStream keeps, up to 6 tokens, until it is sure) the first chunk may come some
tokens late: the time to first token is then an upper bound, and the inter-token latency the
server's histogram (GET /metrics, interpolated within its buckets).
In the document phase it is the time to the first chunk of a max_tokens=1 request (its token,
or its last chunk: sent in the same engine step), whatever the model.
"""
from __future__ import annotations

import contextlib
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from infini_trt.export.errors import InputError, MissingDependencyError

from .bench_client import (ITL_METRIC, TTFT_METRIC, Timing, completion_body, histogram_delta,
                           histogram_quantile, post_json, run_streams, scrape_histograms)
from ..backends import BACKENDS
from .bench_server import ServerError, ServerProcess


@dataclass(frozen=True)
class ServeBenchSettings:
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    prompt_tokens: int = 32
    max_tokens: int = 64
    requests_per_stream: int = 3
    document_tokens: int = 65536           # 0: no document phase
    question_tokens: int = 16
    document_runs: int = 3                 # requests timed per row of the document phase
    backend: str = "onnxruntime"
    max_batch: int | None = None           # the server's rows; None: the largest concurrency
    seed: int = 0
    fit_batch: bool = False                # a server per level, of as many rows as streams

    def check(self) -> None:
        """InputError naming the first bad setting."""
        if not self.concurrency or min(self.concurrency) < 1:
            raise InputError("--concurrency takes numbers of streams of at least 1, e.g. "
                             "1,4,16,64")
        for name in ("prompt_tokens", "max_tokens", "requests_per_stream", "question_tokens",
                     "document_runs"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1")
        if self.document_tokens < 0:
            raise InputError("--document-tokens must be at least 0 (0: no document phase)")
        if self.max_batch is not None and self.max_batch < 1:
            raise InputError("--max-batch must be at least 1")
        if self.backend not in BACKENDS:
            raise InputError(f"--backend must be one of {', '.join(BACKENDS)}")

        if self.fit_batch and self.max_batch is not None:
            raise InputError("--fit-batch sets the server's rows for each level: give it "
                             "without --max-batch")

    @property
    def rows(self) -> int | None:
        """The server's rows (None with fit_batch: each level's streams)."""
        return None if self.fit_batch else self.max_batch or max(self.concurrency)


def machine() -> dict:
    """The CPU (name, family/model, instruction sets), its cores and the load on them."""
    from ..cpu import cpu_features, cpu_summary

    ids = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("cpu family", "model") and key.strip() not in ids:
                    ids[key.strip()] = value.strip()
                if len(ids) == 2:
                    break
    except OSError:
        pass
    return {"cpu": cpu_summary(), "name": cpu_features()["model"],
            "family": ids.get("cpu family"), "model": ids.get("model"),
            "cores": os.cpu_count(), "machine": platform.machine(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def _require_client() -> None:
    from . import require_extra

    require_extra()
    import importlib.util

    if importlib.util.find_spec("httpx") is None:
        raise MissingDependencyError("httpx", "infini-trt bench-serve",
                                     'pip install "infini-trt[serve]"')


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run_serve_bench(model: str | Path | None, settings: ServeBenchSettings,
                    log: Callable[[str], None] | None = None) -> dict:
    """Start `infini-trt serve MODEL` (the bundled model when None), measure it, stop it ->
    the report (every figure; bench_report.table prints it)."""
    from infini_trt.export.manifest import model_config

    from ..models import bundled_model

    log = log or (lambda text: None)
    settings.check()
    _require_client()
    path = Path(model) if model is not None else bundled_model()
    if not path.exists():
        raise InputError(f"no such model: {path}")
    cfg = model_config(path)                           # a bad checkpoint fails here, at once
    report = {"model": str(path.resolve()), "model_name": path.resolve().name,
              "backend": settings.backend, "max_batch": settings.rows,
              "settings": asdict(settings), "machine": machine(),
              "vocab_size": cfg.vocab_size, "segment_len": cfg.segment_len}
    rng = np.random.default_rng(settings.seed)

    def ids(n: int) -> list[int]:
        return rng.integers(0, cfg.vocab_size, size=n).tolist()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="infini-trt-bench-serve-") as store:
        @contextlib.contextmanager
        def serving(rows: int, queue: int) -> Iterator[ServerProcess]:
            """A server of `rows` rows, warmed up: a full segment through the reader and a
            piece through the K/V cache."""
            args = [str(path), "--backend", settings.backend, "--max-batch", str(rows),
                    "--max-queue", str(queue), "--max-new-tokens", str(settings.max_tokens),
                    "--context-store", store]
            log(f"starting the server: infini-trt serve {' '.join(args)}")
            report.setdefault("server_commands", []).append(
                ["infini-trt", "serve", *args[:-1], "TMPDIR"])
            with ServerProcess(args, log=log) as server:
                log("warming up")
                run_streams(server.url, [[completion_body(
                    ids(cfg.segment_len + settings.prompt_tokens),
                    min(settings.max_tokens, 8))]])
                yield server

        if settings.fit_batch:                    # a server per level, as many rows as streams
            report["levels"] = []
            for c in settings.concurrency:
                with serving(c, c) as server:
                    report["levels"].append(_level(server, c, settings, ids, log))
            if settings.document_tokens:
                with serving(1, 1) as server:
                    report["document"] = _document(server, settings, ids, log)
        else:
            with serving(settings.rows, max(settings.concurrency)) as server:
                report["levels"] = [_level(server, c, settings, ids, log)
                                    for c in settings.concurrency]
                if settings.document_tokens:
                    report["document"] = _document(server, settings, ids, log)
    report["machine"]["load_average_after"] = (list(os.getloadavg())
                                               if hasattr(os, "getloadavg") else None)
    report["seconds"] = time.perf_counter() - started
    report["python"] = sys.version.split()[0]
    return report


def _level(server: ServerProcess, streams: int, settings: ServeBenchSettings,
           ids: Callable[[int], list[int]], log: Callable[[str], None]) -> dict:
    """`streams` streams at once, each sending its requests back to back."""
    k, m = settings.requests_per_stream, settings.max_tokens
    bodies = [[completion_body(ids(settings.prompt_tokens), m) for _ in range(k)]
              for _ in range(streams)]
    log(f"{streams} stream(s) x {k} request(s) of {settings.prompt_tokens} + {m} tokens")
    before = scrape_histograms(server.url)
    server_cpu, client_cpu = server.cpu_seconds(), time.process_time()
    results, wall = run_streams(server.url, bodies)
    client_cpu, server_after = time.process_time() - client_cpu, server.cpu_seconds()
    server_cpu = None if None in (server_cpu, server_after) else server_after - server_cpu
    after = scrape_histograms(server.url)
    server.check_alive()
    timings = [t for stream in results for t in stream]
    for t in timings:
        if t.completion_tokens != m or t.finish_reason != "length":
            raise ServerError(f"a request ended after {t.completion_tokens} tokens (finish "
                              f"reason {t.finish_reason!r}), not the {m} it asked for")
    tokens = sum(t.completion_tokens for t in timings)
    hist = {name: histogram_delta(after.get(name, []), before.get(name))
            for name in (TTFT_METRIC, ITL_METRIC)}
    on_server = {"ttft_p50_s": histogram_quantile(0.5, hist[TTFT_METRIC]),
                 "ttft_p99_s": histogram_quantile(0.99, hist[TTFT_METRIC]),
                 "itl_p50_s": histogram_quantile(0.5, hist[ITL_METRIC])}
    chunks = sum(len(t.token_times) for t in timings)
    per_token = chunks == tokens                 # one SSE chunk per token: the client can tell
    ttfts = [t.ttft for t in timings if t.ttft is not None]
    gaps = [g for t in timings for g in t.gaps]
    ttft = {"p50": percentile(ttfts, 50), "p99": percentile(ttfts, 99),
            "source": "client" if per_token else "client, upper bound"}
    itl = ({"p50": percentile(gaps, 50), "source": "client"} if per_token else
           {"p50": on_server["itl_p50_s"], "source": "server histogram"})
    level = {"concurrency": streams, "max_batch": server.max_batch,
             "requests": len(timings), "completion_tokens": tokens,
             "wall_s": wall, "tokens_per_s": tokens / wall, "ttft_s": ttft, "itl_s": itl,
             "text_chunks": chunks, "server_histogram": on_server,
             "client": {"ttft_first_text_chunk_s": [t.ttft for t in timings],
                        "itl_text_chunks_p50_s": percentile(gaps, 50),
                        "latency_p50_s": percentile([t.end - t.sent for t in timings], 50)},
             "server_cpu_s": server_cpu, "client_cpu_s": client_cpu}
    log(f"  {tokens} tokens in {wall:.2f} s: {tokens / wall:,.1f} tokens/s, time to first "
        f"token p50 {_ms(ttft['p50'])}" + ("" if per_token else " (at most; the stream holds "
                                            "text back)"))
    return level


def _document(server: ServerProcess, settings: ServeBenchSettings,
              ids: Callable[[int], list[int]],
              log: Callable[[str], None]) -> dict:
    """Time to first token for a question about a document: read with it (a miss), after its
    stored context (a hit), and sent again (the prefix cache)."""
    d, q, runs = settings.document_tokens, settings.question_tokens, settings.document_runs

    def first_token(body: bytes) -> Timing:
        results, _ = run_streams(server.url, [[body]])
        server.check_alive()
        return results[0][0]

    misses, document = [], None
    for r in range(runs):
        log(f"document: miss {r + 1}/{runs} ({d:,} + {q} tokens, a new document)")
        document = ids(d)
        misses.append(first_token(completion_body(document + ids(q), 1)))
        if misses[-1].cached_tokens:
            raise ServerError(f"a new document was served from the prefix cache "
                              f"({misses[-1].cached_tokens} tokens)")
    log(f"document: POST /v1/contexts ({d:,} tokens)")
    start = time.perf_counter()
    card = post_json(server.url, "/v1/contexts", {"prompt": ids(d)})
    made = time.perf_counter() - start
    hits = []
    for r in range(runs):
        log(f"document: hit {r + 1}/{runs} (context {card['id']} + {q} tokens)")
        hits.append(first_token(completion_body(ids(q), 1, card["id"])))
    again = []
    for r in range(runs):
        log(f"document: sent again {r + 1}/{runs} (the last miss's document, another question)")
        again.append(first_token(completion_body(document + ids(q), 1)))
    rows = {"miss": _row(misses), "hit": _row(hits), "prefix_cache": _row(again)}
    result = {"tokens": d, "question_tokens": q, "runs": runs, "context_create_s": made,
              "context_bytes": card.get("bytes"), **rows,
              "miss_over_hit": rows["miss"]["p50_s"] / rows["hit"]["p50_s"],
              "miss_over_prefix_cache": rows["miss"]["p50_s"] / rows["prefix_cache"]["p50_s"]}
    log(f"  miss {_ms(rows['miss']['p50_s'])}, hit {_ms(rows['hit']['p50_s'])}: "
        f"{result['miss_over_hit']:,.0f}x less")
    return result


def _row(timings: list[Timing]) -> dict:
    seconds = [t.first_chunk_s for t in timings]
    return {"ttft_s": seconds, "p50_s": percentile(seconds, 50), "min_s": min(seconds),
            "max_s": max(seconds), "cached_tokens": [t.cached_tokens for t in timings]}


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:,.1f} ms"
