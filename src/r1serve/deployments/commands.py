"""``r1serve deploy``: create, list, get, logs, stop, start, extend, scale and archive deployments on a
running server.

The server owns the replica processes, so these commands talk to its API (``--url``, the key from
``--api-key``, ``$R1SERVE_API_KEY`` or ``R1SERVE_ADMIN_KEY``), never to the database directly.
"""

from __future__ import annotations

import json
import os
import shlex
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from r1serve.settings import Settings

deploy_app = typer.Typer(help="Deployments: a model on N replicas behind one endpoint URL.", no_args_is_help=True)
out = Console()
err = Console(stderr=True, soft_wrap=True)  # not wrapped at 80 columns in a log or pipe: one message, one line

UrlOption = Annotated[str | None, typer.Option(help="Server base URL; default: the configured host and port.")]
KeyOption = Annotated[str | None, typer.Option(help="Admin key; default: $R1SERVE_API_KEY, else R1SERVE_ADMIN_KEY.")]

# stop, scale and archive answer once the replicas have drained: the server bounds that by its grace period.
DRAIN_TIMEOUT = 3600.0

# Nosana's example request body (their DeepSeek-R1 guide): no model, the endpoint knows it.
EXAMPLE_BODY = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Give me a short fun fact about the roman empire"},
    ],
    "max_tokens": 4000,
    "temperature": 0.7,
}


class Client:
    def __init__(self, url: str | None, key: str | None) -> None:
        settings = Settings()
        self.base = (url or f"http://{settings.host}:{settings.port}").rstrip("/")
        self.key = key or os.environ.get("R1SERVE_API_KEY") or settings.admin_key

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> urllib.request.Request:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = json.dumps(body).encode() if body is not None else None
        return urllib.request.Request(self.base + path, data=data, method=method, headers=headers)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, *, timeout: float = 60) -> Any:
        try:
            with urllib.request.urlopen(self._request(method, path, body), timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise _fail(f"{exc.code}: {_message(exc.read())}") from None
        except urllib.error.URLError as exc:
            raise _fail(f"cannot reach {self.base}: {exc.reason} (is `r1serve serve` running?)") from None

    def stream(self, path: str) -> Iterator[dict[str, Any]]:
        """The data events of an SSE response."""
        try:
            with urllib.request.urlopen(self._request("GET", path), timeout=None) as resp:
                for raw in resp:
                    line = raw.decode("utf-8", errors="replace").strip()
                    if line.startswith("data:"):
                        yield json.loads(line[5:])
        except urllib.error.HTTPError as exc:
            raise _fail(f"{exc.code}: {_message(exc.read())}") from None
        except urllib.error.URLError as exc:
            raise _fail(f"cannot reach {self.base}: {exc.reason}") from None


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", errors="replace")[:500]


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/bold red] {message}", highlight=False)
    return typer.Exit(1)


def _quote(ident: str) -> str:
    return urllib.parse.quote(ident, safe="")


def _replicas_text(dep: dict[str, Any]) -> str:
    return ", ".join(f"{r['name']} {r['status']}" for r in dep["replicas_detail"]) or "no replicas"


def _print_endpoint(dep: dict[str, Any], key_hint: bool) -> None:
    url = dep["endpoints"][0]["url"]
    out.print(f"\n[bold]endpoint URL:[/bold] {url}", highlight=False)
    auth = ' -H "Authorization: Bearer $R1SERVE_API_KEY"' if key_hint else ""
    curl = (
        f"curl -X POST {shlex.quote(url + '/chat/completions')} -H 'Content-Type: application/json'{auth} "
        f"-d {shlex.quote(json.dumps(EXAMPLE_BODY))}"
    )
    out.print(curl, highlight=False, markup=False, soft_wrap=True)


@deploy_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Unique, URL-safe: lower-case letters, digits, dashes.")],
    template: Annotated[str, typer.Option(help="Catalog id or alias (see `r1serve models`), or a GGUF path.")],
    replicas: Annotated[int, typer.Option(help="Replica processes.")] = 1,
    strategy: Annotated[
        str,
        typer.Option(
            help="SIMPLE (until the timeout), SIMPLE-EXTEND (extended while the budget allows), "
            "SCHEDULED (on --schedule, for the timeout), INFINITE (kept up, replicas replaced)."
        ),
    ] = "SIMPLE",
    timeout: Annotated[float, typer.Option(help="Minutes until the deployment stops.")] = 60.0,
    threads: Annotated[int | None, typer.Option(help="CPU threads per replica.")] = None,
    schedule: Annotated[str | None, typer.Option(help="Cron (SCHEDULED), e.g. '0 9 * * mon-fri'.")] = None,
    price_per_hour: Annotated[float | None, typer.Option(help="USD per replica-hour (default: template's).")] = None,
    wait: Annotated[bool, typer.Option(help="Follow the start until every replica is ready.")] = True,
    engine: Annotated[str, typer.Option(help="embedded (r1serve serve) or command (--command).")] = "embedded",
    command: Annotated[
        str | None, typer.Option(help="The command engine's server command line, with {port} and {model}.")
    ] = None,
    readiness_path: Annotated[str | None, typer.Option(help="Path that answers 200 once a replica is ready.")] = None,
    num_cpus: Annotated[float | None, typer.Option(help="CPUs Ray reserves per replica (executor ray).")] = None,
    num_gpus: Annotated[float | None, typer.Option(help="GPUs Ray reserves per replica (executor ray).")] = None,
    accelerator_type: Annotated[
        str | None, typer.Option(help="The GPU type Ray places replicas on, e.g. A100, H100, L4 (executor ray).")
    ] = None,
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """Create a deployment and follow its start; ends with the endpoint URL and a curl to paste."""
    client = Client(url, api_key)
    body: dict[str, Any] = {
        "name": name, "template": template, "replicas": replicas, "strategy": strategy, "timeout": timeout,
    }  # fmt: skip
    for field, value in (
        ("threads", threads), ("schedule", schedule), ("price_per_hour", price_per_hour),
        ("num_cpus", num_cpus), ("num_gpus", num_gpus), ("accelerator_type", accelerator_type),
    ):  # fmt: skip
        if value is not None:
            body[field] = value
    if engine != "embedded" or command is not None:
        body.update(engine=engine, command=command)
    if readiness_path is not None:
        body["readiness_path"] = readiness_path
    dep = client.call("POST", "/v1/deployments", body)
    out.print(f"created {dep['name']} ({dep['id']}): {dep['status']}", highlight=False)
    if dep["status"] == "STOPPED" and dep.get("next_run_at"):
        out.print(f"scheduled: the first run starts at {dep['next_run_at']}", highlight=False)
        wait = False
    if wait:
        dep = _follow_start(client, dep)
    if dep["status"] == "ERROR":
        # No URL to paste: it would answer that the deployment failed. The reason is in the events above.
        err.print(f"[bold red]error:[/bold red] {dep['name']} failed to start; see `r1serve deploy logs "
                  f"{dep['name']}`", highlight=False)  # fmt: skip
        raise typer.Exit(1)
    _print_endpoint(dep, key_hint=bool(client.key))


def _follow_start(client: Client, dep: dict[str, Any]) -> dict[str, Any]:
    """Replica states and the supervisor's log lines as they come, until RUNNING (or a failure)."""
    seen = 0
    shown = ""
    while True:
        logs = client.call("GET", f"/v1/deployments/{dep['id']}/logs?replica=supervisor")["data"]
        for line in logs:
            if line["seq"] > seen:
                seen = line["seq"]
                out.print(f"[dim]{line['time']}[/dim] {line['line']}", highlight=False, markup=True)
        state = f"{dep['status']}: {_replicas_text(dep)}"
        if state != shown:
            out.print(f"[bold]{state}[/bold]", highlight=False)
            shown = state
        if dep["status"] not in ("STARTING", "DRAFT"):
            return dep
        time.sleep(0.5)
        dep = client.call("GET", f"/v1/deployments/{dep['id']}")


@deploy_app.command("list")
def list_command(url: UrlOption = None, api_key: KeyOption = None) -> None:
    """Every deployment with its status and endpoint URL."""
    data = Client(url, api_key).call("GET", "/v1/deployments")["data"]
    table = Table(title_justify="left")
    for column in ("name", "status", "replicas", "strategy", "expires", "endpoint URL"):
        table.add_column(column, overflow="fold")
    for dep in data:
        table.add_row(
            dep["name"], dep["status"], _replicas_text(dep), dep["strategy"], dep["expires_at"] or "",
            dep["endpoints"][0]["url"],
        )  # fmt: skip
    out.print(table)


@deploy_app.command("get")
def get(
    name: Annotated[str, typer.Argument(help="Name or id.")], url: UrlOption = None, api_key: KeyOption = None
) -> None:
    """One deployment as JSON (its endpoint URL, replicas and events)."""
    dep = Client(url, api_key).call("GET", f"/v1/deployments/{_quote(name)}")
    print(json.dumps(dep, indent=2))


@deploy_app.command("logs")
def logs(
    name: Annotated[str, typer.Argument(help="Name or id.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
    replica: Annotated[str | None, typer.Option(help="Only this replica (index or name), or `supervisor`.")] = None,
    tail: Annotated[int | None, typer.Option(help="Only the last N lines so far.")] = None,
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """The deployment's log lines (replicas' output and the supervisor's), each with its time."""
    client = Client(url, api_key)
    query = {k: v for k, v in {"replica": replica, "tail": tail, "follow": "true" if follow else None}.items() if v}
    path = f"/v1/deployments/{_quote(name)}/logs?{urllib.parse.urlencode(query)}"
    lines = client.stream(path) if follow else iter(client.call("GET", path)["data"])
    try:
        for line in lines:
            print(f"{line['time']} [{line['source']}] {line['line']}", flush=True)
    except KeyboardInterrupt:
        pass


@deploy_app.command("stop")
def stop(
    name: Annotated[str, typer.Argument(help="Name or id.")], url: UrlOption = None, api_key: KeyOption = None
) -> None:
    """Stop every replica (in-flight requests finish first); the endpoint URL then answers 404."""
    dep = Client(url, api_key).call("POST", f"/v1/deployments/{_quote(name)}/stop", timeout=DRAIN_TIMEOUT)
    out.print(f"{dep['name']}: {dep['status']}", highlight=False)


@deploy_app.command("start")
def start(
    name: Annotated[str, typer.Argument(help="Name or id.")], url: UrlOption = None, api_key: KeyOption = None
) -> None:
    """Start a stopped deployment again, with a fresh timeout."""
    client = Client(url, api_key)
    dep = _follow_start(client, client.call("POST", f"/v1/deployments/{_quote(name)}/start"))
    _print_endpoint(dep, key_hint=bool(client.key))


def _summary(dep: dict[str, Any]) -> None:
    out.print(
        f"{dep['name']}: {dep['status']}, {dep['replicas']} replicas ({_replicas_text(dep)}), "
        f"timeout {dep['timeout']:g} min, until {dep['expires_at'] or '-'}, cost ${dep['cost']:.6f}",
        highlight=False,
    )


@deploy_app.command("extend")
def extend(
    name: Annotated[str, typer.Argument(help="Name or id.")],
    minutes: Annotated[float, typer.Option(help="Minutes added to the timeout (and to a running deadline).")],
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """Add minutes to the timeout; a running deployment's deadline moves by as much."""
    _summary(Client(url, api_key).call("POST", f"/v1/deployments/{_quote(name)}/extend", {"minutes": minutes}))


@deploy_app.command("scale")
def scale(
    name: Annotated[str, typer.Argument(help="Name or id.")],
    replicas: Annotated[int, typer.Argument(help="The new replica count.")],
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """Change the replica count: new ones start at once, removed ones drain first."""
    path = f"/v1/deployments/{_quote(name)}/scale"
    _summary(Client(url, api_key).call("POST", path, {"replicas": replicas}, timeout=DRAIN_TIMEOUT))


@deploy_app.command("archive")
def archive(
    name: Annotated[str, typer.Argument(help="Name or id.")], url: UrlOption = None, api_key: KeyOption = None
) -> None:
    """Archive a stopped deployment: hidden from `list`, it refuses every operation from then on."""
    dep = Client(url, api_key).call("POST", f"/v1/deployments/{_quote(name)}/archive", timeout=DRAIN_TIMEOUT)
    out.print(f"{dep['name']}: {dep['status']}", highlight=False)
