"""Deployments on ``/metrics``: replicas by state per deployment, each deployment's status, and per
replica its restarts, requests and outstanding requests.

A collector reads the supervisors' live state at each scrape rather than keeping gauges up to date:
nothing to forget on a state change, and a deleted or restarted replica leaves no stale series. It is
registered once on prometheus_client's default registry (which refuses a second of the same names);
each supervisor joins it while it runs (several apps run in one test process).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from r1serve.deployments.spec import STATUSES, ReplicaStatus

if TYPE_CHECKING:
    from r1serve.deployments.supervisor import Supervisor

REPLICA_STATES: tuple[ReplicaStatus, ...] = (
    "PENDING", "STARTING", "READY", "NOT_READY", "DRAINING", "STOPPED", "FAILED",
)  # fmt: skip


class DeploymentsCollector(Collector):
    def __init__(self) -> None:
        self.supervisors: weakref.WeakSet[Supervisor] = weakref.WeakSet()

    def collect(self) -> Iterator[Metric]:
        replicas = GaugeMetricFamily(
            "r1serve_deployment_replicas", "Replicas of a deployment by state.", labels=["deployment", "state"]
        )
        status = GaugeMetricFamily(
            "r1serve_deployment_status", "1 for the deployment's current status.", labels=["deployment", "status"]
        )
        restarts = CounterMetricFamily(
            "r1serve_deployment_replica_restarts",
            "Restarts of a replica after a crash, since its deployment started.",
            labels=["deployment", "replica"],
        )
        requests = CounterMetricFamily(
            "r1serve_deployment_replica_requests",
            "Requests routed to a replica (all its processes), since its deployment started.",
            labels=["deployment", "replica"],
        )
        outstanding = GaugeMetricFamily(
            "r1serve_deployment_replica_outstanding",
            "Requests in flight at a replica.",
            labels=["deployment", "replica"],
        )
        for supervisor in list(self.supervisors):
            for dep in list(supervisor.deployments.values()):
                name = dep.name
                for value in STATUSES:
                    status.add_metric([name, value], 1.0 if dep.status == value else 0.0)
                counts = dict.fromkeys(REPLICA_STATES, 0)
                for replica in list(dep.replicas):
                    counts[replica.status] += 1
                    restarts.add_metric([name, replica.name], replica.restarts)
                    requests.add_metric([name, replica.name], replica.requests)
                    target = replica.target
                    outstanding.add_metric([name, replica.name], target.stats.outstanding if target else 0)
                for state, count in counts.items():
                    replicas.add_metric([name, state], count)
        yield from (replicas, status, restarts, requests, outstanding)


COLLECTOR = DeploymentsCollector()
REGISTRY.register(COLLECTOR)


def watch(supervisor: Supervisor) -> None:
    COLLECTOR.supervisors.add(supervisor)


def unwatch(supervisor: Supervisor) -> None:
    COLLECTOR.supervisors.discard(supervisor)
