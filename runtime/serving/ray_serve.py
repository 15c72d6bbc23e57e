"""`infini-trt serve --ray`: the same server (the OpenAI API of app.py, one engine per replica)
as a Ray Serve application, for more than one machine. Ray's HTTP proxy is the one ingress; it
routes each request to any replica, so nothing a request needs may live in one replica: the
contexts and the prefix cache are in a store every replica reaches (a shared directory on one
machine, Redis across machines), and a context is a small fixed-size value, so any replica
continues any context.

    serve_on_ray(model, replicas=2, address=None, host="127.0.0.1", port=8000, **service)

Without `address` a local Ray instance is started on 127.0.0.1 (no dashboard) and stopped on
exit; with one (`auto`, `ray://HOST:PORT`) the application is deployed on that cluster and
removed on exit. Every answer carries the header `x-infini-trt-replica: <replica id> <pid>`.
Ray is the `ray` extra (`pip install "infini-trt[ray]"`), imported here only.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import signal
import sys
import threading
from pathlib import Path

from infini_trt.export.errors import InfiniTrtError, MissingDependencyError

APP_NAME = "infini-trt"
REPLICA_HEADER = "x-infini-trt-replica"     # which replica answered: "<replica id> <pid>"


def require_ray() -> None:
    """MissingDependencyError, naming the extra, where Ray Serve is not installed."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise MissingDependencyError("ray[serve]", "infini-trt serve --ray",
                                     'pip install "infini-trt[ray]"')


class ReplicaHeader:
    """ASGI middleware: every HTTP response (streams too) names the replica that made it."""

    def __init__(self, app, name: str):
        self.app, self.value = app, name.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()),
                                      (REPLICA_HEADER.encode(), self.value)]
            await send(message)

        return await self.app(scope, receive, tagged)


def replica_class():
    """The deployment's class (made here so that `ray` is imported only when it is used)."""
    import ray
    from ray import serve

    @serve.ingress()
    class InfiniTrtReplica:
        """One engine (open_service) on this replica; its FastAPI app is the ingress."""

        def __init__(self, model: str | None, backend: str, service: dict):
            from . import open_service

            service = dict(service)
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            if backend == "onnxruntime":                # one intra-op thread per core it has
                service.setdefault("threads", max(1, math.floor(cpus)))
            self._stack = contextlib.ExitStack()
            self.service = self._stack.enter_context(
                open_service(model, backend, log=lambda s: print(s, file=sys.stderr), **service))
            self.name = f"{serve.get_replica_context().replica_id.unique_id} {os.getpid()}"
            self.service.app.add_middleware(ReplicaHeader, name=self.name)

        def __serve_build_asgi_app__(self):
            return self.service.app

        def check_health(self) -> None:
            """Ray's health check: the engine's loop is running."""
            if not self.service.engine.alive:
                raise RuntimeError("the engine's loop has stopped")

        def __del__(self):
            # Ray Serve calls this when it stops the replica: streams end, the engine stops
            with contextlib.suppress(Exception):
                self._stack.close()

    return InfiniTrtReplica


def serve_on_ray(model: str | Path | None = None, replicas: int = 2, address: str | None = None,
                 host: str = "127.0.0.1", port: int = 8000, backend: str = "onnxruntime",
                 log=None, ready: threading.Event | None = None,
                 stop: threading.Event | None = None, **service) -> None:
    """Deploy `replicas` engines of `model` behind Ray Serve's proxy on host:port and serve
    until SIGTERM/SIGINT (or `stop` is set); `ready` is set once requests are answered.
    `service`: open_service's options, the same for every replica. The model is prepared
    (exported) here first, so that local replicas only open it; a directory context store
    (the default one too) is made absolute here, so that all replicas share it."""
    require_ray()
    from ..models import bundled_model
    from ..runners import prepare
    from .store import default_store_path

    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    stop = stop or threading.Event()
    model = str(Path(model).resolve()) if model is not None else str(bundled_model())
    store = service.get("context_store")
    if store is None or not _is_url(store):
        service["context_store"] = str(Path(store or default_store_path()).resolve())
        if address is not None:
            say(f"infini-trt: contexts kept in the directory {service['context_store']} of "
                f"each node; across machines share them with --context-store redis://...")
    if address is not None:
        try:
            _check_reachable(address)             # before any export: one line, at once
        except ConnectionError as exc:
            raise InfiniTrtError(f"cannot start Ray at {address}: {exc}") from None
    prepare(model, backend, log=say)

    with _Signals(stop) as signals:
        if address is None:
            _loopback_only()
        import ray
        from ray import serve

        with _ray_instance(ray, address, say):
            signals.install()
            cpus = _cpus_per_replica(ray, replicas)
            serve.start(http_options={"host": host, "port": port})
            try:
                app = serve.deployment(
                    replica_class(), name="InfiniTrt", num_replicas=replicas,
                    ray_actor_options={"num_cpus": cpus},
                    health_check_period_s=2, health_check_timeout_s=30,
                    graceful_shutdown_timeout_s=10).bind(model, backend, service)
                say(f"infini-trt: deploying {replicas} replica(s) on Ray, {cpus:g} CPU each ...")
                try:
                    serve.run(app, name=APP_NAME, route_prefix="/")
                except Exception as exc:              # a replica failed to start
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                    raise InfiniTrtError(f"the replicas did not start: {first}") from None
                say(f"infini-trt: serving '{Path(model).name}' on Ray ({replicas} replicas) at "
                    f"http://{host}:{port}/v1")
                signals.waiting.set()
                if ready is not None:
                    ready.set()
                while not stop.wait(0.5):
                    pass
                say("infini-trt: stopping the replicas ...")
            finally:
                with contextlib.suppress(Exception):
                    serve.delete(APP_NAME)
                with contextlib.suppress(Exception):
                    serve.shutdown()


def _is_url(store) -> bool:
    return isinstance(store, str) and "://" in store


def _cpus_per_replica(ray, replicas: int) -> float:
    """The CPUs each replica asks Ray for: the cluster's share per replica, whole CPUs where
    there are enough (no more than the smallest node has, so that each fits on one)."""
    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    total = sum(nodes) or 1
    share = total / replicas
    if share >= 1:
        return float(min(math.floor(share), max(1, math.floor(min(nodes or [1])))))
    return round(share, 2)


def _loopback_only() -> None:
    """Make a local Ray bind every port to 127.0.0.1. Ray replaces a loopback
    `_node_ip_address` by the machine's address (and its GCS then listens on all of them)
    unless it believes it is a single-machine instance, as on macOS and Windows: say so."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:                      # Ray already imported: it read the variable
        constants.ENABLE_RAY_CLUSTER = False


@contextlib.contextmanager
def _ray_instance(ray, address: str | None, say):
    """Ray: the cluster at `address`, or a local instance on 127.0.0.1, shut down after."""
    env = {k: v for k, v in os.environ.items() if k == "INFINI_TRT_CACHE"}
    try:
        if address is None:
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False,
                     configure_logging=False, log_to_driver=False,
                     runtime_env={"env_vars": env} if env else None)
        else:
            ray.init(address=address, configure_logging=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = "a local Ray instance" if address is None else f"Ray at {address}"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InfiniTrtError(f"cannot start {where}: {first}") from None
    try:
        yield
    finally:
        ray.shutdown()


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A HOST:PORT or ray://HOST:PORT address that nothing listens on -> ConnectionError now
    (Ray's own connect retries a dead address for minutes). `auto` is left to Ray."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout_s).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {host}:{port} "
                              f"({exc.strerror or exc})") from None


class _Signals:
    """SIGTERM and SIGINT (in the main thread) set `stop`; until `waiting` is set they also
    interrupt (KeyboardInterrupt) what is starting, so that what was started is stopped.
    `install()` again after ray.init: Ray's driver puts its own crash handler on SIGTERM.
    Off the main thread only `stop` stops serve_on_ray."""

    def __init__(self, stop: threading.Event):
        self.stop, self.waiting, self.previous = stop, threading.Event(), {}

    def _handler(self, *_):
        if not self.stop.is_set():
            self.stop.set()
            if not self.waiting.is_set():
                raise KeyboardInterrupt

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                before = signal.signal(sig, self._handler)
                self.previous.setdefault(sig, before)

    def __enter__(self):
        self.install()
        return self

    def __exit__(self, kind, *_):
        for sig, before in self.previous.items():
            signal.signal(sig, before)
        return kind is KeyboardInterrupt and self.stop.is_set()    # stopped while starting
