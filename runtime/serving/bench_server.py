"""`infini-trt serve` as a child process for `infini-trt bench-serve`: its own interpreter, so
that the client measuring it and the server do not share a GIL; on 127.0.0.1 and a free port,
read from the line it prints once it serves; stopped with SIGTERM whichever way the benchmark
ends (and, on Linux, when the benchmark's process dies, through PR_SET_PDEATHSIG).

    with ServerProcess(["MODEL", "--max-batch", "16"], log=print) as server:
        server.url                    # http://127.0.0.1:PORT
        server.cpu_seconds()          # user + system CPU time of the server so far
"""
from __future__ import annotations

import collections
import ctypes
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

from infini_trt.export.errors import InfiniTrtError

SERVING = re.compile(r"serving .* at http://127\.0\.0\.1:(\d+)/v1")
HEALTH_TIMEOUT_S = 60          # from the line "serving ..." to GET /health answering 200
STOP_TIMEOUT_S = 30            # SIGTERM, then SIGKILL
PR_SET_PDEATHSIG = 1


class ServerError(InfiniTrtError):
    """The server did not start, died, or answered a request with an error."""


def _die_with_parent() -> None:                          # in the child, before exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):                    # not Linux: stop() still stops it
        pass


class ServerProcess:
    """`infini-trt serve ARGS --host 127.0.0.1 --port 0 --log-level warning` in a child
    process; entering waits until it serves (an export the first time can take minutes: its
    progress lines are passed to `log`) and GET /health answers, or raises ServerError with
    the server's last line."""

    def __init__(self, args: list[str], log: Callable[[str], None] | None = None,
                 env: dict | None = None):
        self.command = [sys.executable, "-m", "infini_trt.runtime.cli", "serve", *args,
                        "--host", "127.0.0.1", "--port", "0", "--log-level", "warning"]
        self.log, self.env = log or (lambda text: None), env
        self.max_batch = (int(args[args.index("--max-batch") + 1]) if "--max-batch" in args
                          else None)
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=40)
        self._serving = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServerProcess":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.command, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self._reader = threading.Thread(target=self._read_stderr, name="bench-serve-stderr",
                                        daemon=True)
        self._reader.start()
        while not self._serving.wait(0.2):
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise ServerError(f"the server exited (code {self.proc.returncode}) before "
                                  f"serving: {self.last_line()}")
        self._wait_healthy()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            line = line.rstrip()
            if not line:
                continue
            self.lines.append(line)
            found = SERVING.search(line)
            if found and not self._serving.is_set():
                self.port = int(found.group(1))
                self._serving.set()
            self.log(f"server: {line}")

    def _wait_healthy(self) -> None:
        import httpx

        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise ServerError(f"the server exited (code {self.proc.returncode}): "
                                  f"{self.last_line()}")
            if time.monotonic() > deadline:
                raise ServerError(f"the server at {self.url} did not answer GET /health "
                                  f"within {HEALTH_TIMEOUT_S} s")
            time.sleep(0.1)

    def last_line(self) -> str:
        """The server's last line on stderr that says something (a traceback's last line is
        its error), or a note that it said nothing."""
        if not self.lines:
            return "(it printed nothing)"
        line = self.lines[-1]
        return line[len("Error: "):] if line.startswith("Error: ") else line

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise ServerError(f"the server died (exit code {code}): {self.last_line()}")

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds the server has used (None where psutil cannot tell)."""
        try:
            import psutil

            times = psutil.Process(self.proc.pid).cpu_times()
            return times.user + times.system
        except Exception:                                 # gone, or no such information
            return None

    def stop(self) -> int | None:
        """SIGTERM (SIGKILL after STOP_TIMEOUT_S) -> its exit code (None: never started)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            except BaseException:                          # interrupted while waiting
                proc.kill()
                proc.wait()
                raise
        if self._reader is not None:
            self._reader.join(5)
        if proc.stderr is not None:
            proc.stderr.close()
        return proc.returncode
