"""The Ray executor: each replica's process runs inside a named, detached Ray actor
(:class:`~.ray_actor.ReplicaProcess`) that Ray places on a node with the replica's resources.

* **Names.** The actor of replica ``replica-N`` of deployment ``D`` is ``r1serve/D/replica-N`` in Ray
  namespace ``r1serve``: a restarted r1serve finds it with ``ray.get_actor`` (:meth:`RayExecutor.find`).
* **Detached, with restarts.** ``lifetime="detached"``: the actor outlives the r1serve that created it
  (the local executor's lease plays that part for child processes). ``max_restarts``: Ray brings the
  actor back if its worker dies; the new instance has no process, and r1serve starts one (ray_actor.py).
* **Resources.** ``num_cpus``, ``num_gpus`` and ``accelerator_type`` of the deployment go to the actor's
  options: Ray keeps them reserved while the replica lives and places it only where they are free.
* **Ray is optional** (``pip install r1serve[ray]``): imported here only, when the executor is made.

Every call into Ray that blocks (``ray.init``, ``get_actor``, ``kill``) runs in a thread; actor method
calls are awaited as asyncio futures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from dataclasses import dataclass
from typing import Any

from r1serve.errors import R1ServeError

log = logging.getLogger("r1serve.deployments")

NAMESPACE = "r1serve"
_POLL = 0.5  # seconds between the liveness polls of a remote process


class RayUnavailable(R1ServeError):
    status = 503
    type = "server_error"
    code = "ray_unavailable"


@dataclass(frozen=True)
class Resources:
    """What Ray reserves for one replica (the deployment's ``num_cpus``, ``num_gpus``, ``accelerator_type``)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    accelerator_type: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "accelerator_type": self.accelerator_type}

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.accelerator_type:
            opts["accelerator_type"] = self.accelerator_type
        return opts


def resources_of(record: dict[str, Any]) -> Resources:
    """A deployment's per-replica resources, kept in its CREATED event (as templates.launch_of's command)."""
    for ev in record.get("events") or ():
        if ev.get("reason") == "CREATED":
            given = ev.get("resources") or {}
            return Resources(
                num_cpus=float(given.get("num_cpus", 1.0)),
                num_gpus=float(given.get("num_gpus", 0.0)),
                accelerator_type=given.get("accelerator_type"),
            )
    return Resources()


def actor_name(deployment: str, replica: str) -> str:
    return f"r1serve/{deployment}/{replica}"


class RayExecutor:
    """Connects this process to a Ray cluster (once, on first use) and manages replica actors."""

    def __init__(self, address: str | None, *, max_restarts: int = 3) -> None:
        self.address = address
        self.max_restarts = max_restarts
        self._lock = threading.Lock()
        self._cls: Any = None

    def _connect(self) -> Any:
        with self._lock:
            if self._cls is not None:
                return self._cls
            try:
                import ray
                from ray import cloudpickle

                from r1serve.deployments import ray_actor
            except ImportError as exc:
                raise RayUnavailable(
                    "The Ray executor needs Ray: pip install 'r1serve[ray]'.", code="ray_not_installed"
                ) from exc
            if not ray.is_initialized():
                _check_reachable(self.address)
                try:
                    ray.init(
                        address=self.address or "auto",
                        namespace=NAMESPACE,
                        log_to_driver=False,  # replica output reaches the deployment's log by the actor
                        logging_level=logging.WARNING,
                    )
                except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError...
                    raise RayUnavailable(
                        f"Cannot connect to the Ray cluster at {self.address or 'auto'} (R1SERVE_RAY_ADDRESS): {exc}"
                    ) from exc
            # By value: workers need not have this version of r1serve (or any) installed.
            pickler: Any = cloudpickle  # untyped
            pickler.register_pickle_by_value(ray_actor)
            self._cls = ray.remote(ray_actor.ReplicaProcess)
            return self._cls

    async def connect(self) -> None:
        await asyncio.to_thread(self._connect)

    async def find(self, name: str) -> Any | None:
        """The live actor named ``name``, or None."""
        await self.connect()
        import ray

        def get() -> Any | None:
            try:
                return ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                return None

        return await asyncio.to_thread(get)

    async def actor(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        workdir: str,
        values: dict[str, str],
        res: Resources,
        orphan_seconds: float = 0.0,
    ) -> Any:
        """The actor named ``name``: the existing one (a restarted replica keeps its slot), else a new one."""
        cls = await asyncio.to_thread(self._connect)
        found = await self.find(name)
        if found is not None:
            return found

        def create() -> Any:
            return cls.options(
                name=name,
                namespace=NAMESPACE,
                lifetime="detached",
                max_restarts=self.max_restarts,
                **res.options(),
            ).remote(argv, env, workdir, values, orphan_seconds)

        return await asyncio.to_thread(create)

    async def remove(self, name: str) -> None:
        """Kill the actor named ``name`` for good (its process dies with it), if it exists."""
        found = await self.find(name)
        if found is None:
            return
        import ray

        await asyncio.to_thread(ray.kill, found, no_restart=True)


def _check_reachable(address: str | None) -> None:
    """Fail at once when a host:port address does not accept connections: ray.init itself retries an
    unreachable cluster for minutes, in a thread nothing can interrupt."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5.0):
            pass
    except OSError as exc:
        raise RayUnavailable(
            f"Cannot connect to the Ray cluster at {address} (R1SERVE_RAY_ADDRESS): {exc.strerror or exc}"
        ) from exc


class RemoteProcess:
    """A replica process inside an actor, looking enough like ``asyncio.subprocess.Process`` (``pid``,
    ``returncode``, ``wait``, ``terminate``, ``kill``) for the replica's supervising loop to run it."""

    def __init__(self, actor: Any, info: dict[str, Any]) -> None:
        self.actor = actor
        self.instance: str = info["instance"]
        self.gen: int = info["gen"]
        self.pid: int = info["pid"]
        self.host: str = info["host"]
        self.port: int = info["port"]
        self.returncode: int | None = info["returncode"]
        self.exited = asyncio.Event()
        self.note: str | None = None  # why the process counts as gone when it has no exit code of its own
        self._poller = asyncio.create_task(self._poll(), name=f"ray-poll:{self.pid}")

    async def _poll(self) -> None:
        failures = 0
        while self.returncode is None:
            try:
                info = await self.actor.info.remote()
                failures = 0
            except Exception as exc:  # RayActorError, ActorUnavailableError: the actor died or restarts
                failures += 1
                if failures >= 3:
                    self.note = f"its Ray actor is unavailable: {type(exc).__name__}"
                    self.returncode = -9
                    break
                await asyncio.sleep(_POLL)
                continue
            if info["instance"] != self.instance or info["gen"] != self.gen:
                self.note = "its Ray actor was restarted"
                self.returncode = -9
                break
            if info["returncode"] is not None:
                self.returncode = int(info["returncode"])
                break
            await asyncio.sleep(_POLL)
        self.exited.set()

    async def wait(self) -> int:
        await self.exited.wait()
        assert self.returncode is not None
        return self.returncode

    def terminate(self) -> None:
        self._fire(self.actor.stop.remote(10.0))

    def kill(self) -> None:
        self._fire(self.actor.kill.remote())

    def _fire(self, ref: Any) -> None:
        async def run() -> None:
            with contextlib.suppress(Exception):
                await ref

        task = asyncio.get_running_loop().create_task(run())
        _fired.add(task)
        task.add_done_callback(_fired.discard)

    def close(self) -> None:
        self._poller.cancel()

    def output(self, offset: int) -> asyncio.StreamReader:
        """The process's output from ``offset`` as a stream, ending once it has exited and is read."""
        reader = asyncio.StreamReader(limit=2**24)

        async def run() -> None:
            position = offset
            try:
                while True:
                    done = self.exited.is_set()
                    try:
                        chunk: bytes = await self.actor.read.remote(self.instance, self.gen, position)
                    except Exception:
                        chunk = b""
                    if chunk:
                        position += len(chunk)
                        reader.feed_data(chunk)
                        continue
                    if done:
                        break
                    await asyncio.sleep(0.25)
            finally:
                reader.feed_eof()

        task = asyncio.get_running_loop().create_task(run(), name=f"ray-output:{self.pid}")
        _fired.add(task)
        task.add_done_callback(_fired.discard)
        return reader


_fired: set[asyncio.Task[None]] = set()
