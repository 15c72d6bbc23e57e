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


HANG_SCRIPT = """
import gc, sys, time
import numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto
from infini_trt.export.forked import forked

x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
options = ort.SessionOptions()
options.intra_op_num_threads = 2                  # a thread pool, whose threads fork drops
session = ort.InferenceSession(model.SerializeToString(), options,
                               providers=["CPUExecutionProvider"])
session.run(None, {"x": np.ones(2, np.float32)})
time.sleep(1)                                     # its threads stop spinning, wait on a condvar
gc.disable()
cycle = {"session": session}
cycle["self"] = cycle                             # garbage only a collection frees
del session, cycle
with forked(lambda: gc.collect() >= 0, fork=True) as child:
    print("child returned", child.result())
"""


@pytest.mark.skipif(not can_fork(), reason="needs Linux and 2 usable cores to fork")
def test_the_child_does_not_collect_the_parents_garbage():
    """A collection in the child must not run the destructor of an ONNX Runtime session that
    the parent left as garbage (it waits on the session's thread pool, whose threads the
    child does not have: the child hung)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", HANG_SCRIPT], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "child returned True" in done.stdout
