"""Prometheus metrics of the embedded engine (exposed by the API at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)

RUNNING = Gauge("r1serve_engine_requests_running", "Sequences being decoded", ["model"])
QUEUED = Gauge("r1serve_engine_requests_queued", "Requests waiting for a free sequence", ["model"])
REFUSED = Counter("r1serve_engine_admissions_refused_total", "Requests refused with 503: queue full", ["model"])
PROMPT_TOKENS = Counter("r1serve_engine_prompt_tokens_total", "Prompt tokens of admitted requests", ["model"])
CACHED_TOKENS = Counter(
    "r1serve_engine_prompt_tokens_cached_total", "Prompt tokens reused from the KV cache", ["model"]
)
PREFIX_HITS = Counter(
    "r1serve_engine_prefix_cache_hits_total", "Requests that reused a cached prompt prefix", ["model"]
)
GENERATED_TOKENS = Counter("r1serve_engine_generated_tokens_total", "Tokens generated", ["model"])
REASONING_TOKENS = Counter("r1serve_engine_reasoning_tokens_total", "Generated tokens inside the reasoning", ["model"])
TTFT = Histogram(
    "r1serve_engine_time_to_first_token_seconds",
    "Submission to first generated token",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
TTFAT = Histogram(
    "r1serve_engine_time_to_first_answer_token_seconds",
    "Submission to the first answer token (after the reasoning)",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
ITL = Histogram(
    "r1serve_engine_inter_token_latency_seconds",
    "Time between two tokens of one sequence",
    ["model"],
    buckets=_ITL_BUCKETS,
)
STREAM_COPIES = Counter(
    "r1serve_engine_kv_stream_copies_total",
    "KV streams copied from one slot to another: a cached prefix brought to a new sequence's slot, or a "
    "running sequence moved to close a gap in the running seq ids",
    ["model"],
)
KV_USED = Gauge(
    "r1serve_engine_kv_cache_usage_ratio",
    "Tokens the sequences hold (cached prompts included) / their total context; a prefix shared by "
    "several sequences counts for each of them",
    ["model"],
)


class ModelMetrics:
    """The series of one model, looked up once: the scheduler updates several of them per token, and
    ``labels()`` takes a lock and a dictionary lookup every time."""

    def __init__(self, model: str) -> None:
        self.running = RUNNING.labels(model)
        self.queued = QUEUED.labels(model)
        self.refused = REFUSED.labels(model)
        self.prompt_tokens = PROMPT_TOKENS.labels(model)
        self.cached_tokens = CACHED_TOKENS.labels(model)
        self.prefix_hits = PREFIX_HITS.labels(model)
        self.generated_tokens = GENERATED_TOKENS.labels(model)
        self.reasoning_tokens = REASONING_TOKENS.labels(model)
        self.ttft = TTFT.labels(model)
        self.ttfat = TTFAT.labels(model)
        self.itl = ITL.labels(model)
        self.kv_used = KV_USED.labels(model)
        self.stream_copies = STREAM_COPIES.labels(model)
