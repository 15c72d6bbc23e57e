"""Writing outputs so that a failure never leaves a half-written file or directory behind, and
never touches what it must not: the inputs, the current directory, a symlink's target.

Every command checks its output locations before its work starts (`check_output`: the same
checks the writers make again when they write), so that an hour of work is never lost to an
output that cannot be written.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from .errors import InfiniTrtError

# an export's one file of large weights (export/weights_file.py), named here so that the
# runtime can know it without importing onnx
EXPORT_WEIGHTS_FILE = "weights.bin"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _contains(outer: Path, inner: Path) -> bool:
    """Whether `inner` is `outer` or lies inside it (both resolved)."""
    return inner == outer or outer in inner.parents


def _probe_writable(path: Path) -> None:
    """Show that a file can be made at `path`: create its missing parent directories and a
    temporary file beside it, then remove all of them again."""
    missing = []
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink():                       # a dangling link on the way
            raise InfiniTrtError(f"cannot write {path}: {parent} is a broken symbolic link")
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise InfiniTrtError(f"cannot write {path}: {parent} is not a directory")
    made = []
    try:
        for directory in reversed(missing):
            directory.mkdir()
            made.append(directory)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.probe-", dir=path.parent)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise InfiniTrtError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        for directory in reversed(made):
            with contextlib.suppress(OSError):
                directory.rmdir()


def check_output(path: str | os.PathLike, kind: str = "file", force: bool = True,
                 inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse, before any work, an output that cannot be written or must not be replaced ->
    the absolute path to write.

    kind: "file" or "dir". Refused: a symbolic link (its target would be replaced); a
    directory output that is or contains the current directory; an output that is, or
    contains, one of `inputs`; a file where a directory is wanted or the other way round; a
    non-empty directory unless `force`; a place where nothing can be created."""
    given = Path(path)
    if str(path) == "":
        raise InfiniTrtError("the output path is empty")
    if given.is_symlink():
        raise InfiniTrtError(f"output {given} is a symbolic link; give the real path "
                             f"(its target would be replaced)")
    target = Path(os.path.abspath(given)).resolve()
    for source in inputs:
        source = Path(os.path.abspath(source)).resolve()
        if _contains(target, source):
            what = "is" if target == source else "contains"
            raise InfiniTrtError(f"output {given} {what} the input {source}; choose another "
                                 f"output")
    if kind == "dir":
        cwd = Path.cwd().resolve()
        if _contains(target, cwd):
            where = "is" if target == cwd else "contains"
            raise InfiniTrtError(f"output {given} {where} the current directory; choose a new "
                                 f"directory to write")
        if target.exists() and not target.is_dir():
            raise InfiniTrtError(f"output path {given} exists and is not a directory")
        if target.is_dir() and any(target.iterdir()) and not force:
            raise InfiniTrtError(f"output directory {given} is not empty (use --force to "
                                 f"replace it)")
    elif target.is_dir():
        raise InfiniTrtError(f"output {given} is a directory; give a file name")
    _probe_writable(target)
    return target


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False,
               inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `path`; on success it replaces `path`.

    On any exception (SIGTERM included: the CLI turns it into one) the temporary directory is
    removed and `path` is left as it was. `inputs` are refused as outputs (`check_output`)."""
    target = check_output(path, "dir", force, inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())          # mkdtemp makes 0700; outputs get the usual mode
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, target)


def _replace_dir(new: Path, target: Path) -> None:
    """Put `new` in the place of `target`: the old one is moved aside first and deleted only
    once the new one is in place, so that a crash between the two leaves one of them whole."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "previous")
    try:
        os.replace(new, target)
    except OSError:
        if old is not None:
            os.replace(old / "previous", target)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()
                ) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; on success it is renamed to `path`.

    When the block fails or the rename does (the error goes on as it came), the temporary
    file is removed and `path` is left as it was."""
    target = check_output(path, "file", inputs=inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_umask())      # mkstemp makes 0600 (and writers that replace the
        os.replace(tmp, target)           # file, as safetensors does, keep that)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def inside(directory: str | os.PathLike, name: str) -> Path:
    """`directory / name` for a file name read from an artifact (a manifest, a shard index),
    refused when it would lead outside `directory` (an absolute path, '..', a symlink out)."""
    root = Path(directory)
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        raise InfiniTrtError(f"{root}: the file name {name!r} is not a relative path inside it")
    path = root / name
    if not _contains(root.resolve(), path.resolve()):
        raise InfiniTrtError(f"{root}: the file name {name!r} leads outside the directory; "
                             f"refused")
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """$INFINI_TRT_CACHE, else ~/.cache/infini-trt (refused when it is not a directory)."""
    root = os.environ.get("INFINI_TRT_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "infini-trt"
    if path.exists() and not path.is_dir():
        origin = f"INFINI_TRT_CACHE={root}" if root else str(path)
        raise InfiniTrtError(f"the export cache {origin} is not a directory; point "
                             f"INFINI_TRT_CACHE at a directory")
    return path


def exporter_code_hash() -> str:
    """sha256 of the exporter's own source (export/ and plugins/): an export made by other
    code is another export, even at the same version number."""
    import infini_trt.export
    import infini_trt.plugins

    digest = hashlib.sha256()
    for package in (infini_trt.export, infini_trt.plugins):
        for root in package.__path__:
            for path in sorted(Path(root).rglob("*.py")):
                digest.update(path.read_bytes())
    return digest.hexdigest()
