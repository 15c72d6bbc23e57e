"""Export time, side by side: `infini-trt export` of a native checkpoint against
onnxruntime-genai's model builder on a random Llama of the same shape, in alternation (the
machines here are noisy: compare the ratios of one run).

    python scripts/export_side_by_side.py CHECKPOINT [--rounds 3] [--precision float32] [--warm]

Each round runs the builder (float32 or int4, CPU, `prune_lm_head=true` as `bench --peers`
does) and then our export (`--quantize int4` for int4), each as its own process, wall time
from start to exit. Our export traces every time (INFINI_TRT_TEMPLATE_CACHE=0), as a first
export of the shape does; `--warm` lets it take the templates from the cache
(export/template_cache.py), as every later export of that shape does. Needs
`pip install "infini-trt[peers]"`. Prints one line per round and the medians last.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _timed(command: list[str], log: Path, env: dict) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                              stdin=subprocess.DEVNULL).returncode
    seconds = time.perf_counter() - t0
    if code != 0:
        sys.exit(f"failed (exit {code}): {' '.join(command)}; its output: {log}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", choices=("float32", "int4"), default="float32")
    parser.add_argument("--warm", action="store_true",
                        help="our export takes the traced templates from the cache")
    args = parser.parse_args()

    from infini_trt.export.checkpoint import read_checkpoint
    from infini_trt.runtime.peer_genai import run_builder, write_random_llama

    cfg = read_checkpoint(args.checkpoint).config
    cli = shutil.which("infini-trt") or sys.exit("infini-trt is not on PATH")
    work = Path(tempfile.mkdtemp(prefix="export-side-by-side-"))
    try:
        hf = write_random_llama(cfg, 0, 8 * cfg.segment_len, work / "hf")
        ours_command = [cli, "export", str(args.checkpoint), "-o", str(work / "ours"),
                        "--force", *(["--quantize", "int4"] if args.precision == "int4" else [])]
        theirs, ours = [], []
        for i in range(args.rounds):
            shutil.rmtree(work / "peer", ignore_errors=True)
            shutil.rmtree(work / "peer-work", ignore_errors=True)
            theirs.append(run_builder(hf, work / "peer", args.precision,
                                      work / "builder.log", work / "peer-work"))
            ours.append(_timed(ours_command, work / "export.log", {
                **os.environ, "INFINI_TRT_TEMPLATE_CACHE": "1" if args.warm else "0"}))
            print(f"round {i + 1}: builder {theirs[-1]:.1f} s, infini-trt export "
                  f"{ours[-1]:.1f} s ({ours[-1] / theirs[-1]:.2f}x)", flush=True)
        a, b = statistics.median(theirs), statistics.median(ours)
        print(f"medians ({args.precision}, {cfg.n_layers} layers, "
              f"{'warm' if args.warm else 'cold'}): builder {a:.1f} s, "
              f"infini-trt export {b:.1f} s, {b / a:.2f}x the builder's time")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
