"""The ``r1serve`` command: serve, models, pull, chat."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

import r1serve
from r1serve.models.catalog import CATALOG, HubSource, LocalSource, ModelEntry, PypiChunksSource
from r1serve.models.fetch import ModelFetchError, ensure_model, local_path
from r1serve.settings import Settings

app = typer.Typer(
    help="Self-hosted OpenAI-compatible server for DeepSeek-R1 family reasoning models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True, soft_wrap=True)  # not wrapped at 80 columns in a log or pipe: one message, one line
log = logging.getLogger("r1serve.cli")


def _settings(**overrides: Any) -> Settings:
    # Flags win over R1SERVE_* variables and .env; a flag left out keeps what they say.
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise _fail(f"invalid settings (flags, R1SERVE_* variables or .env): {problems}") from None


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/bold red] {message}", highlight=False, markup=True)
    return typer.Exit(1)


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(help="Catalog id or alias, or a path to a GGUF file.")] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for llama.cpp.")] = None,
    ctx: Annotated[int | None, typer.Option(help="Context length per sequence, in tokens.")] = None,
    parallel: Annotated[int | None, typer.Option(help="Sequences decoded together (batch size).")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error.")] = None,
    provider: Annotated[
        str | None,
        typer.Option(
            help="Serve through a provider preset (deepinfra, together, huggingface, aimlapi, deepseek, "
            "openrouter, vllm, sglang, llama-server, ollama); comma-separated for a fallback chain."
        ),
    ] = None,
    upstream: Annotated[
        str | None, typer.Option(help="Front any OpenAI-compatible server, e.g. http://HOST:PORT/v1.")
    ] = None,
    upstream_key_env: Annotated[
        str | None, typer.Option(help="Environment variable (or .env entry) holding the upstream's API key.")
    ] = None,
    upstream_model: Annotated[str | None, typer.Option(help="Model name to ask the upstream for.")] = None,
    reasoning_dialect: Annotated[
        str | None,
        typer.Option(
            help="How the upstream returns reasoning: auto, think_in_content, think_tags, "
            "reasoning_content, reasoning or none."
        ),
    ] = None,
    providers_file: Annotated[str | None, typer.Option(help="A TOML or JSON file of providers and routes.")] = None,
    executor: Annotated[
        str | None,
        typer.Option(
            help="Where deployments' replicas run: local (child processes) or ray (pip install 'r1serve[ray]')."
        ),
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="The Ray cluster for --executor ray, e.g. 10.0.0.5:6379 (default: auto).")
    ] = None,
) -> None:
    """Serve a model over the OpenAI API (fetching it first if needed), or front upstream providers."""
    from r1serve.api import create_app
    from r1serve.api.server import serve_http
    from r1serve.gateway import GatewayConfigError, gateway_plan
    from r1serve.logs import configure_logging
    from r1serve.routing.build import resolve_model

    settings = _settings(
        model=model, host=host, port=port, n_threads=threads, n_ctx=ctx, max_running=parallel, log_level=log_level,
        provider=provider, upstream=upstream, upstream_key_env=upstream_key_env, upstream_model=upstream_model,
        reasoning_dialect=reasoning_dialect, providers_file=providers_file,
        deployment_executor=executor, ray_address=ray_address,
    )  # fmt: skip
    configure_logging(settings.log_level)
    try:
        plan = gateway_plan(settings)
    except GatewayConfigError as exc:
        raise _fail(str(exc)) from None
    log.info("r1serve %s", r1serve.__version__)
    reason = _cannot_listen(settings.host, settings.port)
    if reason:
        # Checked before the app starts (its start-up creates an admin key when the host is beyond
        # loopback) and before a model download.
        raise _fail(f"cannot listen on {settings.host}:{settings.port}: {reason}")
    if plan is None or plan.uses_embedded:
        try:
            # Fetched here rather than in the app's startup so the progress bar has the terminal.
            resolved = resolve_model(settings, progress=True)
        except ModelFetchError as exc:
            raise _fail(str(exc)) from None
        log.info("model: %s (%s)", resolved.entry.id, resolved.path)
        log.info(
            "engine: llama.cpp, %d threads, %d-token context per sequence, %d parallel sequences",
            settings.n_threads,
            settings.n_ctx,
            settings.max_running,
        )
    if plan is not None:
        log.info("gateway: %s", ", ".join(sorted(plan.providers)) or "routes from the providers file")
    url = f"http://{settings.host}:{settings.port}"
    log.info("API: %s/v1   docs: %s/docs", url, url)
    serve_http(create_app(settings), settings)


def _cannot_listen(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound (address not on this machine, port taken...), or None.

    Binds the way uvicorn will: IPv6 when the host has a colon, IPv4 otherwise, SO_REUSEADDR."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _source_text(entry: ModelEntry) -> str:
    source = entry.source
    if isinstance(source, PypiChunksSource):
        first = source.packages[0].split("==")[0]
        return f"PyPI: {first} … ({len(source.packages)} packages)"
    if isinstance(source, HubSource):
        return f"HF: {source.repo_id}"
    if isinstance(source, LocalSource):
        return f"file: {source.path}"
    return type(source).__name__


@app.command("models")
def models_command() -> None:
    """List the model catalog and which models are on this machine."""
    settings = _settings()
    table = Table(title=f"r1serve models (cache: {settings.models_dir})", title_justify="left")
    table.add_column("id", style="bold", no_wrap=True)
    table.add_column("reasoning", no_wrap=True)
    table.add_column("local", no_wrap=True)
    table.add_column("path, or where it comes from", overflow="fold")
    for entry in CATALOG:
        path = local_path(entry, settings.models_dir)
        default = " [dim](default)[/dim]" if entry.id == settings.model else ""
        table.add_row(
            entry.id + default,
            entry.reasoning_format,
            "[green]yes[/green]" if path else "[dim]no[/dim]",
            str(path) if path else _source_text(entry),
        )
    out.print(table)


@app.command()
def pull(
    model: Annotated[str | None, typer.Argument(help="Catalog id or alias; default: the configured model.")] = None,
) -> None:
    """Fetch a model into the cache (verified by checksum) and print its path."""
    from r1serve.routing.build import model_entry

    settings = _settings()
    try:
        entry = model_entry(model or settings.model)
        path = ensure_model(entry, settings.models_dir, progress=True)
    except ModelFetchError as exc:
        raise _fail(str(exc)) from None
    err.print(f"[green]ready:[/green] {entry.id}", highlight=False)
    print(path)


@app.command()
def chat(
    url: Annotated[str | None, typer.Option(help="Server base URL; default: the configured host and port.")] = None,
    model: Annotated[str | None, typer.Option(help="Model name; default: the server's default model.")] = None,
    api_key: Annotated[
        str | None, typer.Option(help="Bearer key; default: $R1SERVE_API_KEY, else the first of R1SERVE_API_KEYS.")
    ] = None,
    system: Annotated[str | None, typer.Option(help="A system message to start the conversation with.")] = None,
) -> None:
    """Chat in the terminal: reasoning streams dimmed, the answer plain. Ctrl-D ends."""
    settings = _settings()
    base = (url or f"http://{settings.host}:{settings.port}").rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    key = api_key or os.environ.get("R1SERVE_API_KEY") or (settings.api_keys[0] if settings.api_keys else None)
    try:
        asyncio.run(_chat_loop(base, model, key, system))
    except KeyboardInterrupt:
        err.print()


async def _chat_loop(base: str, model: str | None, key: str | None, system: str | None) -> None:
    import aiohttp

    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    interactive = sys.stdin.isatty()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        while True:
            if interactive:
                err.print("[bold cyan]>[/bold cyan] ", end="")
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:
                return
            text = line.strip()
            if not text:
                continue
            history.append({"role": "user", "content": text})
            answer = await _chat_turn(session, base, model, history)
            if answer is None:
                history.pop()  # the turn failed; do not send it again
            else:
                # R1's multi-turn rule: the reasoning is not sent back.
                history.append({"role": "assistant", "content": answer})


async def _chat_turn(session: Any, base: str, model: str | None, history: list[dict[str, str]]) -> str | None:
    payload: dict[str, Any] = {"messages": history, "stream": True, "stream_options": {"include_usage": True}}
    if model:
        payload["model"] = model
    answer: list[str] = []
    in_reasoning = False
    usage: dict[str, Any] | None = None
    try:
        async with session.post(f"{base}/chat/completions", json=payload) as resp:
            if resp.status != 200:
                body = await resp.text()
                try:
                    message = json.loads(body)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = body[:500]
                err.print(f"[red]error {resp.status}:[/red] {message}", highlight=False)
                return None
            async for raw in resp.content:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out.print()
                    err.print(f"[red]error:[/red] {chunk['error'].get('message')}", highlight=False)
                    return None
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta", {})
                    if delta.get("reasoning_content"):
                        in_reasoning = True
                        out.print(delta["reasoning_content"], style="dim", end="", markup=False, highlight=False)
                    if delta.get("content"):
                        if in_reasoning:
                            out.print("\n")
                            in_reasoning = False
                        answer.append(delta["content"])
                        out.print(delta["content"], end="", markup=False, highlight=False)
    except Exception as exc:  # connection refused, reset mid-stream: say so and keep the REPL alive
        import aiohttp

        if not isinstance(exc, aiohttp.ClientError | json.JSONDecodeError | UnicodeDecodeError):
            raise
        out.print()
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        return None
    out.print()
    if usage:
        details = usage.get("completion_tokens_details") or {}
        err.print(
            f"[dim]{usage.get('prompt_tokens')} prompt + {usage.get('completion_tokens')} completion tokens "
            f"({details.get('reasoning_tokens', 0)} reasoning)[/dim]",
            highlight=False,
        )
    return "".join(answer)


if __name__ == "__main__":
    app()


# Accounts: API keys, usage, the database (r1serve.accounts.commands).
def _register_accounts() -> None:
    from r1serve.accounts.commands import db_app, keys_app, usage_command

    app.add_typer(keys_app, name="keys")
    app.add_typer(db_app, name="db")
    app.command("usage")(usage_command)


_register_accounts()


# Deployments: replicas behind an endpoint URL, managed through the server's API (r1serve.deployments.commands).
def _register_deployments() -> None:
    from r1serve.deployments.commands import deploy_app

    app.add_typer(deploy_app, name="deploy")


_register_deployments()
