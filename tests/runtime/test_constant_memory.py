"""Peak memory does not grow with the length of the input (slow: run with -m slow).

Each measurement is a fresh process (peak RSS is per process), on the tiny preset."""
import json
import subprocess
import sys

import numpy as np
import pytest

from infini_trt.export import preset

pytestmark = pytest.mark.slow


def peak_rss(command, tmp_path, tokens):
    path = tmp_path / f"ids{tokens}.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, tokens))
    out = subprocess.run([sys.executable, "-m", "infini_trt.runtime.cli", *command(path)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_run_peak_rss_at_1m_tokens_within_10_percent_of_10k(exported, tmp_path):
    _, out = exported(preset("tiny"))
    command = lambda p: ["run", str(out), "--prompt-file", str(p), "--max-new-tokens", "32",
                         "--json", "--no-progress"]
    small = peak_rss(command, tmp_path, 10_000)
    large = peak_rss(command, tmp_path, 1_000_000)
    print(f"run: 10K tokens {small['peak_rss_mb']:.0f} MiB, 1M tokens {large['peak_rss_mb']:.0f} "
          f"MiB; prefill {large['timings']['prefill_tokens_per_s']:,.0f} tokens/s")
    assert large["peak_rss_mb"] <= 1.10 * small["peak_rss_mb"]


def test_score_peak_rss_at_100k_tokens_within_10_percent_of_10k(exported, tmp_path):
    _, out = exported(preset("tiny"))
    command = lambda p: ["score", str(out), "--tokens", str(p), "--json", "--no-progress"]
    small = peak_rss(command, tmp_path, 10_000)
    large = peak_rss(command, tmp_path, 100_000)
    print(f"score: 10K tokens {small['peak_rss_mb']:.0f} MiB, 100K {large['peak_rss_mb']:.0f} MiB")
    assert large["peak_rss_mb"] <= 1.10 * small["peak_rss_mb"]
