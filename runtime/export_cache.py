"""The export cache: exports made on demand and kept, keyed by everything that determines their
bytes (weights and config hashes, dtype, memory op, opset, quantization, tool versions).

One mechanism for every kind of export (`cached`): an entry is used only after its graphs
match their hashes, a damaged one (a truncated file, an interrupted copy) is made again, and
a lock per entry lets processes that need the same export at once make it once: the others
wait and then use it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path
from typing import Callable, Iterator

from infini_trt.export.files import cache_root, exporter_code_hash
from infini_trt.export.manifest import MANIFEST_FILE, package_version


def _key(parts: dict) -> str:
    parts = {**parts, "code": exporter_code_hash(), "infini-trt": package_version("infini-trt"),
             "torch": package_version("torch"), "onnx": package_version("onnx"),
             "onnxruntime": package_version("onnxruntime") if parts.get("quantize") else None}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def export_key(checkpoint: Path, dtype: str | None, memory_op: str, opset: int,
               quantize: str | None = None, decode_attention: str = "portable") -> str:
    from infini_trt.export.checkpoint import CONFIG_FILE, WEIGHTS_FILE

    from .artifacts import file_sha256

    return _key({"weights": file_sha256(checkpoint / WEIGHTS_FILE),
                 "config": file_sha256(checkpoint / CONFIG_FILE), "dtype": dtype,
                 "memory_op": memory_op, "opset": opset, "quantize": quantize,
                 "decode_attention": decode_attention})


@contextlib.contextmanager
def _entry_lock(target: Path, say: Callable[[str], None]) -> Iterator[None]:
    """An exclusive lock on one cache entry (a lock file beside it), held while it is
    checked and, if need be, made."""
    try:
        import fcntl
    except ImportError:                         # not POSIX: no lock, the atomic rename stays
        yield
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another infini-trt process that is making {target} ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached(kind: str, key: str, make: Callable[[Path], object], what: str,
           log: Callable[[str], None] | None = None) -> Path:
    """The cache entry `kind/key`, made with make(target) unless an intact one is there."""
    from .artifacts import export_is_intact

    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    target = cache_root() / kind / key
    with _entry_lock(target, say):
        present = (target / MANIFEST_FILE).is_file()
        damage = export_is_intact(target) if present else None
        if present and damage is None:
            return target
        if present:
            say(f"the cached export {target} is damaged ({damage.split(';')[0]}); making it "
                f"again")
        say(f"{what} to {target} (cached for next time) ...")
        make(target)
    return target


def cached_export(checkpoint: str | Path, dtype: str | None = None, memory_op: str = "plugin",
                  opset: int = 20, log: Callable[[str], None] | None = None,
                  quantize: str | None = None, decode_attention: str = "portable") -> Path:
    """The export directory of `checkpoint` (with `quantize`: its quantized export), exporting
    it first if the cache has none. What the export says goes to `log`, by default stderr
    (stdout may be a command's JSON)."""
    from infini_trt.export.checkpoint import read_checkpoint
    from infini_trt.export.onnx_export import export_checkpoint

    ckpt = read_checkpoint(checkpoint)
    key = export_key(ckpt.path, dtype, memory_op, opset, quantize, decode_attention)
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    return cached("exports", key, lambda target: export_checkpoint(
        ckpt.path, target, dtype=dtype, memory_op_mode=memory_op, opset=opset, force=True,
        log=say, quantize=quantize, decode_attention=decode_attention),
        f"exporting {ckpt.path}", say)


# what a checkpoint is exported with when it is to run on ONNX Runtime's CPU provider: each
# rotation as one RotaryEmbedding node (opset 23) and GroupQueryAttention in the decoding
# graph, both ONNX Runtime's fastest (docs/design.md); for TensorRT, and for ONNX Runtime on
# CUDA (whose GroupQueryAttention takes fp16 and bf16 only), the portable graphs at opset 20
ORT_CPU_EXPORT = {"opset": 23, "decode_attention": "gqa"}


def export_settings(backend: str, device: str | None = None) -> dict:
    """The `cached_export` settings for running on `backend` (and `device`, for
    onnxruntime: CUDA where it has it, as its runner picks)."""
    if backend != "onnxruntime":
        return {}
    from infini_trt.export.errors import InfiniTrtError

    from .runners.ort_runner import import_onnxruntime, providers_for

    try:
        _, runs_on = providers_for(import_onnxruntime(), device)
    except InfiniTrtError:                   # the runner says what is missing
        return {}
    return dict(ORT_CPU_EXPORT) if runs_on == "cpu" else {}


def cached_quantized(export_dir: str | Path, method: str,
                     log: Callable[[str], None] | None = None) -> Path:
    """The quantized copy (`method`) of an fp32 export directory, made once and cached."""
    from infini_trt.export.manifest import read_manifest
    from infini_trt.export.quantize import quantize_export

    from .artifacts import verify_export

    manifest = read_manifest(export_dir)
    verify_export(manifest)
    key = _key({"manifest": (Path(export_dir) / MANIFEST_FILE).read_text(),
                "quantize": method})
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    return cached("exports", key, lambda target: quantize_export(
        export_dir, target, method, force=True, log=say),
        f"quantizing {export_dir} ({method})", say)
