"""The supervisor: every deployment of this server, its replicas, its timeout, and its record in the
database.

A deployment's routing is a gateway model group (:class:`~r1serve.gateway.group.GroupEngine`,
least outstanding first) over its READY replicas, rebuilt whenever a replica's status changes, so
requests get the gateway's retries and failover before the first byte. Its status follows its
replicas: RUNNING once every replica has been READY, ERROR when one is FAILED (INFINITE replaces it
instead); STOPPING and STOPPED are set by a stop (the API's, the timeout's), INSUFFICIENT_FUNDS by a
spent budget.

Every operation on a deployment holds its lock and checks its status first (a 409 naming it when the
operation cannot happen now). Time-driven work (timeouts, SIMPLE-EXTEND's extensions, INFINITE's
rotations, SCHEDULED's runs, cost) is done by :meth:`Supervisor.tick` against an injectable clock,
each slow piece as the deployment's one background task.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import secrets
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Protocol

from r1serve.deployments import metrics
from r1serve.deployments.adoption import LEASE_FILE, renew
from r1serve.deployments.logs import DeploymentLog, iso
from r1serve.deployments.ray_executor import RayExecutor, resources_of
from r1serve.deployments.ray_replica import RayReplica
from r1serve.deployments.replica import Replica, ReplicaPlan
from r1serve.deployments.schedule import Clock, Cron
from r1serve.deployments.spec import (
    ACTIVE,
    ALLOWED_FROM,
    Conflict,
    DeploymentCreate,
    DeploymentExtend,
    DeploymentNotFound,
    DeploymentUpdate,
    StateConflict,
    Status,
    check_replicas,
    check_resources,
    check_schedule,
    check_timeout,
    event,
    resolve_template,
    validate_create,
)
from r1serve.deployments.store import DeploymentStore
from r1serve.deployments.templates import launch_of, model_argument, parse_command, template_price
from r1serve.engines.upstream import HttpClient
from r1serve.errors import InvalidRequest, NotFound, R1ServeError
from r1serve.gateway.group import GroupEngine, Member
from r1serve.models.catalog import ModelEntry
from r1serve.routing import ServedModel
from r1serve.settings import Settings

log = logging.getLogger("r1serve.deployments")


class DeploymentBilling(Protocol):
    """Where replica-time is charged (the accounts ledger; see :mod:`.billing`)."""

    async def settle(self, supervisor: Supervisor) -> None: ...

    async def can_pay(self, supervisor: Supervisor, dep: Deployment, *, hours: float) -> bool: ...


class DeploymentStopped(NotFound):
    code = "deployment_stopped"


class InsufficientFunds(R1ServeError):
    status = 402
    type = "insufficient_quota"
    code = "insufficient_funds"


class DeploymentNotReady(R1ServeError):
    status = 503
    type = "server_error"
    code = "deployment_not_ready"


class Deployment:
    def __init__(self, record: dict[str, Any], entry: ModelEntry, supervisor: Supervisor) -> None:
        self.record = record
        self.entry = entry
        self.supervisor = supervisor
        self.log = DeploymentLog(supervisor.directory / record["id"])
        self.replicas: list[Replica] = []
        self.group: GroupEngine | None = None
        # Every operation (the API's, the timeout's, the schedule's) holds this: a start can never
        # run while a stop is still draining the replicas it would replace.
        self.lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None  # a timeout, extension or rotation under way
        self._rotation: asyncio.Task[Any] | None = None  # INFINITE's rotation, which a stop cancels
        self.successor: Replica | None = None  # a rotation's new replica while it loads (it costs too)
        self._next_index = 0

    @property
    def id(self) -> str:
        return str(self.record["id"])

    @property
    def name(self) -> str:
        return str(self.record["name"])

    @property
    def status(self) -> Status:
        return self.record["status"]  # type: ignore[no-any-return]

    @property
    def strategy(self) -> str:
        return str(self.record["strategy"])

    # ------------------------------------------------------------------ status and events

    def set_status(self, status: Status, reason: str, message: str) -> None:
        if status != self.status:
            self.record["status"] = status
        self.add_event(reason, message, status=status)

    def add_event(self, reason: str, message: str, **extra: Any) -> None:
        stamp = self.supervisor.clock.now()
        self.record["events"].append(event(iso(stamp), reason, message, **extra))
        self.record["updated_at"] = stamp
        self.log.write("supervisor", f"{reason}: {message}")
        self.supervisor.persist(self)

    def check(self, operation: str) -> None:
        """409 unless ``operation`` may happen in the current status (re-checked under the lock)."""
        if self.status == "ARCHIVED":
            raise StateConflict(
                f"The deployment `{self.name}` is ARCHIVED: it cannot {operation} any more.",
                code="deployment_archived",
            )
        if self.status not in ALLOWED_FROM[operation]:
            raise StateConflict(
                f"Cannot {operation} the deployment `{self.name}`: it is {self.status} "
                f"({operation} needs one of {', '.join(ALLOWED_FROM[operation])})."
            )

    def replica_changed(self, replica: Replica, reason: str) -> None:
        """A replica's status changed: routing, then the deployment's own status follow."""
        self._route()
        self.add_event(f"REPLICA_{replica.status}", f"{replica.name}: {reason}", replica=replica.name)
        if replica not in self.replicas:
            return  # scaled down or replaced: it no longer counts
        if self.status not in ACTIVE and self.status != "ERROR":
            return  # stopping or stopped: the replicas' states no longer move the deployment's
        if replica.status == "FAILED" and self.strategy == "INFINITE" and self.status in ACTIVE:
            self._replace(replica, f"{replica.name} failed: {replica.last_error}")
            return
        statuses = [r.status for r in self.replicas]
        if "FAILED" in statuses and self.status != "ERROR":
            self.set_status("ERROR", "ERROR", f"{replica.name} failed: {replica.last_error}")
        elif self.status == "STARTING" and all(s == "READY" for s in statuses):
            self.set_status("RUNNING", "RUNNING", f"all {len(statuses)} replicas are ready")

    def _route(self) -> None:
        members = [Member(r.target) for r in self.replicas if r.status == "READY" and r.target is not None]
        self.group = GroupEngine(self.name, members, policy="least_outstanding") if members else None

    def served(self) -> ServedModel:
        """What a request to the endpoint URL is served by (raises when nothing can serve it)."""
        if self.status in ("STOPPED", "STOPPING", "ARCHIVED", "DRAFT", "INSUFFICIENT_FUNDS"):
            raise DeploymentStopped(
                f"The deployment `{self.name}` is {self.status.lower()}; start it again with "
                f"POST /v1/deployments/{self.id}/start.",
            )
        group = self.group
        if group is None:
            raise DeploymentNotReady(
                f"The deployment `{self.name}` has no ready replica yet ({self.status}); retry shortly.",
                headers={"Retry-After": "2"},
            )
        return ServedModel(entry=self.entry, engine=group)

    # ------------------------------------------------------------------ lifetime

    def _plan(self) -> ReplicaPlan:
        settings = self.supervisor.settings
        threads = self.record["threads"] or max(1, settings.n_threads // max(1, self.record["replicas"]))
        engine = self.record["engine"]
        command, readiness = launch_of(self.record)
        model = model_argument(self.record["template"], self.entry, engine, Path(settings.models_dir))
        return ReplicaPlan(
            deployment=self.name,
            model=model,
            # A command's server knows the model by the name it was given; an r1serve child by its id.
            model_id=model if engine == "command" else self.entry.id,
            threads=threads,
            models_dir=Path(settings.models_dir),
            directory=self.supervisor.directory / self.id,
            crash_limit=settings.deployment_crash_limit,
            crash_window=settings.deployment_crash_window,
            ready_timeout=settings.deployment_ready_timeout,
            command=tuple(parse_command(command)) if engine == "command" else None,
            readiness_path=readiness,
            lease_file=self.supervisor.lease,
            orphan_seconds=settings.deployment_orphan_seconds,
        )

    def _new_replica(self, index: int | None = None) -> Replica:
        if index is None:
            used = {r.index for r in self.replicas}
            index = next(i for i in range(len(used) + 1) if i not in used)
        executor = self.supervisor.executor
        if executor is not None:  # the Ray executor: the process runs in a named actor (ray_replica.py)
            return RayReplica(
                index, self._plan(), self.log, self.supervisor.client, self.replica_changed,
                executor=executor, resources=resources_of(self.record),
            )  # fmt: skip
        replica = Replica(index, self._plan(), self.log, self.supervisor.client, self.replica_changed)
        return replica

    def start(
        self,
        reason: str,
        message: str,
        *,
        expires: dt.datetime | None = None,
        adopt: list[dict[str, Any]] | None = None,
    ) -> None:
        """Spawn the replicas; the timeout counts from now unless ``expires`` keeps an earlier deadline.
        ``adopt``: the replicas a previous r1serve ran (pid, port), taken back if still alive and ours."""
        stamp = self.supervisor.clock.now()
        expires = expires or stamp + dt.timedelta(minutes=float(self.record["timeout_minutes"]))
        self.record["started_at"] = stamp
        self.record["expires_at"] = expires
        self.record["billed_until"] = stamp
        self.set_status("STARTING", reason, f"{message}; {self.record['replicas']} replicas, until {iso(expires)}")
        self.replicas = []
        previous: dict[int, tuple[int, int]] = {}
        for detail in (adopt or [])[: self.record["replicas"]]:
            if detail.get("pid") and detail.get("port") and detail.get("status") in _ADOPTABLE:
                previous[int(str(detail["name"]).rsplit("-", 1)[-1])] = (int(detail["pid"]), int(detail["port"]))
        for index in previous:
            self.replicas.append(self._new_replica(index))
        while len(self.replicas) < self.record["replicas"]:
            self.replicas.append(self._new_replica())
        if not self.replicas:
            self.set_status("RUNNING", "RUNNING", "no replicas asked for")
        for replica in self.replicas:
            if replica.index in previous:
                replica.adopt(*previous[replica.index])
            else:
                replica.start()

    async def stop(self, reason: str, message: str, *, final: Status = "STOPPED") -> None:
        """Drain and end every replica (the caller holds the lock)."""
        self.set_status("STOPPING", reason, message)
        grace = self.supervisor.settings.deployment_grace_seconds
        await asyncio.gather(*(r.stop(grace) for r in self.replicas))
        self.group = None
        self.supervisor.accrue(self)
        self.set_status(final, final, f"all replicas stopped ({reason.lower()})")

    async def shutdown(self) -> None:
        """r1serve is exiting: end the processes, keep the status so the next start brings them back."""
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._background
        self.group = None
        if self.replicas:
            self.supervisor.accrue(self)
            await asyncio.gather(*(r.stop(5.0) for r in self.replicas))
            self.supervisor.persist(self)
        self.log.close()

    # ------------------------------------------------------------------ changes while it runs

    def live(self) -> bool:
        return self.status in ACTIVE

    def has_processes(self) -> bool:
        """Replicas may be up: live, or ERROR (one failed, the others still serve), or draining."""
        return self.status in (*ACTIVE, "ERROR", "STOPPING")

    def set_timeout(self, minutes: float) -> None:
        """Raising the timeout moves a running deployment's deadline by the difference; lowering it
        applies from the next start (Nosana's rule: what runs keeps the time it was given)."""
        old = float(self.record["timeout_minutes"])
        self.record["timeout_minutes"] = minutes
        expires = self.record["expires_at"]
        if self.live() and expires is not None and minutes > old:
            self.record["expires_at"] = expires + dt.timedelta(minutes=minutes - old)
            until = iso(self.record["expires_at"])
            self.add_event("EXTENDED", f"timeout {old:g} -> {minutes:g} minutes; until {until}")
        else:
            self.add_event("TIMEOUT_CHANGED", f"timeout {old:g} -> {minutes:g} minutes (from the next start)")

    async def scale(self, replicas: int) -> None:
        """More replicas start at once; fewer drain the highest ones first (out of routing, in-flight
        requests finish within the grace period, then the process ends)."""
        old = int(self.record["replicas"])
        self.record["replicas"] = replicas
        if not self.live():
            self.add_event("SCALED", f"replicas {old} -> {replicas} (from the next start)")
            return
        self.add_event("SCALED", f"replicas {old} -> {replicas}")
        while len(self.replicas) < replicas:
            replica = self._new_replica()
            self.replicas.append(replica)
            replica.start()
        extra = sorted(self.replicas, key=lambda r: r.index)[replicas:]
        if extra:
            # Out of the list first: the deployment's status no longer follows them, routing skips them.
            self.replicas = [r for r in self.replicas if r not in extra]
            self._route()
            grace = self.supervisor.settings.deployment_grace_seconds
            await asyncio.gather(*(r.stop(grace) for r in extra))
            self.supervisor.accrue(self, extra)
        if self.status == "STARTING" and all(r.status == "READY" for r in self.replicas):
            self.set_status("RUNNING", "RUNNING", f"all {len(self.replicas)} replicas are ready")
        self.supervisor.persist(self)

    def set_schedule(self, schedule: str) -> None:
        cron = check_schedule(self.strategy, schedule)
        assert cron is not None
        self.record["schedule"] = schedule
        if self.status != "STOPPED" or self.record.get("next_run_at") is not None:
            self.record["next_run_at"] = cron.next_after(self.supervisor.clock.now())
        nxt = self.record.get("next_run_at")
        self.add_event("SCHEDULE_CHANGED", f"schedule `{schedule}`; next run {iso(nxt) if nxt else 'never'}")

    def _replace(self, old: Replica, why: str) -> None:
        """INFINITE: a fresh replica (fresh crash history) in the place of one that failed."""
        self.replicas = [self._new_replica(old.index) if r is old else r for r in self.replicas]
        new = next(r for r in self.replicas if r.index == old.index)
        self.add_event("REPLICA_REPLACED", f"{why}; a new {new.name} starts", replica=new.name)
        new.start()

    async def rotate(self) -> None:
        """INFINITE at its timeout: each replica in turn gets a successor, which must be READY before
        the old one drains, so the deployment never has fewer ready replicas than asked."""
        for old in sorted(self.replicas, key=lambda r: r.index):
            if not self.live():
                return
            new = self._new_replica()  # another index: its own data dir and log beside the old one's
            # The successor is not in self.replicas until it is ready: the old one keeps the status.
            new.on_change = self._successor_changed
            self.add_event("REPLICA_ROTATING", f"{old.name} expires: starting its successor", replica=old.name)
            self.successor = new
            new.start()
            try:
                while new.status not in ("READY", "FAILED", "STOPPED"):
                    await asyncio.sleep(0.25)
            except asyncio.CancelledError:
                await new.stop(0)  # stopped while its successor loaded: it must not outlive the stop
                raise
            finally:
                self.supervisor.accrue(self)  # its loading time, while it is still the successor
                self.successor = None
            if new.status != "READY":
                await new.stop(0)
                self.add_event("REPLICA_ROTATION_FAILED", f"{old.name}'s successor did not start: {new.last_error}")
                continue
            new.on_change = self.replica_changed
            self.replicas = [new if r is old else r for r in self.replicas]
            self._route()
            await old.stop(self.supervisor.settings.deployment_grace_seconds)
            self.supervisor.accrue(self, [old])
            self.add_event("REPLICA_ROTATED", f"{new.name} replaced its predecessor", replica=new.name)

    def _successor_changed(self, replica: Replica, reason: str) -> None:
        self.add_event(f"REPLICA_{replica.status}", f"{replica.name} (successor): {reason}", replica=replica.name)

    # ------------------------------------------------------------------ the API's view

    def as_dict(self, base_url: str | None = None) -> dict[str, Any]:
        r = self.record
        path = f"/deployments/{self.name}/v1"
        endpoint = f"{base_url.rstrip('/')}{path}" if base_url else path
        nxt = r.get("next_run_at")
        return {
            "id": r["id"],
            "object": "deployment",
            "name": r["name"],
            "template": r["template"],
            "model": self.entry.id,
            "engine": r["engine"],
            "replicas": r["replicas"],
            "strategy": r["strategy"],
            "timeout": r["timeout_minutes"],
            "schedule": r.get("schedule"),
            "next_run_at": nxt and iso(nxt),
            "threads": r["threads"],
            "executor": self.supervisor.settings.deployment_executor,
            "resources": resources_of(r).as_dict() if self.supervisor.executor is not None else None,
            "status": r["status"],
            "endpoints": [{"url": endpoint, "path": path}],
            "replicas_detail": [rep.as_dict() for rep in self.replicas] or r["replicas_detail"],
            "events": r["events"],
            "price_per_hour": self.supervisor.price_of(self),
            "cost": round(int(r.get("cost_nanos") or 0) / 1e9, 9),
            "started_at": r["started_at"] and iso(r["started_at"]),
            "expires_at": r["expires_at"] and iso(r["expires_at"]),
            "created_at": iso(r["created_at"]),
            "updated_at": iso(r["updated_at"]),
        }


class Supervisor:
    """Every deployment of this server. Created in the app's lifespan, closed at its end."""

    def __init__(
        self,
        settings: Settings,
        store: DeploymentStore,
        directory: Path | None = None,
        *,
        clock: Clock | None = None,
        billing: DeploymentBilling | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.directory = directory or Path(settings.data_dir).expanduser() / "deployments"
        self.client = HttpClient(connect_timeout=2.0)
        self.clock = clock or Clock()
        self.billing = billing
        self.deployments: dict[str, Deployment] = {}  # by id
        self._writes: asyncio.Lock | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._ticker: asyncio.Task[None] | None = None
        self.lease = self.directory / LEASE_FILE
        # None: local child processes. Ray connects on the first replica it places (ray_executor.py).
        self.executor = RayExecutor(settings.ray_address) if settings.deployment_executor == "ray" else None

    async def start(self) -> None:
        """Load every deployment; start again those that were running and whose time is not up
        (re-adopting the replicas still alive from a killed r1serve)."""
        renew(self.lease)  # first: the replicas of a killed r1serve are waiting for it
        self.client.acquire()
        self._writes = asyncio.Lock()
        metrics.watch(self)  # /metrics: replicas by state, restarts, requests, outstanding
        for record in await asyncio.to_thread(self.store.load_all):
            try:
                entry = resolve_template(record["template"], record["engine"])
            except InvalidRequest as exc:
                log.error("deployment %s: %s", record["name"], exc.message)
                continue
            dep = Deployment(record, entry, self)
            self.deployments[dep.id] = dep
            if record["status"] not in ACTIVE:
                continue
            expires = record["expires_at"]
            past = expires is not None and expires <= self.clock.now()
            if past and record["strategy"] in ("SIMPLE", "SCHEDULED"):
                dep.set_status("STOPPED", "TIMEOUT", "the timeout ran out while r1serve was down")
                continue
            if past and record["strategy"] == "INFINITE":
                expires = None  # its replicas start afresh or are re-adopted: a new period, not a rotation
            # Otherwise a restart of r1serve does not extend the timeout: the deployment keeps its
            # deadline (SIMPLE-EXTEND past its own is extended, or stopped, by the next tick).
            dep.start("RESTORED", "r1serve restarted", expires=expires, adopt=record["replicas_detail"])
        self._ticker = asyncio.create_task(self._tick_forever(), name="deployments:tick")

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        metrics.unwatch(self)
        await asyncio.gather(*(d.shutdown() for d in self.deployments.values()))
        await self.flush()
        await self.client.release()

    # ------------------------------------------------------------------ the clock's work

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.deployment_tick_seconds)
            await asyncio.to_thread(renew, self.lease)
            try:
                await self.tick()
            except Exception:
                log.exception("deployments: tick failed")

    async def tick(self) -> None:
        """Deadlines, schedules, costs and budgets, against the clock. Anything slow (a stop that
        drains, an extension's budget check, a rotation) runs as the deployment's background task."""
        now = self.clock.now()
        for dep in list(self.deployments.values()):
            if dep._background is not None and not dep._background.done():
                continue
            work = self._due(dep, now)
            if work is not None:
                dep._background = asyncio.create_task(work, name=f"deployment:{dep.name}")
        await self.settle_costs()

    async def settled(self) -> None:
        """Wait until no deployment has background work (a timeout's stop, a scheduled start) under way."""
        while True:
            tasks = [d._background for d in self.deployments.values() if d._background and not d._background.done()]
            if not tasks:
                break
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.flush()

    def _due(self, dep: Deployment, now: dt.datetime) -> Coroutine[Any, Any, None] | None:
        record = dep.record
        if dep.status == "STOPPED" and record.get("next_run_at") is not None:
            if now >= record["next_run_at"]:
                return self._scheduled_run(dep, now)
            return None
        expires = record["expires_at"]
        if expires is None or dep.status not in (*ACTIVE, "ERROR"):
            return None
        if dep.status == "ERROR":  # no extension nor rotation for it, but its timeout still ends it
            return self._expire(dep) if now >= expires else None
        lead = dt.timedelta(
            seconds=min(self.settings.deployment_extend_lead_seconds, float(record["timeout_minutes"]) * 6.0)
        )
        if dep.strategy == "INFINITE" and now >= expires - lead:
            return self._rotate(dep)
        if dep.strategy == "SIMPLE-EXTEND" and now >= expires - lead:
            return self._extend_or_stop(dep)
        if now >= expires:
            return self._expire(dep)
        return None

    async def _expire(self, dep: Deployment) -> None:
        async with dep.lock:
            if dep.status in (*ACTIVE, "ERROR"):
                await dep.stop("TIMEOUT", f"the timeout of {dep.record['timeout_minutes']:g} minutes ran out")
        await self.flush()

    async def _scheduled_run(self, dep: Deployment, now: dt.datetime) -> None:
        async with dep.lock:
            due = dep.record["next_run_at"]
            cron = Cron.parse(dep.record["schedule"])
            dep.record["next_run_at"] = cron.next_after(now)
            if dep.status != "STOPPED":
                return
            missed = due + dt.timedelta(minutes=float(dep.record["timeout_minutes"])) <= now
            if missed:  # r1serve was down for the whole run: skip it rather than run it late
                dep.add_event("SCHEDULE_MISSED", f"the run due at {iso(due)} would have ended already")
            elif await self._can_pay(dep):
                dep.start("SCHEDULED_START", f"schedule `{dep.record['schedule']}` (due {iso(due)})")
        await self.flush()

    async def _extend_or_stop(self, dep: Deployment) -> None:
        async with dep.lock:
            if not dep.live():
                return
            minutes = float(dep.record["timeout_minutes"])
            if await self._can_pay(dep, hours=minutes / 60.0, stop=False):
                expires = dep.record["expires_at"] + dt.timedelta(minutes=minutes)
                dep.record["expires_at"] = expires
                dep.add_event("EXTENDED", f"SIMPLE-EXTEND: {minutes:g} more minutes, until {iso(expires)}")
            elif self.clock.now() >= dep.record["expires_at"]:
                await dep.stop("TIMEOUT", "the timeout ran out and the owner's budget does not cover another")
        await self.flush()

    async def _rotate(self, dep: Deployment) -> None:
        # Not under the lock: a stop must not wait for successors to load. stop() cancels this task.
        dep._rotation = asyncio.current_task()
        try:
            await dep.rotate()
        finally:
            dep._rotation = None
        async with dep.lock:
            if dep.live():
                minutes = float(dep.record["timeout_minutes"])
                dep.record["expires_at"] = self.clock.now() + dt.timedelta(minutes=minutes)
                dep.add_event("ROTATED", f"every replica replaced; next rotation by {iso(dep.record['expires_at'])}")
        await self.flush()

    # ------------------------------------------------------------------ cost

    def price_of(self, dep: Deployment) -> float:
        """USD per replica-hour: the deployment's own, else its template's, else the server's default."""
        own = dep.record.get("price_per_hour")
        if own is not None:
            return float(own)
        template = template_price(dep.entry, self.settings.deployment_template_prices)
        if template is None:
            template = dep.entry.price_per_replica_hour
        return float(template) if template is not None else self.settings.deployment_price_per_hour

    def accrue(self, dep: Deployment, replicas: list[Replica] | None = None) -> None:
        """Add the replica-time since the last accrual to the deployment's cost. A replica counts
        while its process is up (starting, ready, not ready or draining)."""
        now = self.clock.now()
        since = dep.record.get("billed_until") or now
        seconds = max(0.0, (now - since).total_seconds())
        counted = dep.replicas if replicas is None else replicas
        if replicas is None and dep.successor is not None:
            counted = [*counted, dep.successor]
        running = sum(1 for r in counted if r.status in _RUNNING_REPLICA)
        if replicas is None:
            dep.record["billed_until"] = now
        if running and seconds:
            nanos = round(self.price_of(dep) * running * seconds / 3600.0 * 1e9)
            dep.record["cost_nanos"] = int(dep.record.get("cost_nanos") or 0) + nanos

    async def settle_costs(self) -> None:
        """Accrue every live deployment; write what is new to the ledger; stop what its owner cannot pay."""
        for dep in list(self.deployments.values()):
            if dep.has_processes():
                self.accrue(dep)
        if self.billing is not None:
            await self.billing.settle(self)

    async def _can_pay(self, dep: Deployment, *, hours: float = 0.0, stop: bool = True) -> bool:
        if self.billing is None:
            return True
        return await self.billing.can_pay(self, dep, hours=hours)

    # ------------------------------------------------------------------ persistence

    def persist(self, dep: Deployment) -> None:
        """Save the deployment's record now (in order with earlier saves), off the event loop."""
        record = dict(dep.record, events=list(dep.record["events"]))
        if dep.replicas:
            record["replicas_detail"] = [r.as_dict() for r in dep.replicas]
            dep.record["replicas_detail"] = record["replicas_detail"]
        task = asyncio.get_running_loop().create_task(self._save(record))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _save(self, record: dict[str, Any]) -> None:
        assert self._writes is not None
        async with self._writes:
            try:
                await asyncio.to_thread(self.store.save, record)
            except Exception:
                log.exception("saving deployment %s failed", record["name"])

    async def flush(self) -> None:
        """Wait for every save so far (the API answers after its change is stored)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    # ------------------------------------------------------------------ operations

    def get(self, ident: str) -> Deployment:
        dep = self.deployments.get(ident) or self.by_name(ident)
        if dep is None:
            raise DeploymentNotFound(f"No deployment `{ident}`.", param="id")
        return dep

    def by_name(self, name: str) -> Deployment | None:
        for dep in self.deployments.values():
            if dep.name == name:
                return dep
        return None

    async def create(self, body: DeploymentCreate, *, owner: str | None = None) -> Deployment:
        entry = validate_create(body, max_replicas=self.settings.deployment_max_replicas)
        resources = check_resources(body, self.settings.deployment_executor)
        if self.by_name(body.name) is not None:
            raise Conflict(f"A deployment named `{body.name}` exists already.", param="name")
        stamp = self.clock.now()
        record: dict[str, Any] = {
            "id": "dep_" + secrets.token_hex(8),
            "name": body.name,
            "template": body.template or body.model,
            "engine": body.engine,
            "replicas": body.replicas,
            "strategy": body.strategy,
            "timeout_minutes": body.timeout,
            "threads": body.threads,
            "status": "DRAFT",
            "owner_key_id": owner,
            "events": [],
            "replicas_detail": [],
            "schedule": body.schedule,
            "next_run_at": None,
            "price_per_hour": body.price_per_hour,
            "cost_nanos": 0,
            "ledger_nanos": 0,
            "billed_until": None,
            "started_at": None,
            "expires_at": None,
            "created_at": stamp,
            "updated_at": stamp,
        }
        dep = Deployment(record, entry, self)
        if not await self._can_pay(dep):
            raise InsufficientFunds(
                f"The owner key's budget is spent: the deployment `{body.name}` cannot start.", param="name"
            )
        self.deployments[dep.id] = dep
        # The command engine's launch is kept in the CREATED event (templates.launch_of reads it back).
        launch: dict[str, Any] = (
            {"command": body.command, "readiness_path": body.readiness_path} if body.engine == "command" else {}
        )
        if resources:  # the Ray executor's, kept the same way (ray_executor.resources_of)
            launch["resources"] = resources
        dep.add_event("CREATED", f"template {record['template']}, strategy {body.strategy}", **launch)
        async with dep.lock:
            if body.strategy == "SCHEDULED":
                cron = Cron.parse(str(body.schedule))
                record["next_run_at"] = nxt = cron.next_after(stamp)
                first = iso(nxt) if nxt else "never"
                dep.set_status("STOPPED", "SCHEDULED", f"schedule `{body.schedule}`; first run {first}")
            else:
                dep.start("STARTING", "created")
        await self.flush()
        return dep

    async def stop(self, ident: str) -> Deployment:
        dep = self.get(ident)
        if dep.status == "STOPPED" and dep.record.get("next_run_at") is not None:
            dep.record["next_run_at"] = None  # a waiting SCHEDULED deployment: its schedule pauses
            dep.add_event("SCHEDULE_PAUSED", "stopped by the API: no further scheduled runs until started")
            await self.flush()
            return dep
        dep.check("stop")
        await self._cancel_background(dep)
        async with dep.lock:
            dep.check("stop")
            if dep.strategy == "SCHEDULED":
                dep.record["next_run_at"] = None
            await dep.stop("STOP_REQUESTED", "stopped by the API")
        await self.flush()
        return dep

    async def _cancel_background(self, dep: Deployment) -> None:
        task = dep._rotation
        if task is not None and not task.done():
            task.cancel()  # a rotation: its successor is stopped by rotate()'s own cleanup
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def start_again(self, ident: str) -> Deployment:
        dep = self.get(ident)
        dep.check("start")
        async with dep.lock:
            dep.check("start")
            if not await self._can_pay(dep):
                raise InsufficientFunds(f"The owner key's budget is spent: `{dep.name}` cannot start.", param="id")
            if dep.status == "ERROR":
                await dep.stop("RESTART_REQUESTED", "started again after an error")
            if dep.strategy == "SCHEDULED" and dep.record.get("schedule"):
                dep.record["next_run_at"] = Cron.parse(dep.record["schedule"]).next_after(self.clock.now())
            dep.start("START_REQUESTED", "started by the API")
        await self.flush()
        return dep

    async def archive(self, ident: str) -> Deployment:
        dep = self.get(ident)
        dep.check("archive")
        async with dep.lock:
            dep.check("archive")
            if dep.replicas and any(r.status not in ("STOPPED", "FAILED") for r in dep.replicas):
                await dep.stop("ARCHIVE_REQUESTED", "archived: stopping what still runs")
            dep.record["next_run_at"] = None
            dep.set_status("ARCHIVED", "ARCHIVED", "archived: it accepts no operation any more")
        await self.flush()
        return dep

    async def update(self, ident: str, body: DeploymentUpdate) -> Deployment:
        dep = self.get(ident)
        dep.check("update")
        # Every field is checked before anything changes: a bad request disturbs nothing.
        if body.timeout is not None:
            check_timeout(body.timeout)
        if body.replicas is not None:
            check_replicas(body.replicas, self.settings.deployment_max_replicas)
        if body.schedule is not None:
            check_schedule(dep.strategy, body.schedule)
        async with dep.lock:
            dep.check("update")
            if body.timeout is not None:
                dep.set_timeout(body.timeout)
            if body.schedule is not None:
                dep.set_schedule(body.schedule)
            if body.replicas is not None:
                self.accrue(dep)
                await dep.scale(body.replicas)
        await self.flush()
        return dep

    async def extend(self, ident: str, body: DeploymentExtend) -> Deployment:
        dep = self.get(ident)
        dep.check("update")
        check_timeout(body.minutes, "minutes")
        new = float(dep.record["timeout_minutes"]) + body.minutes
        check_timeout(new)
        async with dep.lock:
            dep.check("update")
            dep.set_timeout(float(dep.record["timeout_minutes"]) + body.minutes)
        await self.flush()
        return dep

    def served(self, name: str) -> ServedModel:
        dep = self.by_name(name)
        if dep is None:
            raise DeploymentNotFound(f"No deployment named `{name}`.", param="model")
        return dep.served()


_RUNNING_REPLICA = ("STARTING", "READY", "NOT_READY", "DRAINING")
# Replicas a restarted r1serve tries to re-adopt (a stopped or failed one's process is gone anyway).
_ADOPTABLE = ("STARTING", "READY", "NOT_READY")
