"""One replica: a supervised ``r1serve serve`` child process on a free loopback port.

Its life: PENDING -> STARTING (spawned, probing ``/health``) -> READY (a gateway target, takes traffic)
-> DRAINING (out of routing, in-flight requests finish) -> STOPPED. A crash restarts it with
exponential backoff; ``crash_limit`` crashes within ``crash_window`` seconds make it FAILED. A READY
replica whose ``/health`` stops answering is NOT_READY (out of routing) until it answers again.

A killed r1serve's replicas live on for ``orphan_seconds`` (the supervisor's lease, see
:mod:`.adoption`): a restarted r1serve re-adopts those still alive, ours and healthy (:meth:`Replica.adopt`),
and starts the others afresh; past that time a replica ends itself, so no orphan holds a port for good.
Its output goes to a file the supervisor follows (a pipe would break when r1serve dies).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from r1serve.deployments.adoption import alive, follow, is_ours, wait_gone
from r1serve.deployments.logs import DeploymentLog, iso, now, pump
from r1serve.deployments.spec import ReplicaStatus
from r1serve.deployments.templates import expand
from r1serve.engines.upstream import HttpClient, Timeouts, UpstreamConfig, UpstreamEngine
from r1serve.gateway.group import CircuitBreaker, Target

log = logging.getLogger("r1serve.deployments")

_LIVENESS_INTERVAL = 5.0
_LIVENESS_FAILURES = 3  # consecutive failed checks before a READY replica is NOT_READY


@dataclass(frozen=True)
class ReplicaPlan:
    """What every replica of one deployment runs."""

    deployment: str  # the deployment's name
    model: str  # catalog id or GGUF path, as ``r1serve serve --model`` takes it
    model_id: str  # the id the child serves it under
    threads: int
    models_dir: Path
    directory: Path  # the deployment's own directory: replica data dirs live here
    crash_limit: int
    crash_window: float
    ready_timeout: float
    lease_file: Path | None = None  # the supervisor's lease: the replica ends itself when it grows old
    orphan_seconds: float = 30.0
    # The command engine's argv (placeholders unexpanded); None: an ``r1serve serve`` child.
    command: tuple[str, ...] | None = None
    readiness_path: str = "/health"  # probed for readiness and liveness


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec (command engine only)
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Replica:
    def __init__(
        self,
        index: int,
        plan: ReplicaPlan,
        log_: DeploymentLog,
        client: HttpClient,
        on_change: Callable[[Replica, str], None],
    ) -> None:
        self.index = index
        self.name = f"replica-{index}"
        self.plan = plan
        self.log = log_
        self.client = client
        self.on_change = on_change  # (replica, reason): routing and the deployment's status follow
        self.status: ReplicaStatus = "PENDING"
        self.port: int | None = None
        self.host = "127.0.0.1"  # where the process listens: a Ray replica's node (ray_replica.py)
        self.pid: int | None = None
        self.restarts = 0
        self.target: Target | None = None
        self.last_error: str | None = None
        self.started_at: str | None = None
        self._crashes: deque[float] = deque()
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._requests_before = 0  # requests served by earlier processes of this replica
        self._spawn_seq = 0  # the log's last line before this process started
        self._adopted: int | None = None  # the pid of a re-adopted process (not our child: no Process)

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"{self.plan.deployment}:{self.name}")

    def adopt(self, pid: int, port: int) -> None:
        """Take back the process a previous r1serve started, if it is still ours and healthy; else
        start afresh (r1serve restarted)."""
        self._stopping = False
        self._task = asyncio.create_task(self._run((pid, port)), name=f"{self.plan.deployment}:{self.name}")

    async def stop(self, grace: float) -> None:
        """Out of routing, let in-flight requests finish (up to ``grace`` seconds), end the process."""
        self._stopping = True
        if self.status in ("READY", "NOT_READY", "STARTING"):
            self._set("DRAINING", "draining")
        target = self.target
        if target is not None:
            deadline = time.monotonic() + grace
            while target.stats.outstanding > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        await self._end_process()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._drop_target()
        if self.status != "FAILED":
            self._set("STOPPED", "stopped")

    # ------------------------------------------------------------------ the supervising loop

    async def _run(self, adopt: tuple[int, int] | None = None) -> None:
        while not self._stopping:
            if adopt is not None:
                pid, port = adopt
                adopt = None
                if not await self._run_adopted(pid, port):
                    continue  # not there, not ours or not healthy: start afresh, no crash counted
            else:
                await self._run_once()
            if self._stopping:
                return
            stamp = time.monotonic()
            self._crashes.append(stamp)
            while self._crashes and stamp - self._crashes[0] > self.plan.crash_window:
                self._crashes.popleft()
            if len(self._crashes) >= self.plan.crash_limit:
                self._set(
                    "FAILED",
                    f"crashed {len(self._crashes)} times within {self.plan.crash_window:g}s: {self.last_error}",
                )
                return
            delay = min(30.0, 2.0 ** (len(self._crashes) - 1))
            self.restarts += 1
            self._say(f"restarting {self.name} in {delay:g}s (restart {self.restarts})")
            self._set("PENDING", f"restarting after: {self.last_error}")
            await asyncio.sleep(delay)

    async def _run_once(self) -> None:
        """One process, from spawn to exit (or to a failed readiness probe, which kills it)."""
        self.port = free_port()
        self._proc = proc = await self._spawn(self.port)
        self.pid = proc.pid
        self.started_at = iso(now())
        self._set("STARTING", f"process {proc.pid} on port {self.port}")
        pump = asyncio.create_task(self._pump(proc))
        liveness: asyncio.Task[None] | None = None
        try:
            if await self._wait_ready(proc):
                await self._add_target()
                self._set("READY", "readiness probe passed")
                liveness = asyncio.create_task(self._liveness())
            code = await proc.wait()
            if not self._stopping:
                # The child's last words usually say why (a model that cannot be fetched, a bad flag).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(pump), 2.0)
                last = self.log.lines(source=self.name, limit=1)
                said = f": {last[0].text[:1000]}" if last and last[0].seq > self._spawn_seq else ""
                self.last_error = f"exited with {_exit_text(code)}{said}"
                self._say(f"{self.name} (pid {proc.pid}) {self.last_error}")
        finally:
            if liveness is not None:
                liveness.cancel()
            if not self._stopping:
                await self._drop_target()
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(pump, 2.0)

    async def _run_adopted(self, pid: int, port: int) -> bool:
        """Serve through a process the previous r1serve started until it exits; False (and nothing
        done) when there is no such process of ours or its /health does not answer."""
        data = self.plan.directory / self.name / "data"
        if not (alive(pid) and is_ours(pid, port, data)):
            self._say(f"{self.name}: process {pid} on port {port} is gone or not ours: starting afresh")
            return False
        self.port = port
        if not await self._probe(timeout=5.0):
            self._say(f"{self.name}: process {pid} on port {port} does not answer /health: ending it")
            self._adopted = pid
            await self._end_process()
            self._adopted = None
            return False
        self.pid, self._adopted, self.started_at = pid, pid, iso(now())
        gone = asyncio.ensure_future(wait_gone(pid))
        output = self._output_path()
        offset = output.stat().st_size if output.exists() else 0
        pump = asyncio.create_task(self._pump_from(follow(output, offset, gone)))
        liveness: asyncio.Task[None] | None = None
        try:
            await self._add_target()
            self._say(f"{self.name}: re-adopted process {pid} on port {port}")
            self._set("READY", f"re-adopted process {pid} on port {port}")
            liveness = asyncio.create_task(self._liveness())
            await asyncio.shield(gone)
            if not self._stopping:
                self.last_error = "the re-adopted process exited"
                self._say(f"{self.name} (pid {pid}) {self.last_error}")
        finally:
            if liveness is not None:
                liveness.cancel()
            if not self._stopping:
                await self._drop_target()
                self._adopted = None
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(pump, 2.0)
        return True

    def _output_path(self) -> Path:
        return self.plan.directory / self.name / "output.log"

    async def _spawn(self, port: int) -> asyncio.subprocess.Process:
        data = self.plan.directory / self.name
        data.mkdir(parents=True, exist_ok=True)
        # The child gets none of r1serve's own R1SERVE_* settings (its accounts, keys, port) but the
        # ones given here; its own data dir keeps its accounts database apart from the parent's.
        env = {k: v for k, v in os.environ.items() if not k.startswith("R1SERVE_")}
        env.update(
            R1SERVE_MODELS_DIR=str(self.plan.models_dir),
            R1SERVE_DATA_DIR=str(data / "data"),
            R1SERVE_N_THREADS=str(self.plan.threads),
            R1SERVE_DEPLOYMENT_ORPHAN_SECONDS=str(self.plan.orphan_seconds),
            PYTHONUNBUFFERED="1",
        )
        if self.plan.lease_file is not None:
            env["R1SERVE_DEPLOYMENT_LEASE_FILE"] = str(self.plan.lease_file)
        if self.plan.command is not None:
            cmd = expand(list(self.plan.command), port=port, model=self.plan.model, threads=self.plan.threads)
            self._say(f"starting {self.name}: {shlex.join(cmd)}")
            if shutil.which(cmd[0]) is None:
                # The replica's crash accounting makes it FAILED, with this as the child's last words.
                cmd = [sys.executable, "-c", f"import sys; sys.exit('command not found: {cmd[0]!r}')"]
        else:
            cmd = [
                sys.executable, "-m", "r1serve", "serve",
                "--model", self.plan.model, "--host", "127.0.0.1", "--port", str(port),
            ]  # fmt: skip
            self._say(f"starting {self.name}: r1serve serve --model {self.plan.model} --port {port}")
        self._spawn_seq = self.log.last_seq
        # A file, not a pipe: the child may outlive r1serve (module docstring); truncated per process.
        with open(self._output_path(), "wb") as output:
            return await asyncio.create_subprocess_exec(
                *cmd,
                cwd=data,  # a directory of its own: no developer's .env is read
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
                # A command's server knows no lease and cannot be re-adopted (it is not `r1serve serve`):
                # it dies with r1serve rather than hold its port as an orphan.
                preexec_fn=_die_with_parent if self.plan.command is not None and sys.platform == "linux" else None,
            )

    async def _pump(self, proc: asyncio.subprocess.Process) -> None:
        await self._pump_from(follow(self._output_path(), 0, proc.wait()))

    async def _pump_from(self, stream: asyncio.StreamReader) -> None:
        # In chunks, whatever the line lengths (logs.pump): readline raised on a line over its limit.
        await pump(stream, self.log, self.name)

    async def _probe(self, timeout: float = 2.0) -> bool:
        try:
            async with self.client.session.get(
                f"http://{self.host}:{self.port}{self.plan.readiness_path}",
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def _wait_ready(self, proc: asyncio.subprocess.Process) -> bool:
        deadline = time.monotonic() + self.plan.ready_timeout
        while proc.returncode is None and not self._stopping:
            if await self._probe():
                self._say(f"{self.name} is ready on port {self.port}")
                return True
            if time.monotonic() > deadline:
                self.last_error = f"not ready after {self.plan.ready_timeout:g}s"
                self._say(f"{self.name} {self.last_error}: killing it")
                proc.kill()
                return False
            await asyncio.sleep(0.25)
        return False

    async def _liveness(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(_LIVENESS_INTERVAL)
            if await self._probe(timeout=5.0):
                failures = 0
                if self.status == "NOT_READY":
                    self._set("READY", "health check passed again")
            else:
                failures += 1
                if failures >= _LIVENESS_FAILURES and self.status == "READY":
                    self._set("NOT_READY", f"{failures} health checks failed")

    async def _add_target(self) -> None:
        engine = UpstreamEngine(
            UpstreamConfig(
                name=f"{self.plan.deployment}/{self.name}",
                base_url=f"http://{self.host}:{self.port}/v1",
                model=self.plan.model_id,
                # An r1serve child sends reasoning as reasoning_content; a command's server may be any
                # (vLLM with a reasoning parser, llama.cpp with <think> in the text): auto-detected.
                dialect="reasoning_content" if self.plan.command is None else "auto",
                timeouts=Timeouts(connect=2.0),
            ),
            self.client,
        )
        # The supervisor probes the replica itself (the gateway's health loop is off); a breaker that
        # opens on the first failure keeps a dead replica out until the supervisor has restarted it.
        self.target = Target(
            f"{self.plan.deployment}/{self.name}", engine, breaker=CircuitBreaker(1, 5.0), health_interval=0
        )
        await self.target.start()

    async def _drop_target(self) -> None:
        target, self.target = self.target, None
        if target is not None:
            self._requests_before += target.stats.requests
            await target.close()

    async def _end_process(self) -> None:
        if self._adopted is not None:
            await self._end_adopted(self._adopted)
            self._adopted = None
            return
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 15.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def _end_adopted(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(wait_gone(pid), 15.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            await wait_gone(pid)

    # ------------------------------------------------------------------ state

    def _set(self, status: ReplicaStatus, reason: str) -> None:
        if status == self.status:
            return
        self.status = status
        self.on_change(self, reason)

    def _say(self, text: str) -> None:
        self.log.write("supervisor", text)

    @property
    def requests(self) -> int:
        return self._requests_before + (self.target.stats.requests if self.target else 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "port": self.port,
            "pid": self.pid,
            "restarts": self.restarts,
            "requests": self.requests,
            "outstanding": self.target.stats.outstanding if self.target else 0,
            "started_at": self.started_at,
            "last_error": self.last_error,
        }


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"
