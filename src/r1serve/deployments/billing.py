"""Deployment time in the accounts ledger, and the owner's budget as Nosana's credit balance.

The supervisor accrues each deployment's cost (price per replica-hour x replicas running x time) on
every tick; this writes what is new to the ledger against the owner key, at most every
``bill_seconds`` while it runs and at once when it stops, as rows with ``status = "deployment"`` (the
tag that tells replica-time from requests), ``target = "deployment:NAME"`` and the deployment's
id in ``response_id``. Those rows settle against the key's budget like any request; once the budget is
spent, every live deployment of that key stops with status INSUFFICIENT_FUNDS.

The budget is asked through the limiter (a reservation that is released at once), so the answer is
the one requests get: spent + reserved against the key's budget for its current period.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from typing import TYPE_CHECKING

from r1serve.accounts import Accounts
from r1serve.accounts.ledger import UsageRecord
from r1serve.accounts.limiter import Admission
from r1serve.accounts.store import OPEN, Principal
from r1serve.errors import R1ServeError

if TYPE_CHECKING:
    from r1serve.deployments.supervisor import Deployment, Supervisor

log = logging.getLogger("r1serve.deployments")

LEDGER_STATUS = "deployment"  # the ledger row's tag for replica-time
_STOPPABLE = ("STARTING", "RUNNING", "ERROR")  # what a spent budget stops


class AccountsBilling:
    def __init__(self, accounts: Accounts, *, bill_seconds: float = 10.0) -> None:
        self.accounts = accounts
        self.bill_seconds = bill_seconds

    def _principal(self, key_id: str | None) -> Principal | None:
        if key_id is None:
            return None
        principal = OPEN if key_id == OPEN.key_id else self.accounts.store.principal(key_id)
        if principal is None:
            return None
        # Only the budget applies: replica-time is not a request, rpm and tpm do not count it.
        return dataclasses.replace(principal, rpm=None, tpm=None)

    async def settle(self, supervisor: Supervisor) -> None:
        exhausted: set[str] = set()
        for dep in list(supervisor.deployments.values()):
            owner = self._principal(dep.record.get("owner_key_id"))
            if owner is None:
                continue
            new = int(dep.record.get("cost_nanos") or 0) - int(dep.record.get("ledger_nanos") or 0)
            stamp = supervisor.clock.now()
            last = dep.record.get("ledger_at")
            due = not dep.has_processes() or last is None or (stamp - last).total_seconds() >= self.bill_seconds
            if new > 0 and due:
                dep.record["ledger_at"] = stamp
                await self._charge(dep, owner, new)
                supervisor.persist(dep)
            budgeted = dep.status in _STOPPABLE and owner.budget_nanos is not None and owner.key_id not in exhausted
            if budgeted and not await self._fits(owner, 1):
                exhausted.add(owner.key_id)
        for dep in list(supervisor.deployments.values()):
            busy = dep._background is not None and not dep._background.done()
            unfunded = dep.status in _STOPPABLE and dep.record.get("owner_key_id") in exhausted
            if unfunded and not busy:
                dep._background = asyncio.create_task(self._stop_unfunded(supervisor, dep))

    async def _stop_unfunded(self, supervisor: Supervisor, dep: Deployment) -> None:
        async with dep.lock:
            if dep.status in _STOPPABLE:
                await dep.stop("INSUFFICIENT_FUNDS", "the owner key's budget is spent", final="INSUFFICIENT_FUNDS")
        await self.settle(supervisor)  # the time it took to drain
        await supervisor.flush()

    async def _charge(self, dep: Deployment, owner: Principal, nanos: int) -> None:
        admission: Admission | None = None
        if owner.budget_nanos is not None:
            # A reservation of nothing: it only carries the key and period the row settles against.
            try:
                admission = await self.accounts.limiter.admit(owner, 0, 0)
            except R1ServeError:
                admission = None  # over budget already: the time is owed all the same
        if admission is not None:
            admission.settled = True
            self.accounts.limiter.settle_local(admission, 0, nanos)
        record = UsageRecord(
            response_id=f"{dep.id}-time-{secrets.token_hex(6)}",
            key_id=owner.key_id,
            model_served=dep.entry.id,
            model_requested=dep.name,
            target=f"deployment:{dep.name}",
            cost_nanos=nanos,
            status=LEDGER_STATUS,
            price_version="replica-hour",
            admission=admission,
        )
        dep.record["ledger_nanos"] = int(dep.record.get("ledger_nanos") or 0) + nanos
        committed = self.accounts.ledger.submit(record)
        if committed is not None:
            try:
                await committed  # the budget check after this sees the row
            except Exception:
                log.warning("deployment %s: ledger row queued, not committed yet", dep.name)

    async def _fits(self, owner: Principal, nanos: int) -> bool:
        """Would ``nanos`` more fit the owner's budget? (Requests in flight do not count as spent.)"""
        try:
            admission = await self.accounts.limiter.admit(owner, 0, nanos)
        except R1ServeError as exc:
            return exc.code != "insufficient_quota"
        admission.settled = True
        self.accounts.limiter.settle_local(admission, 0, 0)
        if admission.reservation_id is not None:
            await asyncio.to_thread(self._release, admission)
        return True

    def _release(self, admission: Admission) -> None:
        with self.accounts.engine.begin() as conn:
            self.accounts.limiter.settle_in(conn, [(admission, 0, 0)])

    async def can_pay(self, supervisor: Supervisor, dep: Deployment, *, hours: float) -> bool:
        owner = self._principal(dep.record.get("owner_key_id"))
        if owner is None or owner.budget_nanos is None:
            return True
        replicas = max(1, int(dep.record["replicas"]))
        nanos = max(1, round(supervisor.price_of(dep) * replicas * hours * 1e9))
        return await self._fits(owner, nanos)
