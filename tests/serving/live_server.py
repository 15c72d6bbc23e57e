"""What the tests of `infini-trt serve` share, beside their fixtures (conftest.py): a real
server on 127.0.0.1 (uvicorn in a thread, a free port) and prompts in the bundled model's
words. A module of its own name: `from conftest import` would name whichever conftest.py
pytest imported last."""
import contextlib
import re
import threading
import time

import pytest

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
         "memorize them. I will quiz you about the important information there. ")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again. ")


def passkey_prompt(key: str, before: int, after: int) -> str:
    """A prompt in the bundled model's words: the key between `before` and `after` fillers."""
    return (INTRO + FILLER * before + f"The pass key is {key}. Remember it. {key} is the pass "
            f"key. " + FILLER * after + "What is the pass key? The pass key is")


class RunningServer:
    """open_service + uvicorn in a thread, on 127.0.0.1 and a free port."""

    def __init__(self, shared_cache, **options):
        from infini_trt.runtime.serving import listen, open_service
        from infini_trt.runtime.serving.app import make_server

        self.stack = contextlib.ExitStack()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("INFINI_TRT_CACHE", str(shared_cache))
            self.service = self.stack.enter_context(open_service(log=lambda s: None, **options))
        self.engine = self.service.engine
        sock = listen("127.0.0.1", 0)
        self.stack.callback(sock.close)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(self.service.app, self.engine, self.service.metrics,
                                  log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "no server"
            time.sleep(0.02)

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0,
                             timeout=kw.pop("timeout", 60), **kw)

    def http(self, timeout=60):
        import httpx

        return httpx.Client(base_url=self.url, timeout=timeout)

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of GET /metrics, e.g. metric("infini_trt_batch_rows_busy")."""
        with self.http() as http:
            text = http.get("/metrics").text
        pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" (\S+)"
        found = re.search(r"^" + pattern + "$", text, re.M)
        return float(found.group(1)) if found else 0.0

    def wait_idle(self, timeout=10.0) -> None:
        """Until no row is busy and nothing waits (as /metrics says)."""
        deadline = time.monotonic() + timeout
        while (self.metric("infini_trt_batch_rows_busy") or
               self.metric("infini_trt_queue_length")):
            assert time.monotonic() < deadline, "rows still busy"
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.stack.close()
        assert not self.thread.is_alive()
