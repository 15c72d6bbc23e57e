"""Running a function in a fresh process that dies with this one and is killed, not waited for,
when this one is interrupted: what `bench` measures each subject in, so that its peak memory
is its own."""
from __future__ import annotations

from infini_trt.export.errors import InfiniTrtError


def _die_with_parent() -> None:
    """In a worker (Linux): be sent SIGTERM when the process that started it dies. Without it,
    a bench killed with SIGTERM left its worker finishing the runs alone, loading the machine
    under the next measurement."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))          # PR_SET_PDEATHSIG


def _start_worker() -> None:
    """A worker's setup: it dies with its parent (`_die_with_parent`), and its progress bars
    (off in bench) lock with a thread lock: tqdm's default lock is a named semaphore, which a
    worker killed on Ctrl-C leaves behind for the resource tracker to warn about."""
    import threading

    from tqdm import tqdm

    _die_with_parent()
    tqdm.set_lock(threading.RLock())


def run_isolated(fn, *args):
    """fn(*args) in a fresh (spawned) process, which dies with this one and is killed, not
    waited for, when this one is interrupted (ProcessPoolExecutor's own exit would wait for
    the worker to finish its subject). The worker starts with Ctrl-C ignored, so that a
    terminal's SIGINT (sent to the whole process group) stops the parent only, which kills
    the worker, instead of printing the worker's traceback."""
    import multiprocessing
    import signal
    import threading
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(1, mp_context=context, initializer=_start_worker)
    main = threading.current_thread() is threading.main_thread()
    interrupted = False
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:                                    # the worker is spawned here, inheriting SIG_IGN
            future = pool.submit(fn, *args)
        finally:
            if main:
                signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
        return future.result()
    except BrokenProcessPool:
        raise InfiniTrtError("the benchmark process died (out of memory?)") from None
    except BaseException:                       # KeyboardInterrupt, Terminated: stop it now
        interrupted = True
        _kill_workers(pool)
        raise
    finally:
        manager = getattr(pool, "_executor_manager_thread", None)   # shutdown forgets it
        pool.shutdown(wait=not interrupted, cancel_futures=True)
        if interrupted and manager is not None:
            # Wait, briefly, for the pool's manager thread to end now that its worker is
            # killed. As it ends it closes a wake-up pipe that concurrent.futures' exit hook
            # writes to; the two raced at the interpreter's exit after a Ctrl-C, which printed
            # "OSError: [Errno 9] Bad file descriptor" with a traceback (once in a ci-local
            # run, Python 3.11.7).
            manager.join(2.0)


def _kill_workers(pool) -> None:
    """Kill a ProcessPoolExecutor's worker processes (Python 3.14 has pool.kill_workers();
    before it, its table of processes is the only handle)."""
    if hasattr(pool, "kill_workers"):
        pool.kill_workers()
        return
    for process in list((pool._processes or {}).values()):
        process.kill()
        process.join(5)
