"""Where the server keeps contexts (POST /v1/contexts): by id, as the bytes of a context file
(runtime/context.py), so that a context outlives the request, and the server, that made it.

    store = DirectoryStore("~/.cache/infini-trt/contexts", max_bytes=1 << 30)
    ctx_id = store.new_id()                 # "ctx-" and 24 hex digits, random
    size = store.put(ctx_id, context)       # -> its size in bytes
    context = store.get(ctx_id)             # UnknownContext (a KeyError) when it is not there
    store.info(ctx_id)                      # {"tokens", "bytes", "created"}
    store.delete(ctx_id)                    # -> whether there was one

`ContextStore` turns contexts into bytes and back (Context.to_bytes / from_bytes: the
context file's own checks apply when one is read back); a store only keeps bytes by id: `_write`, `_read`, `_remove`, `_created`,
`_ids` and `_usage`. `DirectoryStore` keeps each as `<id>.ctx` in a directory, a context file
that `infini-trt run --state` reads as it is. A shared store (Redis, Ray: one store for
several servers) is another subclass of the same few methods.
"""
from __future__ import annotations

import abc
import contextlib
import os
import re
import secrets
import tempfile
import threading
import time
from pathlib import Path

from infini_trt.export.errors import InfiniTrtError, InputError

from ..context import Context

ID_PREFIX = "ctx-"
ID_PATTERN = re.compile(r"ctx-[0-9a-f]{24}")
SUFFIX = ".ctx"
STALE_TEMP_S = 3600             # a temporary file this old is left over from a crash


class UnknownContext(KeyError):
    """No context has this id (or the id is not one this store could have made)."""

    def __str__(self) -> str:                  # KeyError's would quote the message
        return str(self.args[0]) if self.args else ""


class ContextStoreError(InfiniTrtError):
    """The store cannot keep a context (a full disk, a context larger than the store)."""


def default_store_path() -> Path:
    """$INFINI_TRT_CACHE/contexts, else ~/.cache/infini-trt/contexts (beside the exports)."""
    from ..export_cache import cache_root

    return cache_root() / "contexts"


def is_context_id(ctx_id) -> bool:
    return isinstance(ctx_id, str) and ID_PATTERN.fullmatch(ctx_id) is not None


class ContextStore(abc.ABC):
    """Contexts by id. Safe to call from several threads at once."""

    def __init__(self):
        self._lock = threading.RLock()

    @staticmethod
    def new_id() -> str:
        return ID_PREFIX + secrets.token_hex(12)

    # contexts ----------------------------------------------------------------------------
    def put(self, ctx_id: str, context: Context) -> int:
        """Keep `context` as `ctx_id` (replacing one of that id) -> its size in bytes. Raises
        InputError for an id this store does not make, ContextStoreError when it cannot be
        written (nothing is half-written, an old one of that id is left as it was)."""
        if not is_context_id(ctx_id):
            raise InputError(f"{ctx_id!r} is not a context id ({ID_PREFIX} and 24 hex digits)")
        data = context.to_bytes()
        with self._lock:
            self._write(ctx_id, data)
        return len(data)

    def get(self, ctx_id: str) -> Context:
        """The context `ctx_id` (now the most recently used), UnknownContext when there is
        none; InputError when its bytes are damaged."""
        with self._lock:
            data = self._read(self._checked(ctx_id), touch=True)
        return Context.from_bytes(data, f"the stored context {ctx_id}")

    def delete(self, ctx_id: str) -> bool:
        """Remove `ctx_id` -> whether there was one."""
        if not is_context_id(ctx_id):
            return False
        with self._lock:
            return self._remove(ctx_id)

    def info(self, ctx_id: str) -> dict:
        """{"tokens", "bytes", "created" (unix seconds)}; reading it is not a use."""
        with self._lock:
            data = self._read(self._checked(ctx_id), touch=False)
            created = self._created(ctx_id)
        tokens = Context.from_bytes(data, f"the stored context {ctx_id}").tokens
        return {"tokens": tokens, "bytes": len(data), "created": int(created)}

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._ids())

    def usage(self) -> tuple[int, int]:
        """-> (contexts kept, their bytes)."""
        with self._lock:
            return self._usage()

    def _checked(self, ctx_id: str) -> str:
        if not is_context_id(ctx_id):
            raise UnknownContext(f"there is no context {ctx_id!r} (a context id is "
                                 f"{ID_PREFIX} and 24 hex digits)")
        return ctx_id

    # bytes: what a store implements (called under the lock, with valid ids) ----------------
    @abc.abstractmethod
    def _write(self, ctx_id: str, data: bytes) -> None:
        """Keep `data` as `ctx_id`, all of it or (raising) none of it."""

    @abc.abstractmethod
    def _read(self, ctx_id: str, touch: bool) -> bytes:
        """The bytes of `ctx_id` (UnknownContext if none); `touch`: it is being used."""

    @abc.abstractmethod
    def _remove(self, ctx_id: str) -> bool: ...

    @abc.abstractmethod
    def _created(self, ctx_id: str) -> float:
        """When `ctx_id` was put, in unix seconds."""

    @abc.abstractmethod
    def _ids(self) -> list[str]: ...

    @abc.abstractmethod
    def _usage(self) -> tuple[int, int]: ...


class DirectoryStore(ContextStore):
    """One context file `<id>.ctx` per context in `path`, which survives a restart.

    Written atomically (a temporary file beside it, flushed to disk, then renamed): a reader
    never sees half a file, a crash leaves no partial file under a context's name. Bounded:
    after a put, the least recently used contexts (by get or put) are removed until the
    contexts' bytes are at most `max_bytes`. A file's mtime is when it was put, its atime
    when it was last used; both are set here with os.utime, so the order survives a restart
    (and a filesystem mounted noatime). Other processes may share the directory: nothing is
    kept in memory but the lock of this process's threads."""

    def __init__(self, path: str | os.PathLike, max_bytes: int = 1 << 30):
        super().__init__()
        if max_bytes < 1:
            raise InputError(f"the context store's size must be at least 1 byte, got "
                             f"{max_bytes}")
        self.path, self.max_bytes = Path(path).expanduser(), int(max_bytes)
        self._last_ns = 0
        self._open()

    def __str__(self) -> str:
        return f"{self.path} (at most {self.max_bytes:,} bytes)"

    def _open(self) -> None:
        """Create the directory and show that a file can be written in it, or one line."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise InfiniTrtError(f"the context store {path} is not a directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".probe-", dir=path)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise InfiniTrtError(f"cannot write the context store {path}: "
                                 f"{exc.strerror or exc}") from None
        now = time.time()
        for entry in os.scandir(path):          # a crash's leftovers (atomic_file's names)
            if entry.name.startswith(f".{ID_PREFIX}") and ".tmp-" in entry.name:
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > STALE_TEMP_S:
                        os.unlink(entry.path)

    def file(self, ctx_id: str) -> Path:
        """The context file of `ctx_id` (a valid id: never a path outside the directory)."""
        return self.path / f"{self._checked(ctx_id)}{SUFFIX}"

    def _now_ns(self) -> int:
        """Strictly increasing in this process, so that two uses never tie."""
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
        return self._last_ns

    def _write(self, ctx_id: str, data: bytes) -> None:
        from infini_trt.export.files import atomic_file

        if len(data) > self.max_bytes:
            raise ContextStoreError(f"the context is {len(data):,} bytes, more than the "
                                    f"store holds ({self.max_bytes:,}, --context-store-bytes)")
        target = self.file(ctx_id)
        try:
            with atomic_file(target) as tmp:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as exc:
            raise ContextStoreError(f"cannot write the context {ctx_id} to {self.path}: "
                                    f"{exc.strerror or exc}") from None
        now = self._now_ns()
        os.utime(target, ns=(now, now))
        self._evict(keep=ctx_id)

    def _read(self, ctx_id: str, touch: bool) -> bytes:
        path = self.file(ctx_id)
        try:
            st = path.stat()
            data = path.read_bytes()
        except FileNotFoundError:
            raise UnknownContext(f"there is no context {ctx_id} (never made, deleted, or "
                                 f"evicted from the store)") from None
        with contextlib.suppress(FileNotFoundError):     # the kernel may move atime on a
            os.utime(path, ns=(self._now_ns() if touch else st.st_atime_ns,   # read: the
                               st.st_mtime_ns))                               # order is ours
        return data

    def _remove(self, ctx_id: str) -> bool:
        try:
            self.file(ctx_id).unlink()
        except FileNotFoundError:
            return False
        return True

    def _created(self, ctx_id: str) -> float:
        try:
            return self.file(ctx_id).stat().st_mtime
        except FileNotFoundError:
            raise UnknownContext(f"there is no context {ctx_id}") from None

    def _entries(self) -> list[tuple[int, str, int]]:
        """(last used ns, id, bytes) of every context file."""
        out = []
        for entry in os.scandir(self.path):
            ctx_id = entry.name[:-len(SUFFIX)]
            if not entry.name.endswith(SUFFIX) or not is_context_id(ctx_id):
                continue
            with contextlib.suppress(FileNotFoundError):      # removed by another process
                st = entry.stat()
                out.append((st.st_atime_ns, ctx_id, st.st_size))
        return out

    def _ids(self) -> list[str]:
        return [ctx_id for _, ctx_id, _ in self._entries()]

    def _usage(self) -> tuple[int, int]:
        entries = self._entries()
        return len(entries), sum(size for _, _, size in entries)

    def _evict(self, keep: str) -> None:
        """Remove the least recently used contexts (never `keep`) until they fit."""
        entries = sorted(self._entries())
        total = sum(size for _, _, size in entries)
        for _, ctx_id, size in entries:
            if total <= self.max_bytes:
                break
            if ctx_id != keep:
                self._remove(ctx_id)
                total -= size
