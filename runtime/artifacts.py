"""Checking that the files loaded are the files their manifest describes.

An export's manifest records the sha256 of every graph file and of the checkpoint it was made
from. Before a graph is loaded, or a checkpoint is run in an export's place, its hash is
compared with the record: a graph swapped for another model's, a truncated copy, or a
checkpoint retrained since the export is refused with what to do, instead of being run.

Hashing a large file takes a while (~1 s per GB), so a file's hash is remembered with its
size, inode, mtime and ctime (in the cache directory): a file whose stamp has not changed is
not hashed again. ctime cannot be set back by a user (`cp -p` and `touch` change it), so a
replaced file always gets hashed.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from infini_trt.export.errors import InfiniTrtError
from infini_trt.export.files import sha256_file
from infini_trt.export.manifest import MANIFEST_FILE, Manifest

_memo: dict[tuple, str] = {}


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def _stamp_file(stamp: tuple) -> Path:
    from .export_cache import cache_root

    name = hashlib.sha256(stamp[0].encode()).hexdigest()[:24]
    return cache_root() / "hashes" / f"{name}.json"


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, hashed again only when its stamp changed."""
    path = Path(path)
    stamp = _stamp(path)
    if stamp in _memo:
        return _memo[stamp]
    record = None
    try:
        record = json.loads(_stamp_file(stamp).read_text())
    except (OSError, ValueError, InfiniTrtError):
        pass
    if isinstance(record, dict) and tuple(record.get("stamp", ())) == stamp:
        digest = record["sha256"]
    else:
        digest = sha256_file(path)
        try:                                       # a read-only cache only costs time
            from infini_trt.export.files import atomic_file

            target = _stamp_file(stamp)
            with atomic_file(target) as tmp:
                tmp.write_text(json.dumps({"stamp": list(stamp), "sha256": digest}))
        except (OSError, InfiniTrtError):
            pass
    _memo[stamp] = digest
    return digest


def verify_export(manifest: Manifest) -> None:
    """Raise InfiniTrtError unless every graph file has the sha256 the manifest records."""
    for path, recorded in manifest.graph_files().items():
        if not path.is_file():
            raise InfiniTrtError(f"{path} is missing from the export {manifest.path}; export "
                                 f"again")
        if file_sha256(path) != recorded:
            raise InfiniTrtError(
                f"{path} is not the file that {manifest.path / MANIFEST_FILE} describes (its "
                f"sha256 differs: changed, replaced or truncated after the export); export "
                f"again")


def export_is_intact(directory: Path) -> str | None:
    """None if `directory` is a readable export whose graphs match their hashes, else why
    not (for caches, which rebuild what is damaged)."""
    from infini_trt.export.manifest import read_manifest

    try:
        verify_export(read_manifest(directory))
    except InfiniTrtError as exc:
        return str(exc)
    return None


def source_checkpoint(manifest: Manifest) -> Path:
    """The checkpoint an export was made from, checked against the weights hash it recorded:
    what `--backend torch` runs for an export directory."""
    where = manifest.source.get("checkpoint")
    path = manifest.source_checkpoint
    if path is None:
        raise InfiniTrtError(f"{manifest.path} was exported from {where or 'an unknown source'}"
                             f", which is not available; give the checkpoint itself")
    from infini_trt.export.checkpoint import WEIGHTS_FILE    # imports torch: only here

    recorded = manifest.source.get("weights_sha256")
    weights = path / WEIGHTS_FILE
    if recorded and (not weights.is_file() or file_sha256(weights) != recorded):
        raise InfiniTrtError(f"the checkpoint {path} has changed since {manifest.path} was "
                             f"exported from it (its weights' sha256 differs); give the "
                             f"checkpoint itself, or export it again")
    return path
