"""The engine's reader: full segments of one prompt at a time, on a second runner of the same
model at batch 1 through the prompt-reading graph (as `run` reads them), on a thread of its
own, so that the batch goes on decoding while a long prompt is read (ONNX Runtime and PyTorch
let go of the GIL while they compute).

    reader = Reader(runner, engine_condition).start()
    reader.submit(ReadJob(request, row_as_context, start=fed, stop=fed + k * n, on_boundary))
    ...                                   # the engine's loop goes on; the reader notifies
    job = reader.take()                   # the job once it is done (result or error), or None
    reader.stop()

The row travels as a Context (runtime/context.py): the engine saves it when the job starts
and loads `job.result` back when it is done, so the batch's runner never waits for the
reader, and the reader's row never touches the batch.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from ..runners.base import Runner
from ..session import Session


@dataclass
class ReadJob:
    request: object                     # engine.Request: its prompt, and whether it is cancelled
    context: object                     # its row when it left the batch
    start: int                          # prompt tokens read before (a segment boundary)
    stop: int                           # read up to here: start + a multiple of segment_len
    on_boundary: Callable[[int, Session], None] | None = None   # (tokens read, the session)
    fed: int = field(init=False)        # prompt tokens read so far
    result: object | None = None        # the row at `fed`, as a Context
    error: BaseException | None = None
    done: bool = False

    def __post_init__(self):
        self.fed = self.start


class Reader:
    """One job at a time; `cond` is the engine's condition, notified when a job is done (its
    lock guards the job's hand-over)."""

    def __init__(self, runner: Runner, cond: threading.Condition):
        self.runner = runner
        self.session = Session(runner, batch=1)
        self.segment_len = runner.config.segment_len
        self._cond = cond
        self._job: ReadJob | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="infini-trt-reader", daemon=True)

    def start(self) -> "Reader":
        self._thread.start()
        return self

    @property
    def busy(self) -> bool:
        """A job is given and not taken back yet."""
        return self._job is not None

    @property
    def finished(self) -> bool:
        """A job is done and waits to be taken (read under `cond`)."""
        return self._job is not None and self._job.done

    def submit(self, job: ReadJob) -> None:
        with self._cond:
            if self._job is not None:
                raise RuntimeError("the reader already has a job")
            self._job = job
            self._cond.notify_all()

    def take(self) -> ReadJob | None:
        """The job, once it is done (then the reader is free), else None."""
        with self._cond:
            job = self._job
            if job is None or not job.done:
                return None
            self._job = None
            return job

    def stop(self) -> None:
        """Stop after the segment being read (a job in hand ends where it is)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or (
                    self._job is not None and not self._job.done))
                if self._stopping:
                    return
                job = self._job
            self._read(job)
            with self._cond:
                job.done = True
                self._cond.notify_all()

    def _read(self, job: ReadJob) -> None:
        n, session, prompt = self.segment_len, self.session, job.request.prompt
        try:
            session.load(0, job.context)
            while job.fed < job.stop and not (job.request.cancelled or self._stopping):
                session.feed([prompt[job.fed:job.fed + n]], progress=False)
                job.fed += n
                if job.on_boundary is not None:
                    job.on_boundary(job.fed, session)
            job.result = session.save(0)
        except Exception as exc:                      # the engine fails this request alone
            job.error = exc
