"""The supervisor: every deployment of this server, its replicas, its timeout, and its record in the
database.

A deployment's routing is a gateway model group (:class:`~r1serve.gateway.group.GroupEngine`,
least outstanding first) over its READY replicas, rebuilt whenever a replica's status changes, so
requests get the gateway's retries and failover before the first byte. Its status follows its
replicas: RUNNING once every replica has been READY, ERROR when one is FAILED; STOPPING and STOPPED
are set by a stop (the API's, or the timeout's).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
from pathlib import Path
from typing import Any

from r1serve.deployments import metrics
from r1serve.deployments.logs import DeploymentLog, iso, now
from r1serve.deployments.replica import Replica, ReplicaPlan
from r1serve.deployments.spec import (
    ACTIVE,
    Conflict,
    DeploymentCreate,
    DeploymentNotFound,
    Status,
    event,
    resolve_template,
    validate_create,
)
from r1serve.deployments.store import DeploymentStore
from r1serve.deployments.templates import launch_of, model_argument, parse_command
from r1serve.engines.upstream import HttpClient
from r1serve.errors import InvalidRequest, NotFound, R1ServeError
from r1serve.gateway.group import GroupEngine, Member
from r1serve.models.catalog import ModelEntry
from r1serve.routing import ServedModel
from r1serve.settings import Settings

log = logging.getLogger("r1serve.deployments")


class DeploymentStopped(NotFound):
    code = "deployment_stopped"


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
        self._timer: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return str(self.record["id"])

    @property
    def name(self) -> str:
        return str(self.record["name"])

    @property
    def status(self) -> Status:
        return self.record["status"]  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ status and events

    def set_status(self, status: Status, reason: str, message: str) -> None:
        if status != self.status:
            self.record["status"] = status
        self.add_event(reason, message, status=status)

    def add_event(self, reason: str, message: str, **extra: Any) -> None:
        stamp = now()
        self.record["events"].append(event(iso(stamp), reason, message, **extra))
        self.record["updated_at"] = stamp
        self.log.write("supervisor", f"{reason}: {message}")
        self.supervisor.persist(self)

    def replica_changed(self, replica: Replica, reason: str) -> None:
        """A replica's status changed: routing, then the deployment's own status follow."""
        self._route()
        self.add_event(f"REPLICA_{replica.status}", f"{replica.name}: {reason}", replica=replica.name)
        if self.status not in ACTIVE and self.status != "ERROR":
            return  # stopping or stopped: the replicas' states no longer move the deployment's
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
        if self.status in ("STOPPED", "STOPPING", "ARCHIVED", "DRAFT"):
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
        )

    def start(self, reason: str, message: str, *, expires: dt.datetime | None = None) -> None:
        """Spawn the replicas; the timeout counts from now unless ``expires`` keeps an earlier deadline."""
        stamp = now()
        expires = expires or stamp + dt.timedelta(minutes=float(self.record["timeout_minutes"]))
        self.record["started_at"] = stamp
        self.record["expires_at"] = expires
        self.set_status("STARTING", reason, f"{message}; {self.record['replicas']} replicas, until {iso(expires)}")
        plan = self._plan()
        self.replicas = [
            Replica(i, plan, self.log, self.supervisor.client, self.replica_changed)
            for i in range(self.record["replicas"])
        ]
        if not self.replicas:
            self.set_status("RUNNING", "RUNNING", "no replicas asked for")
        for replica in self.replicas:
            replica.start()
        self._timer = asyncio.create_task(self._expire(expires), name=f"timeout:{self.name}")

    async def _expire(self, at: dt.datetime) -> None:
        await asyncio.sleep(max(0.0, (at - now()).total_seconds()))
        self._timer = None  # stop() must not cancel the task it runs in
        await self.stop("TIMEOUT", f"the timeout of {self.record['timeout_minutes']:g} minutes ran out")

    async def stop(self, reason: str, message: str, *, final: Status = "STOPPED") -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.set_status("STOPPING", reason, message)
        grace = self.supervisor.settings.deployment_grace_seconds
        await asyncio.gather(*(r.stop(grace) for r in self.replicas))
        self.group = None
        self.set_status(final, final, f"all replicas stopped ({reason.lower()})")

    async def shutdown(self) -> None:
        """r1serve is exiting: end the processes, keep the status so the next start brings them back."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.group = None
        if self.replicas:
            await asyncio.gather(*(r.stop(5.0) for r in self.replicas))
            self.supervisor.persist(self)
        self.log.close()

    # ------------------------------------------------------------------ the API's view

    def as_dict(self, base_url: str | None = None) -> dict[str, Any]:
        r = self.record
        path = f"/deployments/{self.name}/v1"
        endpoint = f"{base_url.rstrip('/')}{path}" if base_url else path
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
            "threads": r["threads"],
            "status": r["status"],
            "endpoints": [{"url": endpoint, "path": path}],
            "replicas_detail": [rep.as_dict() for rep in self.replicas] or r["replicas_detail"],
            "events": r["events"],
            "started_at": r["started_at"] and iso(r["started_at"]),
            "expires_at": r["expires_at"] and iso(r["expires_at"]),
            "created_at": iso(r["created_at"]),
            "updated_at": iso(r["updated_at"]),
        }


class Supervisor:
    """Every deployment of this server. Created in the app's lifespan, closed at its end."""

    def __init__(self, settings: Settings, store: DeploymentStore, directory: Path | None = None) -> None:
        self.settings = settings
        self.store = store
        self.directory = directory or Path(settings.data_dir).expanduser() / "deployments"
        self.client = HttpClient(connect_timeout=2.0)
        self.deployments: dict[str, Deployment] = {}  # by id
        self._writes: asyncio.Lock | None = None
        self._pending: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Load every deployment; start again those that were running and whose time is not up."""
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
            if expires is not None and expires <= now():
                dep.set_status("STOPPED", "TIMEOUT", "the timeout ran out while r1serve was down")
                continue
            # A restart of r1serve does not extend the timeout: the deployment keeps its deadline.
            dep.start("RESTORED", "r1serve restarted", expires=expires)

    async def close(self) -> None:
        metrics.unwatch(self)
        await asyncio.gather(*(d.shutdown() for d in self.deployments.values()))
        await self.flush()
        await self.client.release()

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
        if self.by_name(body.name) is not None:
            raise Conflict(f"A deployment named `{body.name}` exists already.", param="name")
        stamp = now()
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
            "started_at": None,
            "expires_at": None,
            "created_at": stamp,
            "updated_at": stamp,
        }
        dep = Deployment(record, entry, self)
        self.deployments[dep.id] = dep
        # The command engine's launch is kept in the CREATED event (templates.launch_of reads it back).
        launch = {"command": body.command, "readiness_path": body.readiness_path} if body.engine == "command" else {}
        dep.add_event("CREATED", f"template {record['template']}, strategy {body.strategy}", **launch)
        dep.start("STARTING", "created")
        await self.flush()
        return dep

    async def stop(self, ident: str) -> Deployment:
        dep = self.get(ident)
        if dep.status in ("STOPPED", "STOPPING", "ARCHIVED"):
            return dep
        await dep.stop("STOP_REQUESTED", "stopped by the API")
        await self.flush()
        return dep

    async def start_again(self, ident: str) -> Deployment:
        dep = self.get(ident)
        if dep.status == "ARCHIVED":
            raise InvalidRequest(f"The deployment `{dep.name}` is archived.", param="id", code="deployment_archived")
        if dep.status in ACTIVE:
            return dep
        if dep.status == "ERROR":
            await dep.stop("RESTART_REQUESTED", "started again after an error")
        dep.start("START_REQUESTED", "started by the API")
        await self.flush()
        return dep

    def served(self, name: str) -> ServedModel:
        dep = self.by_name(name)
        if dep is None:
            raise DeploymentNotFound(f"No deployment named `{name}`.", param="model")
        return dep.served()

