"""An export runs and is served with ONNX Runtime and numpy alone: every command that uses an
export directory works in a process that cannot import torch (tests/without_torch.py), with
the same tokens as in-process; what needs torch says so in one line."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from infini_trt.export import preset

SCRIPT = str(Path(__file__).parents[1] / "without_torch.py")
TINY = preset("tiny")


def without_torch(*args, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env, **kw)


def blocked(code: str) -> subprocess.CompletedProcess:
    """Python `code` run after torch is blocked."""
    return subprocess.run([sys.executable, "-c", f"import runpy; runpy.run_path({SCRIPT!r}, "
                           f"run_name='blocker')['block']()\n{code}"], capture_output=True,
                          text=True, timeout=300)


def test_the_script_blocks_torch():
    probe = blocked("import torch")
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr


def test_a_bench_worker_of_onnxruntime_imports_no_torch(exported):
    """What `bench` measures of our ONNX Runtime backend (its peak RSS too) is a process
    without torch, as a deployment is."""
    _, out = exported(TINY)
    done = blocked(f"""
import sys
from infini_trt.export.manifest import read_manifest
from infini_trt.runtime.bench import BenchSettings, run_subject
from infini_trt.runtime.bench_subjects import Subject
subject, _ = run_subject(Subject("onnxruntime", "onnxruntime", {str(out)!r}),
                         read_manifest({str(out)!r}).config,
                         BenchSettings(lengths=[40], decode_tokens=3, threads=1), 1e10,
                         log=lambda s: None)
print(subject.status, subject.points[0]["decode_tokens_per_s"] > 0, "torch" in sys.modules)
""")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "True", "False"]


def test_run_score_and_contexts_need_no_torch(exported, tmp_path):
    from infini_trt.runtime import SamplingConfig, generate, open_runner

    _, out = exported(TINY)
    prompt = np.random.default_rng().integers(0, TINY.vocab_size, 2 * TINY.segment_len + 5)
    np.save(tmp_path / "prompt.npy", prompt)
    with open_runner(out, "onnxruntime") as runner:
        want = generate(runner, [prompt], SamplingConfig(max_new_tokens=6),
                        progress=False).sequences[0].token_ids
        sampled = generate(runner, [prompt], SamplingConfig(max_new_tokens=6, greedy=False,
                                                            temperature=0.9, top_k=20, seed=4),
                           progress=False).sequences[0].token_ids

    ran = without_torch("run", out, "--prompt-file", tmp_path / "prompt.npy",
                        "--max-new-tokens", 6, "--json", "--no-progress")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["sequences"][0]["token_ids"] == want
    ran = without_torch("run", out, "--prompt-file", tmp_path / "prompt.npy", "--json",
                        "--max-new-tokens", 6, "--temperature", 0.9, "--top-k", 20, "--seed", 4,
                        "--no-progress")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["sequences"][0]["token_ids"] == sampled

    np.save(tmp_path / "head.npy", prompt[:-5])
    np.save(tmp_path / "tail.npy", prompt[-5:])
    read = without_torch("prefill", out, "--prompt-file", tmp_path / "head.npy", "-o",
                         tmp_path / "head.ctx", "--no-progress")
    assert read.returncode == 0, read.stderr
    resumed = without_torch("run", out, "--state", tmp_path / "head.ctx", "--prompt-file",
                            tmp_path / "tail.npy", "--max-new-tokens", 6, "--json",
                            "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["sequences"][0]["token_ids"] == want

    np.save(tmp_path / "tokens.npy", prompt[None])
    scored = without_torch("score", out, "--tokens", tmp_path / "tokens.npy", "--json",
                           "--no-progress")
    assert scored.returncode == 0, scored.stderr
    with open_runner(out, "onnxruntime") as runner:
        from infini_trt.runtime.scoring import score

        expected = score(runner, prompt[None], progress=False).nll
    assert json.loads(scored.stdout)["nll"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("command", [["export", "{ckpt}", "-o", "{tmp}/x"],
                                     ["run", "{ckpt}", "--prompt", "a", "--backend", "torch"]],
                         ids=["export", "torch-backend"])
def test_what_needs_torch_says_so_in_one_line(exported, tmp_path, command):
    ckpt, _ = exported(TINY)
    args = [a.format(ckpt=ckpt, tmp=tmp_path) for a in command]
    done = without_torch(*args)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs the 'torch' package" in lines[0], done.stderr
    assert "infini-trt[export]" in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "x").exists()


def test_serve_needs_no_torch(shared_cache, tmp_path):
    """The bundled model's export served by a process without torch: a completion equals
    `generate` on the same prompt in this process."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    httpx = pytest.importorskip("httpx", reason="the serve extra is not installed")
    from infini_trt.runtime import SamplingConfig, bundled_model, generate, load, tokenizer_of

    env = {**os.environ, "INFINI_TRT_CACHE": str(shared_cache)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INFINI_TRT_CACHE", str(shared_cache))
        runner = load(bundled_model(), "onnxruntime", log=lambda s: None)
    tok = tokenizer_of(bundled_model())
    prompt = "The grass is green. The sky is blue. The pass key is 4417. The pass key is"
    with runner:
        want = generate(runner, [tok.encode(prompt)],
                        SamplingConfig(max_new_tokens=8, eos_id=tok.eos_id), tok).sequences[0]
        export_dir = runner.manifest.path
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, SCRIPT, "serve", str(export_dir), "--host",
                               "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert server.poll() is None, server.communicate()[1]
            try:
                models = httpx.get(f"{url}/v1/models", timeout=2)
                if models.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        reply = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": models.json()["data"][0]["id"], "prompt": prompt, "max_tokens": 8, "temperature": 0}).json()
        assert reply["choices"][0]["text"] == want.text, reply
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=60)
    assert "Traceback" not in err, err
