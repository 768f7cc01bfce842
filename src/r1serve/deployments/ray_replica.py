"""A replica whose process runs in a Ray actor (:mod:`.ray_executor`) instead of as our child.

Everything but the process itself is the local replica's (:class:`~.replica.Replica`): the statuses,
readiness and liveness probes, restart backoff and crash accounting, the routing target, the log.
Only spawning, following the output, re-adopting and the final clean-up differ: the process is a
:class:`~.ray_executor.RemoteProcess`, probed at the address its actor reports (host:port on its node).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, cast

from r1serve.deployments.logs import DeploymentLog, iso, now
from r1serve.deployments.ray_executor import RayExecutor, RemoteProcess, Resources, actor_name
from r1serve.deployments.replica import Replica, ReplicaPlan
from r1serve.engines.upstream import HttpClient


class _NoProcess:
    """A spawn that did not happen (Ray unreachable, no node with the resources): an immediate exit,
    so the replica's crash accounting retries it and, past the limit, makes it FAILED with the reason."""

    pid = None
    returncode = 1

    async def wait(self) -> int:
        return 1

    def terminate(self) -> None:
        pass

    def kill(self) -> None:
        pass


class RayReplica(Replica):
    def __init__(
        self,
        index: int,
        plan: ReplicaPlan,
        log_: DeploymentLog,
        client: HttpClient,
        on_change: Callable[[Replica, str], None],
        *,
        executor: RayExecutor,
        resources: Resources,
    ) -> None:
        super().__init__(index, plan, log_, client, on_change)
        self.executor = executor
        self.resources = resources
        self.actor_name = actor_name(plan.deployment, self.name)
        self._actor: Any = None  # the actor once found or made
        self._heartbeat: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        super().start()
        self._beat()

    def adopt(self, pid: int, port: int) -> None:
        super().adopt(pid, port)
        self._beat()

    def _beat(self) -> None:
        """Call the actor every few seconds while this replica is supervised, restart backoff included:
        an actor that is not called for orphan_seconds ends itself (ray_actor.py)."""

        async def run() -> None:
            while True:
                actor = self._actor
                if actor is not None:
                    with contextlib.suppress(Exception):
                        await actor.ping.remote()
                await asyncio.sleep(2.0)

        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(run(), name=f"ray-heartbeat:{self.actor_name}")

    # ------------------------------------------------------------------ the process

    def _launch(self) -> tuple[list[str], dict[str, str], dict[str, str]]:
        """argv (placeholders filled in by the actor, on its node), the replica's settings, values."""
        plan = self.plan
        if plan.command is not None:
            argv = list(plan.command)
        else:
            argv = ["{python}", "-m", "r1serve", "serve", "--model", plan.model, "--host", "{host}", "--port", "{port}"]
        env = {
            "R1SERVE_MODELS_DIR": str(plan.models_dir),
            "R1SERVE_DATA_DIR": str(plan.directory / self.name / "data"),
            "R1SERVE_N_THREADS": str(plan.threads),
            "PYTHONUNBUFFERED": "1",
        }  # no lease file: the detached actor, not a lease, keeps the process alive across an r1serve restart
        return argv, env, {"model": plan.model, "threads": str(plan.threads)}

    async def _spawn(self, port: int) -> asyncio.subprocess.Process:
        argv, env, values = self._launch()
        workdir = str(self.plan.directory / self.name)
        self._spawn_seq = self.log.last_seq
        self._say(f"starting {self.name} in Ray actor {self.actor_name} ({self._resources_text()})")
        try:
            actor = self._actor = await self.executor.actor(
                self.actor_name, argv, env, workdir, values, self.resources, self.plan.orphan_seconds
            )
            # Pending until Ray finds a node with the resources: bounded by the readiness timeout.
            info: dict[str, Any] = await asyncio.wait_for(actor.spawn.remote(), self.plan.ready_timeout)
        except Exception as exc:
            why = (
                f"Ray placed no actor within {self.plan.ready_timeout:g}s ({self._resources_text()})"
                if isinstance(exc, TimeoutError)
                else f"{type(exc).__name__}: {exc}"
            )
            with contextlib.suppress(Exception):
                await self.executor.remove(self.actor_name)
            self.log.write(self.name, f"could not start: {why}"[:2000])
            return cast(asyncio.subprocess.Process, _NoProcess())
        proc = RemoteProcess(actor, info)
        self.host, self.port = proc.host, proc.port
        self._say(f"{self.name}: process {proc.pid} on {proc.host}:{proc.port} (Ray actor {self.actor_name})")
        return cast(asyncio.subprocess.Process, proc)

    async def _pump(self, proc: asyncio.subprocess.Process) -> None:
        if isinstance(proc, RemoteProcess):
            await self._pump_from(proc.output(0))

    def _resources_text(self) -> str:
        r = self.resources
        text = f"num_cpus={r.num_cpus:g}, num_gpus={r.num_gpus:g}"
        return text + (f", accelerator_type={r.accelerator_type}" if r.accelerator_type else "")

    # ------------------------------------------------------------------ re-adoption

    async def _run_adopted(self, pid: int, port: int) -> bool:
        """Take back the process in the actor of this replica's name, if it is the one recorded
        (same pid and port) and answers /health; False (start afresh) otherwise."""
        try:
            actor = await self.executor.find(self.actor_name)
            info: dict[str, Any] | None = await actor.info.remote() if actor is not None else None
        except Exception as exc:
            self._say(f"{self.name}: cannot reach Ray actor {self.actor_name}: {exc}")
            return False
        if info is None or info["pid"] != pid or info["port"] != port or info["returncode"] is not None:
            self._say(f"{self.name}: no live process {pid} in Ray actor {self.actor_name}: starting afresh")
            return False
        self.host, self.port = info["host"], port
        if not await self._probe(timeout=5.0):
            self._say(f"{self.name}: process {pid} on {self.host}:{port} does not answer /health: restarting it")
            return False  # _run_once's spawn ends it before starting the next
        self._actor = actor
        proc = RemoteProcess(actor, info)
        self._proc = cast(asyncio.subprocess.Process, proc)
        self.pid, self.started_at = pid, iso(now())
        pump = asyncio.create_task(self._pump_from(proc.output(int(info["size"]))))
        liveness: asyncio.Task[None] | None = None
        try:
            await self._add_target()
            self._say(f"{self.name}: re-adopted process {pid} on {self.host}:{port} (Ray actor {self.actor_name})")
            self._set("READY", f"re-adopted process {pid} on {self.host}:{port}")
            liveness = asyncio.create_task(self._liveness())
            code = await proc.wait()
            if not self._stopping:
                self.last_error = f"the re-adopted process exited ({proc.note or f'code {code}'})"
                self._say(f"{self.name} (pid {pid}) {self.last_error}")
        finally:
            if liveness is not None:
                liveness.cancel()
            if not self._stopping:
                await self._drop_target()
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(pump, 2.0)
        return True

    # ------------------------------------------------------------------ the end

    async def stop(self, grace: float) -> None:
        """As a local replica's stop, then the actor goes too: its resources return to the cluster."""
        await super().stop(grace)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        proc = self._proc
        if isinstance(proc, RemoteProcess):
            proc.close()
        try:
            await self.executor.remove(self.actor_name)
        except Exception as exc:
            self._say(f"{self.name}: removing Ray actor {self.actor_name} failed: {exc}")

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "host": self.host, "executor": "ray", "actor": self.actor_name}
