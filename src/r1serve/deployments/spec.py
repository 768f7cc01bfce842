"""What a deployment is: its statuses, strategies, and the checks a create request passes.

Names follow Nosana's deployment manager where it has them (statuses, strategies, ``timeout`` in
minutes), SkyServe's for replica statuses.
"""

from __future__ import annotations

import re
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict

from r1serve.deployments.schedule import Cron
from r1serve.deployments.templates import check_readiness_path, parse_command
from r1serve.deployments.templates import resolve_template as resolve_template  # the supervisor's, re-exported
from r1serve.errors import InvalidRequest, NotFound, R1ServeError
from r1serve.models.catalog import ModelEntry

Status = Literal["DRAFT", "STARTING", "RUNNING", "STOPPING", "STOPPED", "ARCHIVED", "ERROR", "INSUFFICIENT_FUNDS"]
ReplicaStatus = Literal["PENDING", "STARTING", "READY", "NOT_READY", "DRAINING", "STOPPED", "FAILED"]
STRATEGIES = ("SIMPLE", "SIMPLE-EXTEND", "SCHEDULED", "INFINITE")
ENGINES = ("embedded", "command")  # command: any OpenAI-compatible server's command line (templates.py)

# Statuses in which a deployment's replicas should be up (what a restart of r1serve brings back).
ACTIVE: tuple[Status, ...] = ("STARTING", "RUNNING")
STATUSES: tuple[Status, ...] = get_args(Status)

# The name is a path segment of the endpoint URL: lower-case letters, digits and inner dashes.
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class Conflict(R1ServeError):
    status = 409
    type = "invalid_request_error"
    code = "deployment_exists"


class DeploymentNotFound(NotFound):
    code = "deployment_not_found"


class StateConflict(R1ServeError):
    """An operation the deployment's current status does not allow (``start`` while STOPPING)."""

    status = 409
    type = "invalid_request_error"
    code = "deployment_state"


# What each operation may start from. Anything else is a 409 naming the status; ARCHIVED allows nothing.
ALLOWED_FROM: dict[str, tuple[Status, ...]] = {
    "start": ("DRAFT", "STOPPED", "ERROR", "INSUFFICIENT_FUNDS"),
    "stop": ("STARTING", "RUNNING", "ERROR"),
    "archive": ("DRAFT", "STOPPED", "ERROR", "INSUFFICIENT_FUNDS"),
    "update": ("DRAFT", "STARTING", "RUNNING", "STOPPED", "ERROR", "INSUFFICIENT_FUNDS"),
}


class DeploymentCreate(BaseModel):
    """The body of ``POST /v1/deployments``; types only, the rules are in :func:`validate_create`."""

    model_config = ConfigDict(extra="forbid")

    name: str
    template: str | None = None
    model: str | None = None  # the same as template (HF and SkyServe call it model)
    engine: str = "embedded"
    replicas: int = 1
    strategy: str = "SIMPLE"
    # Minutes, as Nosana's; fractions are allowed (tests use seconds-long deployments).
    timeout: float = 60.0
    threads: int | None = None  # per replica; default: the server's threads shared among the replicas
    # The command engine: a command line with {port} and {model} placeholders, and the path that answers
    # 200 once it is ready (default /v1/models).
    command: str | None = None
    readiness_path: str | None = None
    schedule: str | None = None  # cron, SCHEDULED only
    price_per_hour: float | None = None  # USD per replica-hour; default: the template's
    # Per replica, on the Ray executor only (Ray reserves them; deployments/ray_executor.py).
    num_cpus: float | None = None
    num_gpus: float | None = None
    accelerator_type: str | None = None  # a Ray accelerator type, e.g. A100, H100, L4


class DeploymentUpdate(BaseModel):
    """The body of ``PATCH /v1/deployments/{id}``: any of these; the rest stays as it is."""

    model_config = ConfigDict(extra="forbid")

    timeout: float | None = None
    replicas: int | None = None
    schedule: str | None = None


class DeploymentExtend(BaseModel):
    model_config = ConfigDict(extra="forbid")

    minutes: float  # added to the timeout (and to a running deployment's deadline)


MAX_TIMEOUT_MINUTES = 525_600  # a year; far larger ones overflow the deadline's datetime arithmetic


def validate_create(body: DeploymentCreate, *, max_replicas: int) -> ModelEntry:
    """The checks of a new deployment, each naming its field; returns the template's catalog entry."""
    if not _NAME.fullmatch(body.name):
        raise _invalid(
            "name must be 1-63 lower-case letters, digits or dashes, starting and ending with a letter or digit "
            "(it is part of the endpoint URL)",
            "name",
        )
    if body.template and body.model and body.template != body.model:
        raise _invalid("give template or model, not two different ones", "model")
    spec = body.template or body.model
    if not spec:
        raise _invalid("template is required (a catalog id such as `deepseek-r1:1.5b`, or a GGUF path)", "template")
    if body.engine not in ENGINES:
        raise _invalid(f"unknown engine `{body.engine}`: one of {', '.join(ENGINES)}", "engine")
    entry = resolve_template(spec, body.engine)
    if body.engine == "command":
        parse_command(body.command)
    elif body.command is not None:
        raise _invalid("command is only for engine `command`", "command")
    check_readiness_path(body.readiness_path, body.engine)
    check_replicas(body.replicas, max_replicas)
    check_strategy(body.strategy)
    check_timeout(body.timeout)
    if body.threads is not None and body.threads < 1:
        raise _invalid("threads must be at least 1", "threads")
    check_schedule(body.strategy, body.schedule)
    if body.price_per_hour is not None and not 0 <= body.price_per_hour <= 1e6:
        raise _invalid("price_per_hour must be between 0 and 1000000 USD per replica-hour", "price_per_hour")
    return entry


_ACCELERATOR = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_resources(body: DeploymentCreate, executor: str) -> dict[str, Any]:
    """The Ray resources of each replica (only given ones), each checked and naming its field."""
    given = {k: v for k in ("num_cpus", "num_gpus", "accelerator_type") if (v := getattr(body, k)) is not None}
    if given and executor != "ray":
        field = next(iter(given))
        raise _invalid(
            f"{field} places replicas on a Ray cluster: this server's executor is `{executor}` "
            "(R1SERVE_DEPLOYMENT_EXECUTOR=ray)",
            field,
        )
    if body.num_cpus is not None and not 0 < body.num_cpus <= 1024:
        raise _invalid(f"num_cpus must be more than 0 and at most 1024 (got {body.num_cpus:g})", "num_cpus")
    if body.num_gpus is not None and not 0 <= body.num_gpus <= 64:
        raise _invalid(f"num_gpus must be between 0 and 64 (got {body.num_gpus:g})", "num_gpus")
    if body.accelerator_type is not None and not _ACCELERATOR.fullmatch(body.accelerator_type):
        raise _invalid("accelerator_type must be a Ray accelerator type such as A100, H100 or L4", "accelerator_type")
    return given


def check_replicas(replicas: int, max_replicas: int) -> None:
    if replicas < 0 or replicas > max_replicas:
        raise _invalid(f"replicas must be between 0 and {max_replicas} (got {replicas})", "replicas")


def check_timeout(minutes: float, param: str = "timeout") -> None:
    if not 0 < minutes <= MAX_TIMEOUT_MINUTES:
        raise _invalid(
            f"{param} must be a positive number of minutes, at most {MAX_TIMEOUT_MINUTES} (got {minutes:g})", param
        )


def check_schedule(strategy: str, schedule: str | None) -> Cron | None:
    """SCHEDULED needs a valid cron ``schedule``; the other strategies take none."""
    if strategy != "SCHEDULED":
        if schedule is not None:
            raise _invalid(f"only SCHEDULED deployments have a schedule (this one is {strategy})", "schedule")
        return None
    if not schedule:
        raise _invalid("a SCHEDULED deployment needs a cron schedule, e.g. `0 9 * * mon-fri`", "schedule")
    if len(schedule) > 200:  # the column's size
        raise _invalid("schedule must be at most 200 characters", "schedule")
    return Cron.parse(schedule)


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise _invalid(f"unknown strategy `{strategy}`: one of {', '.join(STRATEGIES)}", "strategy")


def _invalid(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="invalid_value")


def event(time: str, reason: str, message: str, **extra: Any) -> dict[str, Any]:
    """One entry of ``events[]``: every state change, with its time and a reason."""
    return {"time": time, "reason": reason, "message": message, **extra}
