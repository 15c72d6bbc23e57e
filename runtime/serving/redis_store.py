"""A context store in Redis, which several servers (on several machines) share: a context made
by one is continued by any other.

    store = RedisStore("redis://127.0.0.1:6379/0", max_bytes=1 << 30)   # PING, or one line
    prefixes = store.namespaced(PREFIXES, 1 << 30)      # the same Redis, keys of its own

Keys, under a namespace (CONTEXTS, "infini-trt:contexts:", by default):

    <ns><id>      a string: the context file's bytes (runtime/context.py), all of them
    <ns>lru       a sorted set: id -> its last use, on <ns>clock
    <ns>clock     an integer: one tick per put or get, of every client (no clocks to agree on)
    <ns>bytes     a hash: id -> the size of its bytes
    <ns>created   a hash: id -> when it was put (unix seconds, the writer's clock)
    <ns>total     an integer: the sum of <ns>bytes

Every change is one MULTI ... EXEC transaction, which Redis runs whole and alone: a put is the
SET of all the bytes, then a Lua script that updates the metadata and evicts the least
recently used (never the one just put) until the total is at most the bound; a get is the GET
and a script that moves the id to the end of the LRU order. So a reader never sees half a
context, nor metadata without its bytes, and two servers evicting at once act one after the
other: the store is never over the bound, and a put never loses its own context. (The bytes
go through SET and GET, not through the scripts: Lua would copy them twice more.)

A Redis evicting keys itself (maxmemory with an allkeys policy) may take bytes from under the
metadata: a read then finds none, and forgets the metadata. Prefer `maxmemory-policy
noeviction`: a full Redis then refuses the put (507). One Redis, not a Redis Cluster: the
scripts reach the keys of the contexts they evict, which a cluster may keep elsewhere.

redis-py is the `redis` extra (`pip install "infini-trt[redis]"`), imported when a store is made.
"""
from __future__ import annotations

import contextlib
import time
import urllib.parse

from infini_trt.export.errors import InfiniTrtError, InputError, MissingDependencyError

from .store import ContextStore, ContextStoreError, UnknownContext

CONTEXTS = "infini-trt:contexts:"
PREFIXES = "infini-trt:prefixes:"
SCHEMES = ("redis://", "rediss://")
CONNECT_TIMEOUT_S = 5
TIMEOUT_S = 30               # one command, a 1 GiB store's worth of bytes on a slow link
RETRIES = 2                  # a dropped connection is tried again, then the request fails
READ_SIZE = 1 << 20          # bytes per read from the socket: a context is ~1 MB (32 KB reads
                             # took redis-py's own parser twice as long to get one)

# KEYS: lru, clock, bytes, created, total. ARGV[1]: the namespace. Then each script's own.
_FORGET = """
local lru, clock, sizes, created, total = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local ns = ARGV[1]
local function forget(id)
  local size = tonumber(redis.call('HGET', sizes, id) or '0')
  redis.call('DEL', ns .. id)
  redis.call('ZREM', lru, id)
  redis.call('HDEL', sizes, id)
  redis.call('HDEL', created, id)
  return redis.call('DECRBY', total, size)
end
"""
# After the SET of its bytes, in the same MULTI. ARGV: ns, id, created, max bytes -> the ids
# evicted
_PUT = _FORGET + """
local id, limit = ARGV[2], tonumber(ARGV[4])
local size = redis.call('STRLEN', ns .. id)
if size == 0 then                              -- the SET before failed: nothing was kept
  forget(id)
  return {}
end
local now = tonumber(redis.call('HGET', sizes, id) or '0')
now = redis.call('INCRBY', total, size - now)
redis.call('HSET', sizes, id, size)
redis.call('HSET', created, id, ARGV[3])
redis.call('ZADD', lru, redis.call('INCR', clock), id)
local evicted = {}
while now > limit do
  local oldest = redis.call('ZRANGE', lru, 0, 1)
  local victim = oldest[1]
  if victim == id then victim = oldest[2] end
  if not victim then break end
  now = forget(victim)
  evicted[#evicted + 1] = victim
end
return evicted
"""
# After the GET of its bytes, in the same MULTI. ARGV: ns, id -> whether they were there
_USE = _FORGET + """
local id = ARGV[2]
if redis.call('EXISTS', ns .. id) == 0 then
  if redis.call('HEXISTS', sizes, id) == 1 then forget(id) end
  return 0
end
redis.call('ZADD', lru, 'XX', redis.call('INCR', clock), id)
return 1
"""
# ARGV: ns, id -> 1 if its bytes were there
_REMOVE = _FORGET + """
local id = ARGV[2]
local there = redis.call('EXISTS', ns .. id)
forget(id)
return there
"""


def is_redis_url(value) -> bool:
    """Whether a --context-store value names a Redis server rather than a directory."""
    return isinstance(value, str) and value.startswith(SCHEMES)


def shown_url(url: str) -> str:
    """`url` with its password (if any) replaced by ***, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.netloc.rsplit('@', 1)[1]}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def check_url(url: str) -> None:
    """InfiniTrtError, one line, unless `url` is redis[s]://[[USER]:PASSWORD@]HOST[:PORT][/DB]."""
    bad = f"{shown_url(url)!r} is not a Redis URL; write redis://HOST:PORT/DB"
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port                        # ValueError: not a number, out of range
    except ValueError as exc:
        raise InfiniTrtError(f"{bad} ({exc})") from None
    db = parts.path[1:] if parts.path.startswith("/") else parts.path
    if parts.scheme not in ("redis", "rediss") or not parts.hostname or port == 0 or (
            db and not db.isdigit()):
        raise InfiniTrtError(bad)


class RedisStore(ContextStore):
    """Contexts in a Redis server (see the module's docstring), bounded by `max_bytes`."""

    def __init__(self, url: str, max_bytes: int = 1 << 30, namespace: str = CONTEXTS,
                 client=None):
        """Checks `url` and that the server answers (or one line); `client`: a redis.Redis to
        share (namespaced() passes its own)."""
        super().__init__()
        if max_bytes < 1:
            raise InputError(f"the context store's size must be at least 1 byte, got "
                             f"{max_bytes}")
        self.url, self.max_bytes, self.namespace = url, int(max_bytes), namespace
        self.client = client if client is not None else self._connect(url)
        self._put = self.client.register_script(_PUT)
        self._use = self.client.register_script(_USE)
        self._drop = self.client.register_script(_REMOVE)
        self._meta = [namespace + name for name in ("lru", "clock", "bytes", "created", "total")]

    @staticmethod
    def _connect(url: str):
        try:
            import redis
            from redis.backoff import ExponentialBackoff
            from redis.retry import Retry
        except ImportError:
            raise MissingDependencyError("redis", "a Redis context store (--context-store "
                                         "redis://...)", 'pip install "infini-trt[redis]"'
                                         ) from None
        check_url(url)
        try:
            client = redis.Redis.from_url(
                url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=TIMEOUT_S,
                socket_read_size=READ_SIZE,
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), RETRIES))
            client.ping()
        except (redis.RedisError, ValueError) as exc:
            raise InfiniTrtError(f"cannot use the context store {shown_url(url)}: "
                                 f"{exc}") from None
        return client

    def namespaced(self, namespace: str, max_bytes: int) -> "RedisStore":
        """Another store on the same server and connections, under `namespace`."""
        return RedisStore(self.url, max_bytes, namespace, client=self.client)

    def __str__(self) -> str:
        return (f"{shown_url(self.url)}, keys {self.namespace}* (at most {self.max_bytes:,} "
                f"bytes)")

    def key(self, ctx_id: str) -> str:
        """The key of `ctx_id`'s bytes (a valid id)."""
        return self.namespace + self._checked(ctx_id)

    @contextlib.contextmanager
    def _reaching(self, doing: str):
        """A Redis error (gone, full, refusing) -> ContextStoreError naming what failed."""
        import redis

        try:
            yield
        except redis.RedisError as exc:
            raise ContextStoreError(f"cannot {doing} in the context store "
                                    f"{shown_url(self.url)}: {exc}") from None

    # bytes ---------------------------------------------------------------------------------
    def _write(self, ctx_id: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            raise ContextStoreError(f"the context is {len(data):,} bytes, more than the "
                                    f"store holds ({self.max_bytes:,}, --context-store-bytes)")
        with self._reaching(f"keep the context {ctx_id}"):
            pipe = self.client.pipeline(transaction=True)       # MULTI ... EXEC
            pipe.set(self.key(ctx_id), data)
            self._put(keys=self._meta, args=[self.namespace, ctx_id, repr(time.time()),
                                             self.max_bytes], client=pipe)
            pipe.execute()

    def _read(self, ctx_id: str, touch: bool) -> bytes:
        with self._reaching(f"read the context {ctx_id}"):
            if touch:
                pipe = self.client.pipeline(transaction=True)
                pipe.get(self.key(ctx_id))
                self._use(keys=self._meta, args=[self.namespace, ctx_id], client=pipe)
                data, _ = pipe.execute()
            else:
                data = self.client.get(self.key(ctx_id))
        if data is None:
            raise UnknownContext(f"there is no context {ctx_id} (never made, deleted, or "
                                 f"evicted from the store)")
        return data

    def _remove(self, ctx_id: str) -> bool:
        with self._reaching(f"remove the context {ctx_id}"):
            return bool(self._drop(keys=self._meta, args=[self.namespace, ctx_id]))

    def _created(self, ctx_id: str) -> float:
        with self._reaching(f"read the context {ctx_id}"):
            created = self.client.hget(self._meta[3], ctx_id)
        if created is None:
            raise UnknownContext(f"there is no context {ctx_id}")
        return float(created)

    def _ids(self) -> list[str]:
        with self._reaching("list the contexts"):
            return [raw.decode() for raw in self.client.zrange(self._meta[0], 0, -1)]

    def _usage(self) -> tuple[int, int]:
        with self._reaching("count the contexts"):
            count, total = self.client.pipeline(transaction=True).zcard(self._meta[0]).get(
                self._meta[4]).execute()
        return int(count), int(total or 0)
