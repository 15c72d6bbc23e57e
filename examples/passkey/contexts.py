"""The passkey task with its document read once: `infini-trt prefill` of a long passkey prompt
without its question, then `run --state` with the question, against `run` with the whole prompt.

    python examples/passkey/contexts.py OUT_DIR [--length 1M] [--model M] [--backend B]

The document is --length tokens (the prompt is that, the question and the answer). Prints the
prefill, both runs' time to first token (as `run --json` measures it: from the first prompt
token fed to the first answer token chosen, the graphs loaded) and answers, each command's
wall time (process start and graph loading included), and the context file's size after 1K
tokens and after the whole document. Every step is the command a user types.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from infini_trt.runtime.passkey import open_task

CLI = [sys.executable, "-m", "infini_trt.runtime.cli"]


def cli(*args) -> dict:
    """One command's JSON, with its wall time ("wall_s") added."""
    started = time.perf_counter()
    out = subprocess.run([*CLI, *map(str, args), "--json", "--no-progress"], check=True,
                         capture_output=True, text=True).stdout
    return {**json.loads(out), "wall_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a directory for the token files and contexts")
    parser.add_argument("--model", default=None,
                        help="checkpoint or export directory [default: the bundled model]")
    parser.add_argument("--length", default="1M", help="tokens of the prompt (K = 1024)")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--seed", type=int, default=0, help="seed of the key")
    args = parser.parse_args()
    if args.model is None:
        from infini_trt.runtime.models import bundled_model

        args.model = str(bundled_model())
    gen, lengths, _ = open_task(args.model, args.length, "middle")
    tail = len(gen.question) + gen.answer_len               # the document: exactly --length
    prompt = gen.batch(np.random.default_rng(args.seed), 1, lengths[0] + tail, 0.5)[0]
    ids, asked = prompt.ids, prompt.answer_start - len(gen.question)
    args.out.mkdir(parents=True, exist_ok=True)
    files = {"document": ids[:asked], "question": ids[asked:prompt.answer_start],
             "whole": ids[:prompt.answer_start], "first_1k": ids[:1024]}
    for name, part in files.items():
        np.save(args.out / f"{name}.npy", part)
    run = ("run", args.model, "--backend", args.backend, "--greedy", "--max-new-tokens",
           len(prompt.answer_ids))
    small = cli("prefill", args.model, "--backend", args.backend, "--prompt-file",
                args.out / "first_1k.npy", "-o", args.out / "first_1k.ctx")
    read = cli("prefill", args.model, "--backend", args.backend, "--prompt-file",
               args.out / "document.npy", "-o", args.out / "document.ctx")
    resumed = cli(*run, "--state", args.out / "document.ctx", "--prompt-file",
                  args.out / "question.npy")
    whole = cli(*run, "--prompt-file", args.out / "whole.npy")
    key = [int(t) for t in prompt.answer_ids]
    print(f"model {args.model}, {args.backend}; a passkey prompt of {ids.size:,} tokens, the key "
          f"{prompt.key} in the middle")
    print(f"prefill of the document ({read['tokens']:,} tokens): {read['seconds']:,.1f} s, "
          f"{read['tokens_per_s']:,.0f} tokens/s (the command: {read['wall_s']:,.1f} s)")
    for name, result in (("run --state (the question only)", resumed),
                         ("run (the whole prompt)", whole)):
        seq = result["sequences"][0]
        print(f"{name}: time to first token {result['timings']['time_to_first_token_s']:.4f} s,"
              f" answer {'right' if seq['token_ids'] == key else 'WRONG'} ({seq['text']!r}); "
              f"the command: {result['wall_s']:,.1f} s")
    ratio = whole["timings"]["time_to_first_token_s"] / resumed["timings"]["time_to_first_token_s"]
    print(f"time to first token: {ratio:,.0f}x less from the context")
    print(f"context file: {small['bytes']:,} bytes after {small['tokens']:,} tokens, "
          f"{read['bytes']:,} bytes after {read['tokens']:,} tokens")


if __name__ == "__main__":
    main()
