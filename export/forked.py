"""Work done in a forked child process while this one does other work: the exporter traces
some of its pieces on a second core (export/stamp.py).

    with forked(work) as child:      # work() starts in a child process
        mine = other_work()
        theirs = child.result()      # work()'s return value, pickled back

A fork (not a fresh interpreter) shares what this process has imported and built; it is
used on Linux with at least 2 usable cores (`can_fork`), elsewhere `work` runs in this
process, on `result()`.
"""
from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import pickle
import sys
import traceback
from typing import Any, Callable, Iterator


def can_fork() -> bool:
    """Whether a forked child can run beside this process: Linux (forking is unsafe where
    system frameworks hold threads, as on macOS) and 2 or more usable cores."""
    return sys.platform.startswith("linux") and len(os.sched_getaffinity(0)) >= 2


class Child:
    """A handle on work started in a child (or, without one, to run on `result`)."""

    def __init__(self, work: Callable[[], Any], fork: bool):
        self._work, self._process, self._pipe = work, None, None
        if fork:
            context = multiprocessing.get_context("fork")
            self._pipe, child_end = context.Pipe(duplex=False)
            self._process = context.Process(target=_run, args=(work, child_end), daemon=True)
            # The child must never collect this process's garbage: a native object's
            # destructor there can wait forever on a thread that was not forked (an ONNX
            # Runtime session's thread pool hung a child so). Frozen objects are never
            # collected; the parent unfreezes them once the child runs.
            gc.freeze()
            try:
                self._process.start()                   # flushes stdout and stderr first
            finally:
                gc.unfreeze()
            child_end.close()

    def result(self) -> Any:
        """work()'s return value. An exception in the child is raised here: the same
        exception where it could be pickled back (an InfiniTrtError stays one line for the
        CLI), with the child's traceback as its note; otherwise a RuntimeError carrying that
        traceback."""
        if self._process is None:
            return self._work()
        try:
            ok, value, trace = self._pipe.recv()
        except EOFError:                                # the child died without a word
            self._process.join()
            raise RuntimeError(f"the child process exited with code "
                               f"{self._process.exitcode}") from None
        self._process.join()
        if ok:
            return value
        if value is None:
            raise RuntimeError(f"in the child process:\n{trace}")
        value.add_note(f"in the child process:\n{trace}")
        raise value

    def stop(self) -> None:
        """End the child if it still runs (the work is abandoned)."""
        if self._process is not None and self._process.is_alive():
            self._process.kill()
        if self._process is not None:
            self._process.join()
            self._pipe.close()


def _run(work: Callable[[], Any], pipe) -> None:
    """The child: work() -> (True, value, None), or (False, the exception or None where it
    cannot be pickled, its traceback), into the pipe."""
    try:
        pipe.send((True, work(), None))
    except BaseException as exc:                   # SIGTERM and Ctrl-C too: say it and end
        trace = traceback.format_exc()
        try:
            pickle.dumps(exc)
        except Exception:
            exc = None
        pipe.send((False, exc if isinstance(exc, Exception) else None, trace))
    finally:
        pipe.close()


@contextlib.contextmanager
def forked(work: Callable[[], Any], fork: bool | None = None) -> Iterator[Child]:
    """Start work() in a forked child (`fork`: default `can_fork()`); the child is ended
    when the block is left, however it is left."""
    child = Child(work, can_fork() if fork is None else fork)
    try:
        yield child
    finally:
        child.stop()
