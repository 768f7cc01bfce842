"""Accounts: API keys, usage ledger, prices and cost, per-key rate limits and budgets.

SQLite (WAL) in the data dir by default, PostgreSQL via ``R1SERVE_DATABASE_URL``. See service.py for
the request path and limiter.py for how limits hold across processes.
"""

from __future__ import annotations

from .keys import KeyHasher, generate_key, key_prefix, redact
from .limiter import Admission, LocalLimiter, SqlLimiter
from .prices import PriceBook, PriceVersion, cost_nanos, cost_usd
from .service import Accounts, Settlement, estimate_prompt_tokens, is_loopback
from .store import OPEN, KeyInfo, KeyStore, Principal

__all__ = [
    "OPEN",
    "Accounts",
    "Admission",
    "KeyHasher",
    "KeyInfo",
    "KeyStore",
    "LocalLimiter",
    "PriceBook",
    "PriceVersion",
    "Principal",
    "Settlement",
    "SqlLimiter",
    "cost_nanos",
    "cost_usd",
    "estimate_prompt_tokens",
    "generate_key",
    "is_loopback",
    "key_prefix",
    "redact",
]
