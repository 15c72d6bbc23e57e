"""The TensorRT runner: the engines that `infini-trt build` recorded in an export's manifest.

Every graph (segment; extend and fold for decoding) has its own engine and execution context.
Token ids, logits and the decoding inputs live in buffers allocated once per `reset` (every
address 256-byte aligned, as TensorRT requires), so their addresses are bound once; the state
(memory, norm; the K/V caches) lives in two ping-pong buffers on the GPU: each call reads one
and writes the other, and nothing makes a round trip through host memory.
Shapes and addresses are set only when they change.

With cuda_graphs=True every (shapes, buffer parity) is captured once as a CUDA graph after a
warm-up call, then replayed; capturing needs an engine whose memory-update plugin is AOT (a
JIT plugin runs Python at enqueue) or the ONNX-function fallback.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from infini_trt.export.errors import InfiniTrtError, InputError
from infini_trt.export.io_spec import EXTEND, FOLD, PREFILL, SEGMENT, GraphSpec
from infini_trt.export.manifest import read_manifest

from ..arrays import ArraySpace, Staging
from ..artifacts import file_sha256, verify_export
from ..kv_cache import DecodeCaches
from .base import Runner


class GraphEngine:
    """One graph's engine and execution context on one stream."""

    def __init__(self, runtime, plan: bytes, spec: GraphSpec, stream, cuda_graphs: bool,
                 where: str):
        from infini_trt.runtime.engine import EngineError

        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineError(f"{where} cannot be loaded by this TensorRT (another version, "
                              f"GPU or a corrupt file); rebuild it with `infini-trt build`")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if sorted(names) != sorted(spec.input_names + spec.output_names):
            raise EngineError(f"{where} has tensors {names}, not those of the {spec.name} graph; "
                              f"rebuild it with `infini-trt build`")
        self.context = self.engine.create_execution_context()
        self.spec, self.stream, self.where = spec, stream, where
        self.cuda_graphs = cuda_graphs
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}

    @property
    def stream_handle(self) -> int:
        return self.stream.cuda_stream if self.stream is not None else 0

    def bind(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Set the shapes and addresses that changed since the last call."""
        for name, tensor in inputs.items():
            shape = tuple(tensor.shape)
            if self.shapes.get(name) != shape:
                if not self.context.set_input_shape(name, shape):
                    raise InputError(f"{self.where}: shape {shape} of {name} is outside the "
                                     f"engine's profile; rebuild with a larger --max-batch")
                self.shapes[name] = shape
        for name, tensor in {**inputs, **outputs}.items():
            address = tensor.data_ptr()
            if self.addresses.get(name) != address:
                self.context.set_tensor_address(name, address)
                self.addresses[name] = address

    def execute(self) -> None:
        if not self.context.execute_async_v3(self.stream_handle):
            raise InfiniTrtError(f"{self.where}: TensorRT failed to enqueue the engine")

    def run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        self.bind(inputs, outputs)
        if not self.cuda_graphs:
            self.execute()
            return
        key = (tuple(sorted(self.shapes.items())), tuple(sorted(self.addresses.items())))
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self.capture()
        with torch.cuda.stream(self.stream):
            graph.replay()

    def capture(self) -> "torch.cuda.CUDAGraph":
        """Warm up once, then capture the engine's launch for the current shapes/addresses."""
        self.execute()
        if hasattr(self.context, "is_stream_capturable") and \
                not self.context.is_stream_capturable(self.stream_handle):
            raise InfiniTrtError(f"{self.where} cannot be captured as a CUDA graph (a JIT "
                                 f"plugin?); run without --cuda-graphs")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            self.execute()
        return graph


class TrtRunner(Runner):
    backend = "tensorrt"

    def __init__(self, export_dir: str | Path, device: str | None = None,
                 engine: str | Path | None = None, cuda_graphs: bool = False, runtime=None):
        """`engine`: which recorded engine (its segment file or manifest name) [default: the
        newest built for this GPU; `runners.prepare` builds one where there is none].
        `runtime`: a stand-in for trt.Runtime (tests); the real one needs a GPU."""
        from infini_trt.runtime import engine as engines

        if runtime is None and device not in (None, "cuda"):
            raise InfiniTrtError("the tensorrt backend runs on a CUDA GPU; --device cpu is "
                                 "not available for it")
        self.manifest = read_manifest(export_dir)
        verify_export(self.manifest)
        self.config, self.dtype = self.manifest.config, self.manifest.dtype
        self.weights_sha256 = self.manifest.source.get("weights_sha256")
        here = engines.gpu() if runtime is None else None
        self.engine_name, self.entry = engines.select_engine(
            self.manifest, engine,
            prefer=lambda e: here is not None and e["compute_capability"] == here[1])
        self.cuda_graphs = cuda_graphs
        if runtime is None:
            runtime = self._real_runtime()
            self.torch_device, self.stream = torch.device("cuda"), torch.cuda.Stream()
        else:
            self.torch_device, self.stream = torch.device(device or "cpu"), None
        self.runtime = runtime
        self.engines: dict[str, GraphEngine] = {}
        self._engine_file = lambda graph: engines.engine_file(self.manifest, self.entry, graph)
        self.graph_engine(SEGMENT)                    # fail early on a bad engine

    def _real_runtime(self):
        from infini_trt.runtime.engine import check_engine, gpu, import_backend, make_logger

        trt = import_backend(self.entry["backend"])
        check_engine(self.entry, trt.__version__, gpu(), where=f"engine {self.engine_name}")
        if self.entry.get("plugin"):
            from infini_trt.plugins.memory_update import tensorrt_plugin

            tensorrt_plugin.register(trt, (self.config.update_rule,))
        self._logger = make_logger(trt)
        return trt.Runtime(self._logger)

    @property
    def description(self) -> str:
        plugin = "plugin" if self.entry.get("plugin") else "onnx-function"
        graphs = ", cuda-graphs" if self.cuda_graphs else ""
        return f"{self.entry['backend']}-{plugin}{graphs} ({self.dtype})"

    def load_graphs(self) -> None:
        for graph in (PREFILL, EXTEND, FOLD):
            if graph in self.entry["graphs"]:
                self.graph_engine(graph)

    def graph_engine(self, graph: str) -> GraphEngine:
        """The engine of one graph, loaded (and its file checked) on first use."""
        if graph not in self.engines:
            from infini_trt.runtime.engine import EngineError

            path = self._engine_file(graph)
            recorded = self.entry["graphs"][graph]["sha256"]
            if not path.is_file() or file_sha256(path) != recorded:
                raise EngineError(f"engine file {path} changed since it was built; rebuild it "
                                  f"with `infini-trt build`")
            self.engines[graph] = GraphEngine(self.runtime, path.read_bytes(),
                                              self.manifest.graph(graph), self.stream,
                                              self.cuda_graphs, f"engine {path.name}")
        return self.engines[graph]

    # streams: the engines run on their own stream; the caller's stream waits for results ----
    @contextlib.contextmanager
    def _on_stream(self):
        if self.stream is None:
            yield
            return
        caller = torch.cuda.current_stream()
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            yield
        caller.wait_stream(self.stream)

    def _buffer(self, shape, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=self.torch_device)

    # state -----------------------------------------------------------------------------------
    def _reset(self, batch: int) -> None:
        if batch > self.entry["max_batch"]:
            raise InputError(f"this engine takes batch <= {self.entry['max_batch']}; rebuild "
                             f"it with `infini-trt build --max-batch {batch}`")
        cfg, n = self.config, self.config.segment_len
        for engine in self.engines.values():
            engine.graphs.clear()                     # old buffers' addresses
        self.ids = Staging(self._buffer(batch * n, torch.int64))  # bound once: views of these
        self.logit_rows = Staging(self._buffer(batch * n, torch.int64))
        self.logits = self._buffer(batch * n * cfg.vocab_size)
        self.memory = [self._buffer(cfg.memory_shape(batch)) for _ in "ab"]  # ping-pong
        self.norm = [self._buffer(cfg.norm_shape(batch)) for _ in "ab"]
        self.fold_mask = self._buffer((batch,), torch.bool)
        self.start = self._buffer((batch,), torch.int64)
        self.current = 0
        self.caches = None

    def _state_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.memory[self.current], self.norm[self.current]

    def _cache_tensors(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.caches is None:
            self.caches = DecodeCaches.for_graph(self.manifest.graph(EXTEND), self.config,
                                                 self.batch,
                                                 ArraySpace(str(self.torch_device), True))
        return self.caches.slots(end)

    def read_row(self, b: int, position: int):
        with self._on_stream():
            return super().read_row(b, position)

    def write_row(self, b: int, row) -> None:
        with self._on_stream():
            super().write_row(b, row)

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        return (self.memory[self.current].cpu().numpy().copy(),
                self.norm[self.current].cpu().numpy().copy())

    def set_state(self, memory: np.ndarray, norm: np.ndarray) -> None:
        self.check_state(memory, norm)
        with self._on_stream():
            self.memory[self.current].copy_(torch.as_tensor(memory, dtype=torch.float32))
            self.norm[self.current].copy_(torch.as_tensor(norm, dtype=torch.float32))

    def _logits_view(self, lead: tuple) -> torch.Tensor:
        """A (*lead, V) view of the fixed logits buffer."""
        shape = (*lead, self.config.vocab_size)
        return self.logits[:int(np.prod(shape))].view(shape)

    # graphs ----------------------------------------------------------------------------------
    def _step(self, ids: np.ndarray) -> torch.Tensor:
        return self._segment(SEGMENT, ids)

    def _advance(self, ids: np.ndarray) -> torch.Tensor:
        if PREFILL not in self.entry["graphs"]:        # engines of an export without it
            return super()._advance(ids)
        return self._segment(PREFILL, ids)

    def _segment(self, graph: str, ids: np.ndarray) -> torch.Tensor:
        """One segment through `graph` (segment: every token's logits; prefill: the last
        token's), state ping-ponged."""
        cur, nxt = self.current, 1 - self.current
        with self._on_stream():
            tokens = self.ids.load(ids)
            logits = self._logits_view(ids.shape[:1] if graph == PREFILL else ids.shape)
            name = "last_logits" if graph == PREFILL else "logits"
            self.graph_engine(graph).run(
                {"input_ids": tokens, "memory": self.memory[cur], "norm": self.norm[cur]},
                {name: logits, "memory_out": self.memory[nxt], "norm_out": self.norm[nxt]})
            out = logits.clone()
        self.current = nxt
        return out

    def _extend(self, ids: np.ndarray, start: np.ndarray, length: np.ndarray,
                rows: np.ndarray) -> torch.Tensor:
        """Each layer's cache slice is bound as its own input (no copy); the engine returns the
        new tokens' keys and values, written into the caches here, on the engine's stream,
        and the logits of the tokens `rows`."""
        with self._on_stream():
            self._cache_tensors(0)
            caches = self.caches.reading(start)
            new = self.caches.new_rows(ids.shape[1])
            logits = self._logits_view(rows.shape)
            self.start.copy_(torch.from_numpy(start))
            self.graph_engine(EXTEND).run(
                {"input_ids": self.ids.load(ids), "start": self.start,
                 "logit_rows": self.logit_rows.load(rows),
                 "memory": self.memory[self.current], "norm": self.norm[self.current],
                 **caches},
                {"logits": logits, **new})
            self.caches.write(new, start, length)
            out = logits.clone()
        return out

    def _fold(self, mask: np.ndarray) -> None:
        if self.caches is None:
            raise InputError("fold() needs a segment in the K/V cache: call extend() first")
        cur, nxt = self.current, 1 - self.current
        with self._on_stream():
            self.caches.fit(self.config.segment_len)      # the whole segment
            self.fold_mask.copy_(torch.from_numpy(mask))
            self.graph_engine(FOLD).run(
                {**self.caches.fold_inputs, "memory": self.memory[cur],
                 "norm": self.norm[cur], "fold": self.fold_mask},
                {"memory_out": self.memory[nxt], "norm_out": self.norm[nxt]})
        self.current = nxt
