"""TensorRT engines of an export directory: building, caching, recording, and checks on load.

    build_engines("out/", BuildSettings(backend="tensorrt-rtx", compute_capability="8.9"))

builds one engine per graph of the manifest (segment, and prefill/extend/fold when exported),
each with one optimization profile read from the graph's I/O table (every dynamic axis from its
min to its max; `batch` up to --max-batch). Networks are strongly typed: the
ONNX dtypes decide the precision. With the full TensorRT and a plugin export, our memory-update
plugin is registered first so that the parser puts it where the custom node is; TensorRT-RTX
has no plugin layers, so there the node falls back to its ONNX function.

Engines are cached under <cache>/engines/<key>/, the key hashing the ONNX files, the settings,
the TensorRT version and the plugin version; with the full TensorRT a timing cache per
version/target makes rebuilds faster. The manifest's `engines` records what each engine was
built for, and `check_engine` refuses, in one line, an engine built for another TensorRT or
GPU.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from infini_trt.export.errors import InfiniTrtError, MissingDependencyError
from infini_trt.export.files import atomic_file, sha256_file
from infini_trt.export.io_spec import EXTEND, GraphSpec
from infini_trt.export.manifest import MANIFEST_FILE, Manifest, package_version, read_manifest
from infini_trt.plugins.memory_update import contract

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
INSTALL = {
    "tensorrt": "pip install tensorrt (TensorRT >= 10.9; its wheels come from NVIDIA's package "
                "index), or build ahead of time with --backend tensorrt-rtx",
    "tensorrt-rtx": "pip install tensorrt-rtx (or pip install 'infini-trt[tensorrt-rtx]')",
}
# axis sizes to tune for, where not the max (decode: one token, its logits)
OPT_HINTS = {EXTEND: {"seq": 1, "rows": 1}}


class EngineError(InfiniTrtError):
    """An engine that cannot be built, or does not fit this TensorRT / GPU."""


def import_backend(backend: str):
    """The `tensorrt` or `tensorrt_rtx` module, or MissingDependencyError saying what to install."""
    if backend not in MODULES:
        raise InfiniTrtError(f"unknown engine backend {backend!r}; choose one of "
                             f"{', '.join(MODULES)}")
    try:
        return __import__(MODULES[backend])
    except ImportError:            # not installed, or its native libraries are missing
        raise MissingDependencyError(MODULES[backend], f"--backend {backend}",
                                     INSTALL[backend]) from None


def gpu() -> tuple[str, str] | None:
    """(name, "major.minor") of the current CUDA GPU, or None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


@dataclass(frozen=True)
class BuildSettings:
    backend: str = "tensorrt"
    max_batch: int = 8
    compute_capability: str | None = None   # "8.9"; default: the GPU's (required without one)
    plugin: bool = True                     # use our plugin where the backend can
    tf32: bool = False                      # let fp32 matmuls run in TF32 (TensorRT's default)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def profile_shapes(spec: GraphSpec, max_batch: int) -> dict[str, list[list[int]]]:
    """{input: [min, opt, max] shapes} for every input with a dynamic axis."""
    bounds = {}
    for axis, (lo, hi) in spec.axes.items():
        if axis == "batch":
            hi = max_batch if hi is None else min(hi, max_batch)
        if hi is None:
            raise EngineError(f"the {spec.name} graph's axis '{axis}' has no maximum")
        if hi < lo:
            raise EngineError(f"--max-batch must be at least {lo}")
        opt = min(max(OPT_HINTS.get(spec.name, {}).get(axis, hi), lo), hi)
        bounds[axis] = (lo, opt, hi)
    return {t.name: [list(t.shape({a: b[i] for a, b in bounds.items()})) for i in range(3)]
            for t in spec.inputs if any(isinstance(d, str) for d in t.dims)}


def engine_key(manifest: Manifest, graph: str, settings: BuildSettings, version: str) -> str:
    """What determines an engine's bytes: its ONNX files, settings, TensorRT, plugin."""
    parts = {"graph": graph, "files": manifest.graphs[graph]["files"],
             "settings": settings.to_dict(), "tensorrt": version,
             "plugin": {"version": contract.VERSION, "infini-trt": package_version("infini-trt")}
             if settings.plugin and manifest.memory_op == "plugin" else None}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def resolve_target(trt, settings: BuildSettings) -> tuple[str, str | None]:
    """(compute capability "X.Y", GPU name or None) that the engines are built for."""
    here = gpu()
    cc = settings.compute_capability
    if settings.backend == "tensorrt-rtx":
        if cc is None and here is None:
            raise EngineError("no GPU here: give --compute-capability (e.g. 8.9) to build "
                              "TensorRT-RTX engines ahead of time")
        cc = cc or here[1]
        member = "SM" + cc.replace(".", "")
        if not hasattr(trt.ComputeCapability, member):
            known = sorted((m[2:-1] + "." + m[-1] for m in dir(trt.ComputeCapability)
                            if m.startswith("SM")), key=float)
            raise EngineError(f"TensorRT-RTX {trt.__version__} cannot build for compute "
                              f"capability {cc}; it knows {', '.join(known)}")
        return cc, here[0] if here and here[1] == cc else None
    if here is None:
        raise EngineError("the full TensorRT builds on the GPU it targets and no CUDA GPU is "
                          "visible; build ahead of time with --backend tensorrt-rtx "
                          "--compute-capability X.Y")
    if cc is not None and cc != here[1]:
        raise EngineError(f"the full TensorRT builds for this GPU ({here[0]}, compute capability "
                          f"{here[1]}), not {cc}; use --backend tensorrt-rtx to build for {cc}")
    return here[1], here[0]


def make_logger(trt):
    """A TensorRT logger that keeps warnings and errors, for the error message."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                self.messages.append(str(msg))

    return Logger()


def _plugin_layers(trt, network) -> int:
    kinds = {getattr(trt.LayerType, n) for n in ("PLUGIN_V3", "PLUGIN_V2", "PLUGIN")
             if hasattr(trt.LayerType, n)}
    return sum(network.get_layer(i).type in kinds for i in range(network.num_layers))


def parse_onnx(parser, onnx_path: Path, hide_plugin: bool) -> bool:
    """Parse a graph file; with `hide_plugin` its memory-update nodes lose `plugin_namespace`,
    so that the parser inlines their ONNX function even if our plugin is registered."""
    if not hide_plugin:
        return parser.parse_from_file(os.fspath(onnx_path))
    import onnx

    model = onnx.load(os.fspath(onnx_path), load_external_data=False)
    for node in model.graph.node:
        if node.domain == contract.NAMESPACE:
            kept = [a for a in node.attribute if a.name != "plugin_namespace"]
            del node.attribute[:]
            node.attribute.extend(kept)
    return parser.parse(model.SerializeToString(), os.fspath(onnx_path))


def build_serialized(trt, onnx_path: Path, spec: GraphSpec, settings: BuildSettings, cc: str,
                     timing_cache: Path, plugin: dict | None) -> tuple[bytes, int]:
    """Parse one ONNX graph and build its engine -> (plan bytes, plugin layers)."""
    aot_plugin = plugin is not None and plugin["implementation"] == "aot"
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    names = trt.NetworkDefinitionCreationFlag.__members__
    if "STRONGLY_TYPED" in names:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if aot_plugin and "PREFER_AOT_PYTHON_PLUGINS" in names:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    hide_plugin = plugin is None and settings.backend == "tensorrt"
    if not parse_onnx(parser, onnx_path, hide_plugin):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(spec, settings.max_batch).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    if not settings.tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)           # fp32 graphs stay IEEE fp32
    if settings.backend == "tensorrt-rtx":
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, "SM" + cc.replace(".", "")),
                                      0)
    timed = settings.backend == "tensorrt"          # TensorRT-RTX: timing caches are no-ops
    if timed:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file()
                                           else b"")
        config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        detail = "; ".join(logger.messages[-3:]) or "no message"
        raise EngineError(f"TensorRT could not build the {spec.name} engine: {detail}")
    if timed:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(timing_cache) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan), _plugin_layers(trt, network)


def register_plugin(trt, manifest: Manifest, settings: BuildSettings,
                    log: Callable[[str], None]) -> dict | None:
    """Register our plugin where it can run: the full TensorRT, a plugin export."""
    if not (settings.plugin and manifest.memory_op == "plugin"
            and settings.backend == "tensorrt"):
        return None
    from infini_trt.plugins.memory_update import tensorrt_plugin

    try:
        registered = tensorrt_plugin.register(trt, (manifest.config.update_rule,))
    except tensorrt_plugin.PluginUnavailableError as exc:
        log(f"{exc}; the memory update falls back to its ONNX function")
        return None
    aot = all(registered.values())
    return {"op_type": contract.op_type(manifest.config.update_rule),
            "namespace": contract.NAMESPACE, "version": contract.VERSION,
            "implementation": "aot" if aot else "jit (the engine needs Python and infini-trt)"}


def _place(source: Path, target: Path) -> None:
    """Put a cached engine at `target` (a hard link where possible, else a copy), atomically."""
    with atomic_file(target) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
            _readable(tmp)


def build_engines(export_dir: str | Path, settings: BuildSettings, engine: str | Path | None = None,
                  log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Build (or take from the cache) one engine per graph; record them in the manifest.

    `engine`: the segment graph's engine file [default: <export>/engines/<backend>-sm<XY>-
    b<max batch>.engine]; the other graphs' engines go beside it as <stem>.<graph>.engine.
    Returns the manifest entry.
    """
    from infini_trt.runtime.artifacts import file_sha256, verify_export
    from infini_trt.runtime.export_cache import cache_root

    manifest = read_manifest(export_dir)
    verify_export(manifest)
    if settings.max_batch < 1:
        raise EngineError("--max-batch must be at least 1")
    if manifest.quantization:
        # MatMulNBits is an ONNX Runtime contrib op: no TensorRT parser takes it.
        raise EngineError(f"{manifest.path} holds {manifest.precision} weights for ONNX Runtime "
                          f"(export --quantize); build engines from an export without "
                          f"--quantize (TensorRT takes fp32, fp16 or bf16)")
    if manifest.decode_attention != "portable":
        # GroupQueryAttention is an ONNX Runtime contrib op too
        raise EngineError(f"{manifest.path} decodes with ONNX Runtime's GroupQueryAttention "
                          f"(export --decode-attention {manifest.decode_attention}); build "
                          f"engines from an export with --decode-attention portable")
    trt = import_backend(settings.backend)
    version = trt.__version__
    cc, gpu_name = resolve_target(trt, settings)
    if settings.backend == "tensorrt":
        from infini_trt.plugins.memory_update import tensorrt_plugin

        tensorrt_plugin.set_target_arch(int(cc.replace(".", "")))
    plugin = register_plugin(trt, manifest, settings, log)
    segment = Path(engine) if engine else (
        manifest.path / "engines" / f"{settings.backend}-sm{cc.replace('.', '')}-"
                                    f"b{settings.max_batch}.engine")
    root = cache_root()
    timing = root / "timing" / f"{settings.backend}-{version}-sm{cc.replace('.', '')}.cache"
    files: dict[str, Any] = {}
    for name in manifest.graphs:
        spec = manifest.graph(name)
        target = segment if name == "segment" else segment.with_name(
            f"{segment.stem}.{name}{segment.suffix or '.engine'}")
        key = engine_key(manifest, name, settings, version)
        cached = root / "engines" / key / f"{name}.engine"
        meta_file = cached.with_suffix(".json")
        started = time.perf_counter()
        meta = _cached_meta(meta_file)
        hit = meta is not None and cached.is_file() and file_sha256(cached) == meta["sha256"]
        if hit:
            log(f"{name}: engine cache hit ({key})")
        else:
            log(f"{name}: building ({settings.backend} {version}, sm{cc.replace('.', '')}, "
                f"batch <= {settings.max_batch}) ...")
            plan, plugin_layers = build_serialized(trt, manifest.graph_file(name), spec,
                                                   settings, cc, timing, plugin)
            cached.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(cached) as tmp:
                tmp.write_bytes(plan)
                _readable(tmp)
            meta = {"plugin_layers": plugin_layers, "sha256": file_sha256(cached),
                    "build_s": round(time.perf_counter() - started, 3)}
            with atomic_file(meta_file) as tmp:
                tmp.write_text(json.dumps(meta))
        _place(cached, target)
        expected = custom_nodes(manifest.graph_file(name)) if plugin is not None else 0
        if meta["plugin_layers"] != expected:
            raise EngineError(f"the {name} engine has {meta['plugin_layers']} plugin layers for "
                              f"{expected} memory-update nodes: TensorRT {version} inlined the "
                              f"ONNX function instead of using the plugin")
        files[name] = {"file": _relative(target, manifest.path), "key": key,
                       "sha256": sha256_file(target), "bytes": target.stat().st_size,
                       "plugin_layers": meta["plugin_layers"], "build_s": meta["build_s"],
                       "cached": hit,
                       "profile": profile_shapes(spec, settings.max_batch)}
    entry = {"backend": settings.backend, "tensorrt": version, "compute_capability": cc,
             "gpu": gpu_name, "max_batch": settings.max_batch, "plugin": plugin,
             "settings": settings.to_dict(), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "graphs": files}
    record_engine(manifest, files["segment"]["file"], entry)
    return entry


def _cached_meta(meta_file: Path) -> dict | None:
    """The record of a cached engine, or None where there is none or it is unreadable (the
    engine is then built again)."""
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and {"sha256", "plugin_layers", "build_s"} <= set(meta) \
        else None


def custom_nodes(onnx_path: Path) -> int:
    """How many memory-update nodes a graph has (each should become one plugin layer)."""
    import onnx

    model = onnx.load(os.fspath(onnx_path), load_external_data=False)
    return sum(node.domain == contract.NAMESPACE for node in model.graph.node)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


def record_engine(manifest: Manifest, name: str, entry: dict[str, Any]) -> None:
    """Add or replace `manifest.engines[name]` and rewrite the manifest atomically."""
    manifest.engines[name] = entry
    with atomic_file(manifest.path / MANIFEST_FILE) as tmp:
        tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
        _readable(tmp)


def _readable(path: Path) -> None:
    """rw-r--r-- less the umask (temporary files are created rw-------)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


# ---- loading ---------------------------------------------------------------------------------
def select_engine(manifest: Manifest, engine: str | Path | None = None,
                  prefer: Callable[[dict], bool] = lambda entry: True
                  ) -> tuple[str, dict[str, Any]]:
    """The manifest entry of `engine` (a path or entry name), else the newest one, among
    those that `prefer` accepts if any does."""
    if not manifest.engines:
        raise EngineError(f"{manifest.path} has no engine; build one with "
                          f"`infini-trt build {manifest.path}`")
    if engine is None:
        entries = [kv for kv in manifest.engines.items() if prefer(kv[1])] or \
            list(manifest.engines.items())
        return max(entries, key=lambda kv: kv[1].get("built_at", ""))
    wanted = {str(engine), _relative(Path(engine), manifest.path)}
    for name, entry in manifest.engines.items():
        if name in wanted or entry["graphs"]["segment"]["file"] in wanted:
            return name, entry
    raise EngineError(f"{engine} is not an engine of {manifest.path} (it has: "
                      f"{', '.join(manifest.engines)}); build it with `infini-trt build`")


def engine_file(manifest: Manifest, entry: dict[str, Any], graph: str) -> Path:
    if graph not in entry["graphs"]:
        raise EngineError(f"the engine has no {graph} graph; rebuild it with `infini-trt build`")
    path = Path(entry["graphs"][graph]["file"])
    path = path if path.is_absolute() else manifest.path / path
    if not path.is_file():
        raise EngineError(f"engine file {path} is missing; rebuild with `infini-trt build`")
    return path


def check_engine(entry: dict[str, Any], trt_version: str, device: tuple[str, str] | None,
                 where: str = "engine") -> None:
    """One clear line if the engine was built for another TensorRT or GPU than these."""
    if entry["tensorrt"] != trt_version:
        raise EngineError(f"{where} was built with {entry['backend']} {entry['tensorrt']} and "
                          f"this is {trt_version}; rebuild it with `infini-trt build`")
    if device is None:
        raise EngineError(f"{where} runs on a CUDA GPU (compute capability "
                          f"{entry['compute_capability']}) and none is visible")
    if device[1] != entry["compute_capability"]:
        raise EngineError(f"{where} was built for compute capability "
                          f"{entry['compute_capability']} and this GPU ({device[0]}) is "
                          f"{device[1]}; rebuild it with `infini-trt build` here")
