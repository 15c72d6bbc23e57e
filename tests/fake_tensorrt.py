"""A stand-in for a TensorRT runtime, for testing the TensorRT runner on the CPU.

Its "engines" keep TensorRT's execution-context contract (set_input_shape, set_tensor_address,
execute_async_v3 on raw addresses) and compute with ONNX Runtime on the export's graphs,
reading inputs from and writing outputs to the bound host addresses. They count what the
runner binds, so tests can check that addresses are bound once and that state ping-pongs.
"""
import ctypes
import json
import os
from collections import Counter

import numpy as np
import onnxruntime as ort

from infini_trt.export.files import sha256_file
from infini_trt.export.manifest import read_manifest
from infini_trt.runtime.engine import record_engine

PREFIX = b"fake-engine:"


def _array(address: int, shape, dtype: str) -> np.ndarray:
    dtype = np.dtype(dtype)
    count = int(np.prod(shape)) * dtype.itemsize
    raw = (ctypes.c_uint8 * count).from_address(address)
    return np.frombuffer(raw, dtype=np.uint8).view(dtype).reshape(shape)


class FakeContext:
    def __init__(self, engine):
        self.engine = engine
        self.shapes, self.addresses = {}, {}
        self.calls = Counter()

    def set_input_shape(self, name, shape):
        self.calls["set_input_shape"] += 1
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        self.calls[f"address:{name}"] += 1
        # TensorRT wants 256-byte alignment; torch's CUDA allocator gives 512, its CPU one 64:
        # what the fake can check is that the runner binds no interior views
        assert address % 64 == 0, f"{name}: address {address} not aligned"
        self.addresses[name] = address

    def execute_async_v3(self, stream):
        self.calls["execute"] += 1
        spec = self.engine.spec
        feeds = {t.name: _array(self.addresses[t.name], self.shapes[t.name], t.dtype).copy()
                 for t in spec.inputs}
        results = self.engine.session.run(spec.output_names, feeds)
        for t, value in zip(spec.outputs, results):
            _array(self.addresses[t.name], value.shape, t.dtype)[...] = value
        return True


class FakeEngine:
    def __init__(self, manifest, graph):
        self.spec = manifest.graph(graph)
        self.session = ort.InferenceSession(os.fspath(manifest.graph_file(graph)),
                                            providers=["CPUExecutionProvider"])
        self.names = self.spec.input_names + self.spec.output_names
        self.contexts = []

    @property
    def num_io_tensors(self):
        return len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def create_execution_context(self):
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


class FakeRuntime:
    def __init__(self, export_dir):
        self.manifest = read_manifest(export_dir)
        self.engines = {}

    def deserialize_cuda_engine(self, plan: bytes):
        if not plan.startswith(PREFIX):
            return None
        graph = plan[len(PREFIX):].decode()
        self.engines[graph] = FakeEngine(self.manifest, graph)
        return self.engines[graph]


def record_fake_engines(export_dir, max_batch=4, name="fake.engine"):
    """Write fake engine files for every graph and record them in the manifest."""
    manifest = read_manifest(export_dir)
    graphs = {}
    for graph in manifest.graphs:
        file = f"engines/{name}" if graph == "segment" else f"engines/fake.{graph}.engine"
        path = manifest.path / file
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(PREFIX + graph.encode())
        graphs[graph] = {"file": file, "sha256": sha256_file(path)}
    entry = {"backend": "tensorrt", "tensorrt": "fake", "compute_capability": "0.0",
             "gpu": None, "max_batch": max_batch, "plugin": None, "graphs": graphs,
             "built_at": "0"}
    record_engine(manifest, graphs["segment"]["file"], json.loads(json.dumps(entry)))
    return graphs["segment"]["file"]
