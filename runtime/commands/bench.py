"""`bench`: speed, memory and scaling on every backend, beside the peers."""
from __future__ import annotations

import json

import click

from infini_trt.export.quantize import METHODS as QUANTIZE_METHODS

from ..backends import bench_backends
from .options import OUTPUT_FILE, prompt_graph_option


def _names(text: str) -> list[str]:
    return [] if text.strip().lower() in ("", "none") else [t.strip() for t in text.split(",")]


@click.command(short_help="Speed and memory against context length, beside the peers.")
@click.argument("model", type=click.Path())
@click.option("--backends",
              default="torch,onnxruntime,onnxruntime:int8,onnxruntime:int8-rows,"
                      "onnxruntime:int4,tensorrt",
              help=f"Comma-separated: {', '.join(bench_backends(QUANTIZE_METHODS))}. One "
                   "that cannot run here is skipped with the reason.")
@click.option("--peers", default="infini-transformer-pytorch,full-attention",
              help="Comma-separated peers at the same shape, or 'none': "
                   "infini-transformer-pytorch (lucidrains, eager), full-attention (the "
                   "quadratic KV-cache baseline), onnxruntime-genai and "
                   "onnxruntime-genai:int4 (a Llama exported by onnxruntime-genai's model "
                   "builder, fp32 or int4, run by its Generator at batch 1; pip install "
                   "\"infini-trt[peers]\").")
@click.option("--peer-source", type=click.Path(exists=True, file_okay=False), default=None,
              help="The Hugging Face checkpoint MODEL was converted from (convert --from hf): "
                   "the onnxruntime-genai peers run it instead of random weights of MODEL's "
                   "shape (its shape is checked against MODEL's).")
@click.option("--lengths", default="4K,16K,64K",
              help="Context lengths to prefill (4096, 4K, 1M; K = 1024).")
@click.option("--batch", default=1, type=click.IntRange(1), help="Sequences per call.")
@click.option("--decode-tokens", default=64, type=click.IntRange(1),
              help="Tokens decoded per sequence after each prefill.")
@click.option("--threads", default=None, type=click.IntRange(1),
              help="CPU threads for PyTorch and ONNX Runtime [default: all cores].")
@click.option("--budget", default=600.0, type=click.FloatRange(min=1),
              help="Skip a length whose prefill is estimated to take longer (seconds).")
@click.option("--seed", default=0, help="Seed of the random prompts (and peers' weights).")
@click.option("--calibrate", default=1.0, type=click.FloatRange(min=0.01),
              help="Seconds for each measurement of the machine (matmul rates, bandwidth; "
                   "each grows its problem from small to fit, bf16 only where the CPU has "
                   "instructions for it).")
@click.option("--rounds", default=5, type=click.IntRange(0),
              help="Rounds (at least; as many as fit in 10 s) in alternation after the "
                   "sequential runs, over this model's backends and the onnxruntime-genai "
                   "peers (open together) and the lengths, each with an fp32 matmul of the "
                   "machine: per backend and length --round-segments segments and "
                   "--round-decode-tokens tokens from the state its prompt left (the peers: "
                   "their prompts read again, then rewound to), and from an empty context "
                   "(length 0: each segment a one-segment prompt), so that drift of a busy "
                   "machine hits every backend and length alike (0: none).")
@click.option("--round-segments", default=4, type=click.IntRange(1),
              help="Segments prefilled per length in each round.")
@click.option("--round-decode-tokens", default=16, type=click.IntRange(1),
              help="Tokens decoded per length in each round, from a segment position "
                   "that changes with the round (a token reads the cache before it).")
@click.option("--isolate/--no-isolate", default=True,
              help="Run each subject in a fresh process, so that its peak RSS is its own.")
@click.option("--json", "json_file", type=OUTPUT_FILE, default=None,
              help="Write every figure as JSON.")
@click.option("--plot", "plot_file", type=OUTPUT_FILE, default=None,
              help="Write a PNG: throughput and memory against length (log x).")
@prompt_graph_option
def bench(model: str, backends: str, peers: str, peer_source: str | None, lengths: str,
          batch: int, decode_tokens: int,
          threads: int | None, budget: float, seed: int, calibrate: float, rounds: int,
          round_segments: int, round_decode_tokens: int, isolate: bool, json_file: str | None,
          plot_file: str | None, prompt_graph: str | None) -> None:
    """Prefill tokens/s, segment latency p50/p95/p99, time to first token, decode tokens/s
    and peak RSS of MODEL on each backend and of its peers, against context length.

    MODEL is a native checkpoint or an export directory (a checkpoint is exported for
    onnxruntime with its CPU graphs: opset 23 and --decode-attention gqa; for tensorrt with
    the portable ones; each export cached). Figures are set against the
    machine's fp32 matmul rate and memory bandwidth, measured in the same run, and against
    PyTorch eager; the report names the CPU and its instruction sets. Every option is checked
    before anything is measured."""
    from infini_trt.export.files import atomic_file
    from infini_trt.runtime.bench import BenchSettings, run_bench
    from infini_trt.runtime.bench_report import plot, table
    from infini_trt.runtime.lengths import parse_lengths

    settings = BenchSettings(tuple(parse_lengths(lengths)), batch, decode_tokens, seed,
                             threads, budget, isolate, calibrate, rounds, round_segments,
                             round_decode_tokens, peer_source=peer_source,
                             prompt_graph=prompt_graph or "auto")
    report = run_bench(model, _names(backends) + _names(peers), settings, log=click.echo)
    click.echo(table(report))
    if json_file:
        with atomic_file(json_file) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {json_file}")
    if plot_file:
        with atomic_file(plot_file) as tmp:
            plot(report, tmp)
        click.echo(f"wrote {plot_file}")


COMMANDS = [bench]
