"""`infini-trt serve` as a process: SIGTERM or Ctrl-C while a stream is in flight ends the
stream cleanly and exits 0; a busy port or a missing extra is one line and exit code 1."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from infini_trt.runtime.cli import main


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_stream_ends_it_cleanly_and_exits_0(server, shared_cache, sig):
    import httpx

    env = {**os.environ, "INFINI_TRT_CACHE": str(shared_cache)}   # the export is made
    proc = subprocess.Popen([sys.executable, "-m", "infini_trt.runtime.cli", "serve",
                             "--port", "0", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr, started = [], threading.Event()

    def read_stderr():
        for line in proc.stderr:
            stderr.append(line)
            if "serving" in line:
                started.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert started.wait(60), "".join(stderr)
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/v1", "".join(stderr)).group(1))
        body = {"prompt": "The sky is", "max_tokens": 4000, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body,
                          timeout=30) as response:
            lines = (line for line in response.iter_lines() if line)
            first = [next(lines) for _ in range(3)]
            proc.send_signal(sig)
            rest = list(lines)
        assert rest[-1] == "data: [DONE]"
        events = [json.loads(line[len("data: "):]) for line in first + rest[:-1]]
        finishes = [e["choices"][0]["finish_reason"] for e in events]
        assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
        assert len(events) < 4000                         # cut short, not run to the end
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
    assert "Traceback" not in "".join(stderr), "".join(stderr)


def test_a_busy_port_is_one_line(server):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        result = CliRunner().invoke(main, ["serve", "--port", str(port)])
    assert result.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in result.output
    assert time.monotonic() - started < 5                 # before the model is loaded
    assert "Traceback" not in result.output


def test_a_missing_extra_is_one_line(monkeypatch):
    import importlib.util

    import infini_trt.runtime.serving as serving

    real = importlib.util.find_spec
    monkeypatch.setattr(serving.importlib.util, "find_spec",
                        lambda name, *a: None if name == "uvicorn" else real(name, *a))
    result = CliRunner().invoke(main, ["serve", "--port", "0"])
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and 'pip install "infini-trt[serve]"' in result.output
    assert "'uvicorn'" in result.output
