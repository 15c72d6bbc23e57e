"""The automatic exact-prefix cache: a prompt that begins with the same tokens as an earlier
one starts from the state the earlier one had at a segment boundary, instead of reading those
tokens again (a long document sent again with another question is not re-read).

    cache = PrefixCache(store, {"model": fingerprint, "runner": description}, segment_len=64)
    keys = cache.keys(prompt)             # keys[k - 1]: the first k segments of prompt
    hit = cache.lookup(keys)              # (tokens, Context) of the longest stored, or None
    if k * n in cache.boundaries(len(prompt)):
        cache.offer(keys[k - 1], context) # kept by a writer thread, off the engine's loop
    cache.flush()                         # wait for the writes offered so far
    cache.close()                         # the same, then the writer stops

Only boundaries are kept: there the state is memory, norm and logits, no K/V rows, so it
is small (a context file; the same size after 1K or 1M tokens) and exact: the row continues
as if it had read the prefix itself. A prompt keeps its last two boundaries, so that a
document followed by any question shorter than a segment shares a boundary with the next
question about it. Keys chain a sha256 over what made the state (the model's fingerprint
and the runner's description: backend and precision, since an int8 export's state is not an
fp32 one's) and the token ids, segment by segment, so a key names one model on one backend
and one exact token prefix. Prompts that
continue a stored context (POST /v1/contexts) are not cached here: their prefix is the
context's, whose tokens the server no longer has.

The entries are contexts in a ContextStore of their own (by default a directory beside the
contexts' store, with its own byte bound and LRU eviction): they never take the place of
contexts a client made.
"""
from __future__ import annotations

import hashlib
import json
import queue
import sys
import threading

import numpy as np

from infini_trt.export.errors import InfiniTrtError

from .store import ID_PREFIX, ContextStore, ContextStoreError, UnknownContext

KEEP_LAST = 2            # boundaries kept per prompt: see the module's docstring
WRITE_QUEUE = 8          # contexts waiting to be written; more are dropped (a cache may miss)


class PrefixCache:
    def __init__(self, store: ContextStore, made_by: dict, segment_len: int,
                 keep_last: int = KEEP_LAST):
        """`made_by`: what the states depend on besides the tokens (JSON)."""
        self.store, self.segment_len, self.keep_last = store, segment_len, keep_last
        self._root = hashlib.sha256(json.dumps(made_by, sort_keys=True).encode()).digest()
        self._writes: queue.Queue = queue.Queue(WRITE_QUEUE)
        self._writer = threading.Thread(target=self._write_loop, name="infini-trt-prefixes",
                                        daemon=True)
        self._writer.start()
        self.dropped = 0                     # offers refused because the writer was behind
        self._warned = False

    def __str__(self) -> str:
        return str(self.store)

    def keys(self, prompt: np.ndarray) -> list[str]:
        """The key of each full segment prefix of `prompt`: keys[k - 1] for its first k*n
        tokens."""
        n, digest, out = self.segment_len, self._root, []
        ids = np.ascontiguousarray(prompt, dtype="<i8")
        for k in range(len(ids) // n):
            digest = hashlib.sha256(digest + ids[k * n:(k + 1) * n].tobytes()).digest()
            out.append(ID_PREFIX + digest.hex()[:24])
        return out

    def lookup(self, keys: list[str]):
        """-> (tokens, Context) for the longest prefix whose state is stored, or None. A
        damaged entry counts as a miss (and is removed)."""
        for k in range(len(keys), 0, -1):
            try:
                return k * self.segment_len, self.store.get(keys[k - 1])
            except UnknownContext:
                continue
            except ContextStoreError:             # the store is gone (a Redis): a miss
                return None
            except InfiniTrtError:
                try:
                    self.store.delete(keys[k - 1])
                except ContextStoreError:
                    return None
        return None

    def boundaries(self, prompt_tokens: int) -> set[int]:
        """The token counts at which a prompt of `prompt_tokens` keeps its state."""
        n = self.segment_len
        last = prompt_tokens // n
        return {k * n for k in range(max(1, last - self.keep_last + 1), last + 1)}

    def offer(self, key: str, context) -> bool:
        """Keep `context` under `key`, soon (on the writer's thread) -> False when the writer
        is behind and it is dropped."""
        try:
            self._writes.put_nowait((key, context))
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def flush(self) -> None:
        """Wait until the writes offered so far are done."""
        self._writes.join()

    def close(self) -> None:
        """Finish the writes offered so far, then stop the writer (once)."""
        if not self._writer.is_alive():
            return
        self._writes.put(None)
        self._writer.join()

    def _write_loop(self) -> None:
        while (item := self._writes.get()) is not None:
            key, context = item
            try:
                self.store.put(key, context)
            except Exception as exc:     # a full disk, a store gone: the cache only misses
                if not self._warned:
                    print(f"infini-trt: the prefix cache cannot keep a prompt's state: {exc}",
                          file=sys.stderr, flush=True)
                    self._warned = True
            finally:
                self._writes.task_done()
        self._writes.task_done()
