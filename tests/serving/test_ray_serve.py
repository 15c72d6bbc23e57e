"""`infini-trt serve --ray`: the CLI as a subprocess, a local Ray instance on 127.0.0.1 with 2
replicas and one context directory they share. A context made through one request is
continued by later requests on both replicas (counted from the replica header each replica
sets), as `infini-trt run --greedy` answers the whole prompt; a replica process killed under
load (100 requests, 8 at once) costs no request (the OpenAI client's retries complete them)
and no context; on SIGTERM everything Ray started is gone."""
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

from live_server import passkey_prompt

HAS_RAY = importlib.util.find_spec("ray") is not None and (
    Path(importlib.util.find_spec("ray").origin).parent / "serve").is_dir()
pytestmark = pytest.mark.skipif(not HAS_RAY, reason='Ray Serve is not installed (pip install '
                                                    '"infini-trt[ray]")')

HEADER = "x-infini-trt-replica"       # ray_serve.REPLICA_HEADER (not imported: no ray import)
KEYS = ["86420", "13579", "24601", "97531"]


def split(prompt: str) -> tuple[str, str]:
    document, question = prompt.rsplit("What", 1)
    return document, "What" + question


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RayServer:
    """`infini-trt serve --ray --replicas 2` in a subprocess, Ray's files in a private folder
    (short: Ray's socket paths must fit in 107 bytes)."""

    def __init__(self, shared_cache, replicas=2):
        import psutil

        self.tmp = Path(tempfile.mkdtemp(prefix="itr-ray-", dir="/tmp"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.tmp / "serve.log"
        env = dict(os.environ, RAY_TMPDIR=str(self.tmp), INFINI_TRT_CACHE=str(shared_cache),
                   RAY_USAGE_STATS_ENABLED="0")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "infini_trt.runtime.cli", "serve", "--ray",
                 "--replicas", str(replicas), "--port", str(self.port), "--max-batch", "4",
                 "--context-store", str(self.tmp / "contexts")],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        self.started = set()              # every process Ray started (replicas restarted too)
        deadline = time.monotonic() + 300
        while "infini-trt: serving" not in self.output():
            assert self.proc.poll() is None, f"serve --ray exited:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready:\n{self.output()[-3000:]}"
            time.sleep(0.5)
        self.psutil = psutil
        self.note_processes()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def note_processes(self) -> None:
        self.started |= {p.pid for p in self.psutil.Process(self.proc.pid).children(True)}

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x",
                             max_retries=kw.pop("max_retries", 0),
                             timeout=kw.pop("timeout", 60), **kw)

    def http(self):
        import httpx

        return httpx.Client(base_url=self.url, timeout=60)

    def close(self) -> list[int]:
        """SIGTERM; -> the pids Ray started that are still alive 30 s after it exited."""
        self.note_processes()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.code = self.proc.wait(90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.code = "hung"
        deadline = time.monotonic() + 30
        while True:
            alive = [pid for pid in self.started if self.psutil.pid_exists(pid) and
                     self.psutil.Process(pid).status() != self.psutil.STATUS_ZOMBIE]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.5)


@pytest.fixture(scope="module")
def ray_server(shared_cache):
    running = RayServer(shared_cache)
    yield running
    left = running.close()
    for pid in left:                      # leave nothing behind, then say what was left
        with contextlib.suppress(Exception):
            os.kill(pid, signal.SIGKILL)
    assert running.code == 0, running.output()[-3000:]
    assert not left, f"Ray processes left after SIGTERM: {left}"
    assert "Traceback" not in running.output(), running.output()[-3000:]
    shutil.rmtree(running.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def greedy(shared_cache):
    """greedy(prompt, n) -> the text of `infini-trt run BUNDLED --greedy` (memoised)."""
    from infini_trt.runtime import bundled_model
    from infini_trt.runtime.cli import main

    made = {}

    def run(prompt, max_new_tokens):
        if (prompt, max_new_tokens) not in made:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("INFINI_TRT_CACHE", str(shared_cache))
                result = CliRunner().invoke(main, [
                    "run", str(bundled_model()), "--prompt", prompt, "--greedy",
                    "--max-new-tokens", str(max_new_tokens), "--json", "--no-progress"])
            assert result.exit_code == 0, result.output
            made[prompt, max_new_tokens] = json.loads(result.stdout)["sequences"][0]["text"]
        return made[prompt, max_new_tokens]

    return run


def make_context(running, document) -> str:
    with running.http() as http:
        response = http.post("/v1/contexts", json={"model": "passkey", "prompt": document})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def complete(client, prompt, max_tokens, context=None) -> tuple[str, str]:
    """-> (the greedy answer, the replica header)."""
    raw = client.completions.with_raw_response.create(
        model="passkey", prompt=prompt, max_tokens=max_tokens, temperature=0,
        extra_body={"context": context} if context else None)
    return raw.parse().choices[0].text, raw.headers[HEADER]


def test_a_context_is_continued_on_both_replicas(ray_server, greedy):
    prompt = passkey_prompt(KEYS[0], 4, 2)
    document, question = split(prompt)
    expected = greedy(prompt, 8)
    assert "8 6 4 2 0" in expected
    ctx = make_context(ray_server, document)
    client = ray_server.client()
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: complete(client, question, 8, ctx), range(20)))
    assert [text for text, _ in answers] == [expected] * 20
    replicas = {who for _, who in answers}
    assert len(replicas) == 2, replicas          # "<replica id> <pid>": both replicas answered
    with ray_server.http() as http:
        models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["passkey"]


def test_a_killed_replica_costs_no_request_and_no_context(ray_server, greedy):
    import httpx

    prompts = [passkey_prompt(key, 2 + i, 1) for i, key in enumerate(KEYS)]
    expected = [greedy(p, 6) for p in prompts]
    documents = [split(p)[0] for p in prompts[:3]]
    contexts = [make_context(ray_server, d) for d in documents]      # made before the kill

    failures = []                             # responses other than 200 (the client retries)
    http_client = httpx.Client(event_hooks={"response": [
        lambda r: failures.append(r.status_code) if r.status_code != 200 else None]})
    client = ray_server.client(max_retries=5, timeout=60, http_client=http_client)
    done, seen, killed = [], [], []

    def one(i):
        text, who = complete(client, prompts[i % 4], 6)
        seen.append(who)
        done.append(i)
        return text

    def killer():
        while len(done) < 12:
            time.sleep(0.05)
        ray_server.note_processes()
        pid = int(seen[-1].split()[1])
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    kill = threading.Thread(target=killer, daemon=True)
    kill.start()
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(100)]
        answers = [f.result(timeout=max(1, 240 - (time.monotonic() - started)))
                   for f in futures]
    kill.join(5)
    assert killed, "the replica was not killed"
    assert answers == [expected[i % 4] for i in range(100)]
    assert set(failures) <= {500, 502, 503}, failures            # retryable, and retried
    after = [complete(client, split(p)[1], 6, ctx) for p, ctx in zip(prompts, contexts)]
    assert [text for text, _ in after] == expected[:3]
    assert all(int(who.split()[1]) != killed[0] for _, who in after)
    print(f"killed replica pid {killed[0]}; responses before retries: {failures}")


def test_an_address_nothing_answers_at_is_one_line_at_once():
    """Ray's own connect retries a dead address for minutes; the server says so first."""
    with socket.socket() as probe:                # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "infini_trt.runtime.cli", "serve", "--ray",
                           "--address", f"127.0.0.1:{port}"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and time.monotonic() - start < 60
    assert f"cannot start Ray at 127.0.0.1:{port}: nothing answers" in done.stderr
    assert "Traceback" not in done.stderr
