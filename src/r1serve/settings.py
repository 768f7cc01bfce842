"""All configuration in one place: environment variables prefixed ``R1SERVE_`` and an optional ``.env``."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from platformdirs import user_cache_dir, user_data_dir
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_threads() -> int:
    # llama.cpp's own default is cores // 2, which halves decode speed on a 2-core machine.
    return max(1, os.cpu_count() or 1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="R1SERVE_", env_file=".env", extra="ignore")

    # --- HTTP
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 4 * 1024 * 1024
    log_level: str = "info"
    # Bounds on what one request may make the server render and tokenize, checked before the work (a
    # request past them is a 400 naming "messages" or "prompt"), so a body that the body limit lets in
    # cannot keep the server busy for long. 2,048 messages is OpenAI's own limit. 2 MiB of rendered
    # prompt is about 500,000 tokens of English, four times the largest context in the catalog.
    max_messages: int = Field(default=2048, ge=1)
    max_prompt_bytes: int = Field(default=2 * 1024 * 1024, ge=1)
    # Static bearer keys; empty means the API is open (see accounts for managed keys).
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Host names the server answers to (api/guard.py). Empty: loopback names when listening on loopback
    # (so DNS rebinding cannot reach it), any beyond it. "*": any.
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Web origins (https://app.example) whose pages may call the API; the server's own always may. "*": any.
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Seconds a connection may take to send its request line and headers, and the most connections
    # open at once (past it, new ones are refused): slow clients cannot hold the server's sockets.
    header_timeout: float = Field(default=10.0, gt=0)
    max_connections: int = Field(default=1024, ge=1)

    # --- Models
    model: str = "qwen2.5-coder-0.5b-instruct"
    models_dir: Path = Field(default_factory=lambda: Path(user_cache_dir("r1serve")) / "models")
    data_dir: Path = Field(default_factory=lambda: Path(user_data_dir("r1serve")))

    # --- Embedded llama.cpp engine
    n_threads: int = Field(default_factory=_default_threads)
    # llama.cpp repacks quantized weights for faster CPU matmuls (as llama-server does by default), but
    # its repacked kernels round differently for 1 row and for groups of rows, so a sequence's tokens can
    # depend on what else is in the batch (README, Determinism). False trades that speed for answers that
    # are the same alone or among others.
    repack_weights: bool = True
    n_gpu_layers: int = 0  # -1 offloads every layer when llama.cpp was built with a GPU backend
    n_ctx: int = 4096  # per sequence
    n_batch: int = 512  # tokens per llama_decode step (prompt chunks + one token per running sequence)
    max_running: int = 8  # sequences decoded together
    max_queued: int = 64  # requests waiting for a free sequence; past that, 503
    default_max_tokens: int = 2048
    # A Jinja chat template (the text, or a path to a file holding it) used instead of the GGUF's.
    chat_template: str | None = None
    # Queued streaming requests get an SSE keep-alive comment this often while they wait.
    queue_keepalive_seconds: float = 5.0
    # "auto": from the catalog, or detected from the chat template for a GGUF given by path.
    reasoning_format: Literal["auto", "deepseek_r1", "none"] = "auto"
    # Thinking budgets for reasoning_effort low / medium / high (tokens of reasoning).
    reasoning_budget_low: int = 256
    reasoning_budget_medium: int = 1024
    reasoning_budget_high: int = 4096

    # --- Gateway: upstream OpenAI-compatible providers (see r1serve.gateway)
    provider: str | None = None  # preset name(s), comma-separated: a fallback chain
    upstream: str | None = None  # base URL of any OpenAI-compatible server, e.g. http://host:8000/v1
    upstream_key_env: str | None = None  # the environment variable holding the upstream's API key
    upstream_model: str | None = None
    reasoning_dialect: Literal["auto", "think_in_content", "think_tags", "reasoning_content", "reasoning", "none"] = (
        "auto"
    )
    upstream_connect_timeout: float | None = None
    upstream_first_byte_timeout: float | None = None
    upstream_idle_timeout: float | None = None

    # --- Platform
    database_url: str | None = None
    admin_key: str | None = None
    providers_file: Path | None = None
    # --- Accounts (r1serve.accounts)
    # Server secret for the keyed hashes of API keys; default: a random one in data_dir/key-secret.
    # Every process sharing one database must use the same secret.
    key_secret: str | None = None
    # Prices per model, versioned (JSON; see r1serve.accounts.prices), inline or in a JSON/TOML file.
    prices: str | None = None
    prices_file: Path | None = None
    # Where limit counters live: "memory" (one process), "database" (shared by every process on one
    # database), "auto": memory for SQLite, database otherwise.
    limits_backend: Literal["auto", "memory", "database"] = "auto"
    reservation_ttl: float = 3600.0  # seconds before a crashed process's budget reservation is released
    ledger_flush_interval: float = 0.5
    keys_refresh_interval: float = 2.0
    # Console sign-in sessions (api/sessions.py), kept in memory: a restart signs everyone out.
    console_session_ttl: float = Field(default=12 * 3600.0, gt=0)  # seconds from sign-in
    console_session_idle: float = Field(default=3600.0, gt=0)  # seconds unused before a session ends
    console_max_sessions: int = Field(default=10_000, ge=1)  # past that, the least recently used ends

    # --- Deployments (r1serve.deployments): replicas as local child processes
    deployment_max_replicas: int = 8  # the most replicas one deployment may ask for
    # A replica that crashes this many times within the window is FAILED (and its deployment ERROR).
    deployment_crash_limit: int = 3
    deployment_crash_window: float = 120.0  # seconds
    deployment_ready_timeout: float = 600.0  # seconds a replica may take to answer /health
    deployment_grace_seconds: float = 30.0  # in-flight requests may finish this long before a replica ends
    # How often the supervisor checks deadlines, schedules, costs and budgets (seconds).
    deployment_tick_seconds: float = 1.0
    # SIMPLE-EXTEND extends, and INFINITE replaces its replicas, this long before the timeout (seconds;
    # at most a tenth of the timeout).
    deployment_extend_lead_seconds: float = 60.0
    # USD per replica-hour when neither the deployment nor its template names a price.
    deployment_price_per_hour: float = 0.0
    # USD per replica-hour by template, keyed by any name the template resolves from (catalog id, Ollama
    # tag, ...): '{"deepseek-r1:7b": 0.4, "qwen2.5-coder-0.5b-instruct": 0.02}' (deployments/templates.py).
    deployment_template_prices: dict[str, float] = {}
    # Replica-time goes to the ledger at most this often (seconds) while a deployment runs, and at its stop.
    deployment_bill_seconds: float = 10.0
    # A replica whose r1serve was killed ends itself after this long without its lease renewed; an
    # r1serve restarted within it re-adopts the replica (deployments/adoption.py).
    deployment_orphan_seconds: float = 30.0
    # Set by the supervisor for its replicas (the lease they watch); not for users.
    deployment_lease_file: str | None = None
    # Where replicas run: "local" child processes, or "ray" actors on a Ray cluster (pip install
    # 'r1serve[ray]'; deployments/ray_executor.py) at ray_address (None: RAY_ADDRESS or a local one, Ray's "auto").
    deployment_executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None

    @field_validator("api_keys", "allowed_hosts", "allowed_origins", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
