"""export/forked.py: work in a forked child, its value or its exception brought back."""
import os

import pytest

from infini_trt.export.errors import InfiniTrtError
from infini_trt.export.forked import can_fork, forked

FORKS = [True, False] if can_fork() else [False]


@pytest.mark.parametrize("fork", FORKS)
def test_value_comes_back_from_the_child(fork):
    parent = os.getpid()
    with forked(lambda: (os.getpid(), [1.5, "x"]), fork=fork) as child:
        pid, value = child.result()
    assert value == [1.5, "x"]
    assert (pid != parent) == fork


@pytest.mark.parametrize("fork", FORKS)
def test_an_error_in_the_child_is_raised_as_itself(fork):
    def work():
        raise InfiniTrtError("the config is wrong")

    with forked(work, fork=fork) as child:
        with pytest.raises(InfiniTrtError, match="the config is wrong") as raised:
            child.result()
    if fork:
        assert "in the child process" in "".join(raised.value.__notes__)


@pytest.mark.skipif(not can_fork(), reason="needs Linux and 2 usable cores to fork")
def test_an_error_that_cannot_be_pickled_is_a_runtime_error_with_its_traceback():
    class Local(Exception):                   # a local class: pickle cannot find it
        pass

    def work():
        raise Local("boom")

    with forked(work, fork=True) as child:
        with pytest.raises(RuntimeError, match="Local: boom"):
            child.result()


@pytest.mark.skipif(not can_fork(), reason="needs Linux and 2 usable cores to fork")
def test_a_child_that_dies_is_said():
    with forked(lambda: os._exit(3), fork=True) as child:
        with pytest.raises(RuntimeError, match="exited with code 3"):
            child.result()
