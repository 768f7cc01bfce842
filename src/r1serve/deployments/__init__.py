"""Deployments: a model served by N supervised replica processes behind one endpoint URL
(``/deployments/{name}/v1``), with a strategy and a timeout, as Nosana's deployments are.

* :mod:`.spec`: statuses, strategies, the checks of a create request.
* :mod:`.replica`: one replica, a ``r1serve serve`` child process: readiness, restarts, its log.
* :mod:`.supervisor`: every deployment, its routing (a gateway model group over READY replicas),
  its timeout and its record. :mod:`.store`: the record in the accounts database.
* :mod:`.logs`: the ring buffer and per-replica log files. :mod:`.commands`: ``r1serve deploy``.
* :mod:`.schedule`: the supervisor's clock and cron. :mod:`.billing`: replica-time in the ledger, budgets.
  :mod:`.adoption`: the lease, replicas' output files, re-adopting a killed r1serve's replicas.
"""

from r1serve.deployments.spec import DeploymentCreate
from r1serve.deployments.store import DeploymentStore
from r1serve.deployments.supervisor import Deployment, Supervisor

__all__ = ["Deployment", "DeploymentCreate", "DeploymentStore", "Supervisor"]
