"""API keys: created, listed and revoked in the database; checked from an in-memory cache.

Nothing on the request path reads the database: :meth:`KeyStore.authenticate` looks the key's prefix up
in a dict and compares HMACs in constant time. The cache is reloaded right after a change made through
this store, and a background poll (``keys_refresh_interval``, default 2 s) picks up changes made by
other processes (another r1serve sharing the PostgreSQL, or the CLI): a revocation takes effect
everywhere within that interval.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import math
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, get_args

from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from r1serve.errors import AuthenticationError, InvalidRequest

from .keys import KeyHasher, display_prefix, generate_key, key_prefix, redact
from .models import ApiKey, Meta, nanos_to_usd, table, usd_to_nanos

log = logging.getLogger("r1serve.accounts")

BudgetPeriod = Literal["total", "day", "month"]
Period = Literal["total", "day", "month"]
PERIODS: tuple[str, ...] = get_args(Period)


@dataclass(frozen=True)
class Principal:
    """Who is calling, with everything the limiter and the scope check need."""

    key_id: str  # ledger identity: a managed key's id, "static-N", "admin-env", or "open"
    name: str
    kind: Literal["managed", "static", "admin-env", "open"]
    prefix: str | None = None
    admin: bool = False
    models: frozenset[str] | None = None  # lower-case ids / aliases; None: all
    rpm: int | None = None
    tpm: int | None = None
    budget_nanos: int | None = None
    budget_period: str = "total"
    expires_at: dt.datetime | None = None

    @property
    def limited(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.budget_nanos is not None

    def may_use(self, *names: str | None) -> bool:
        """True when any of ``names`` (the model asked for, the model served) is in the key's scope."""
        if self.models is None:
            return True
        return any(n is not None and n.lower() in self.models for n in names)


OPEN = Principal(key_id="open", name="open", kind="open")


@dataclass(frozen=True)
class KeyInfo:
    """A key as listed: never the key itself."""

    id: str
    prefix: str
    name: str
    models: list[str] | None
    admin: bool
    rpm: int | None
    tpm: int | None
    budget_usd: float | None
    budget_period: str
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    created_at: dt.datetime

    @property
    def display(self) -> str:
        return display_prefix(self.prefix)

    @property
    def active(self) -> bool:
        now = dt.datetime.now(dt.UTC)
        return self.revoked_at is None and (self.expires_at is None or _aware(self.expires_at) > now)

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "prefix": self.display,
            "name": self.name,
            "models": self.models,
            "admin": self.admin,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "budget_usd": self.budget_usd,
            "budget_period": self.budget_period,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "created_at": self.created_at.isoformat(),
            "active": self.active,
        }


def _aware(when: dt.datetime) -> dt.datetime:
    # SQLite hands timezone-aware columns back naive; everything is stored in UTC.
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(
        id=row.id,
        prefix=row.prefix,
        name=row.name,
        models=row.models.split(",") if row.models else None,
        admin=row.is_admin,
        rpm=row.rpm,
        tpm=row.tpm,
        budget_usd=None if row.budget_nanos is None else nanos_to_usd(row.budget_nanos),
        budget_period=row.budget_period,
        expires_at=_aware(row.expires_at) if row.expires_at else None,
        revoked_at=_aware(row.revoked_at) if row.revoked_at else None,
        created_at=_aware(row.created_at),
    )


@dataclass(frozen=True)
class _Cached:
    key_hash: str
    principal: Principal
    revoked: bool


def _principal(row: ApiKey) -> Principal:
    return Principal(
        key_id=row.id,
        name=row.name,
        kind="managed",
        prefix=row.prefix,
        admin=row.is_admin,
        models=frozenset(m.strip().lower() for m in row.models.split(",") if m.strip()) if row.models else None,
        rpm=row.rpm,
        tpm=row.tpm,
        budget_nanos=row.budget_nanos,
        budget_period=row.budget_period,
        expires_at=_aware(row.expires_at) if row.expires_at else None,
    )


def _unauthorized(message: str) -> AuthenticationError:
    return AuthenticationError(message, headers={"WWW-Authenticate": "Bearer"})


MISSING_KEY = (
    "You didn't provide an API key. Send it in an Authorization header using Bearer auth "
    "(Authorization: Bearer YOUR_KEY)."
)


# Upper bounds of a key's limits: past them a number is a typo, and the database columns (32-bit rpm and
# tpm, budgets in nano-dollars in 64 bits) would overflow.
LIMIT_BOUNDS: dict[str, float] = {"rpm": 1_000_000_000, "tpm": 1_000_000_000, "budget_usd": 1_000_000_000.0}


def check_limit(field: str, value: float | None) -> None:
    if value is None:
        return
    if not math.isfinite(value) or value < 0 or value > LIMIT_BOUNDS[field]:
        raise InvalidRequest(f"{field} must be between 0 and {LIMIT_BOUNDS[field]:,.0f}", param=field)


def model_scope(models: Iterable[str] | None) -> list[str] | None:
    """The models a key may use; None (not given) means all. An empty list is refused rather than read as
    all, which would widen a key's scope by mistake."""
    if models is None:
        return None
    items = [m.strip() for m in models if m.strip()]
    if not items:
        raise InvalidRequest(
            "models must name at least one model; leave it out (or null) for all models", param="models"
        )
    bad = [m for m in items if "," in m]
    if bad:
        raise InvalidRequest(f"a model name cannot contain a comma: {bad[0]!r}", param="models")
    return items


class KeyStore:
    def __init__(
        self,
        engine: Engine,
        hasher: KeyHasher,
        *,
        static_keys: Sequence[str] = (),
        admin_key: str | None = None,
    ) -> None:
        self._engine = engine
        self._hasher = hasher
        # Static keys are kept only as HMACs in memory too, so a heap dump or a repr shows no key.
        self._static = [hasher.hash(k).encode() for k in static_keys]
        # Principals are frozen: one per static key serves every request.
        self._static_principals = [
            Principal(key_id=f"static-{i}", name=f"R1SERVE_API_KEYS[{i}]", kind="static")
            for i in range(len(self._static))
        ]
        self._admin_hash = hasher.hash(admin_key) if admin_key else None
        self._cache: dict[str, _Cached] = {}
        self._stamp: tuple[object, ...] | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ secret check

    def check_secret(self) -> None:
        """Record the secret's fingerprint on first use; refuse a different secret afterwards."""
        fingerprint = self._hasher.fingerprint()
        with self._engine.begin() as conn:
            stored = conn.execute(select(Meta.value).where(Meta.name == "key_secret_fingerprint")).scalar()
            if stored is None:
                conn.execute(table(Meta).insert().values(name="key_secret_fingerprint", value=fingerprint))
            elif stored != fingerprint:
                raise RuntimeError(
                    "this database's API keys were hashed with a different key secret: every r1serve sharing "
                    "the database needs the same R1SERVE_KEY_SECRET (or the same data_dir/key-secret file)"
                )

    # ------------------------------------------------------------------ cache

    def _read_stamp(self) -> tuple[object, ...]:
        with self._engine.connect() as conn:
            row = conn.execute(select(func.count(), func.max(ApiKey.version), func.sum(ApiKey.version))).one()
        return tuple(row)

    def refresh(self, *, force: bool = False) -> bool:
        """Reload the cache if any key changed (blocking; run off the event loop). True if reloaded."""
        stamp = self._read_stamp()
        if not force and stamp == self._stamp:
            return False
        with Session(self._engine) as session:
            rows = session.scalars(select(ApiKey)).all()
        cache = {
            r.prefix: _Cached(key_hash=r.key_hash, principal=_principal(r), revoked=r.revoked_at is not None)
            for r in rows
        }
        with self._lock:
            self._cache, self._stamp = cache, stamp
        return True

    @property
    def has_managed_keys(self) -> bool:
        # Revoked keys count: revoking the last key must not open the server again.
        return bool(self._cache)

    @property
    def auth_configured(self) -> bool:
        """True when any key exists: managed (even if revoked or expired), static, or the admin key."""
        return bool(self._static) or self._admin_hash is not None or self.has_managed_keys

    # ------------------------------------------------------------------ request path (memory only)

    def authenticate(self, token: str | None, *, now: dt.datetime | None = None) -> Principal:
        """The caller for a bearer token; raises AuthenticationError (never naming the key)."""
        if token is None:
            raise _unauthorized(MISSING_KEY)
        prefix = key_prefix(token)
        if prefix is not None:
            cached = self._cache.get(prefix)
            if cached is not None and self._hasher.matches(token, cached.key_hash):
                if cached.revoked:
                    raise _unauthorized(f"The API key {redact(token)} has been revoked.")
                expires = cached.principal.expires_at
                if expires is not None and expires <= (now or dt.datetime.now(dt.UTC)):
                    raise _unauthorized(f"The API key {redact(token)} has expired.")
                return cached.principal
        else:
            digest = self._hasher.hash(token).encode()
            if self._admin_hash is not None and hmac.compare_digest(digest, self._admin_hash.encode()):
                return Principal(key_id="admin-env", name="R1SERVE_ADMIN_KEY", kind="admin-env", admin=True)
            matched = -1
            for i, h in enumerate(self._static):  # all compared: timing does not tell which is close
                if hmac.compare_digest(digest, h):
                    matched = i
            if matched >= 0:
                return self._static_principals[matched]
        raise _unauthorized(f"Incorrect API key provided: {redact(token)}.")

    # ------------------------------------------------------------------ admin (blocking: CLI or thread)

    def create(
        self,
        name: str,
        *,
        models: Iterable[str] | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        budget_usd: float | None = None,
        budget_period: str = "total",
        expires_at: dt.datetime | None = None,
        admin: bool = False,
    ) -> tuple[str, KeyInfo]:
        """A new key: returns the key (show it once; it cannot be recovered) and its listing."""
        name = name.strip()
        if not name:
            raise InvalidRequest("a key needs a name", param="name")
        if budget_period not in PERIODS:
            raise InvalidRequest(f"budget_period must be one of {', '.join(PERIODS)}", param="budget_period")
        for field, value in (("rpm", rpm), ("tpm", tpm), ("budget_usd", budget_usd)):
            check_limit(field, value)
        model_list = model_scope(models)
        new = generate_key()
        now = dt.datetime.now(dt.UTC)
        row = ApiKey(
            id=uuid.uuid4().hex,
            prefix=new.prefix,
            key_hash=self._hasher.hash(new.key),
            name=name,
            models=",".join(model_list) if model_list else None,
            is_admin=admin,
            rpm=rpm,
            tpm=tpm,
            budget_nanos=None if budget_usd is None else usd_to_nanos(budget_usd),
            budget_period=budget_period,
            expires_at=_aware(expires_at) if expires_at else None,
            created_at=now,
            version=_version_stamp(),
        )
        with self._engine.begin() as conn:
            conn.execute(table(ApiKey).insert().values(**{c.name: getattr(row, c.key) for c in table(ApiKey).c}))
        self.refresh(force=True)
        log.info("created API key %s (%s)", display_prefix(new.prefix), name)
        return new.key, _info(row)

    def list(self, *, include_revoked: bool = True) -> list[KeyInfo]:
        with Session(self._engine) as session:
            rows = session.scalars(select(ApiKey).order_by(ApiKey.created_at)).all()
        infos = [_info(r) for r in rows]
        return infos if include_revoked else [i for i in infos if i.revoked_at is None]

    def get(self, ident: str) -> KeyInfo | None:
        row = self._find(ident)
        return _info(row) if row is not None else None

    def _find(self, ident: str) -> ApiKey | None:
        """A key by id, by prefix, or by its displayed form (``r1-abcd1234…``)."""
        ident = ident.strip().rstrip("…").rstrip(".")
        prefix = ident[len("r1-") :] if ident.startswith("r1-") else ident
        prefix = prefix.split("_", 1)[0]
        with Session(self._engine) as session:
            return session.scalars(select(ApiKey).where((ApiKey.id == ident) | (ApiKey.prefix == prefix))).first()

    def revoke(self, ident: str) -> KeyInfo | None:
        row = self._find(ident)
        if row is None:
            return None
        with self._engine.begin() as conn:
            conn.execute(
                update(ApiKey)
                .where(ApiKey.id == row.id, ApiKey.revoked_at.is_(None))
                .values(revoked_at=dt.datetime.now(dt.UTC), version=_version_stamp())
            )
        self.refresh(force=True)
        log.info("revoked API key %s", display_prefix(row.prefix))
        return self.get(row.id)

    def update(self, ident: str, **changes: object) -> KeyInfo | None:
        """Change limits, scope, name or expiry (admin API). ``budget_usd`` is in dollars."""
        row = self._find(ident)
        if row is None:
            return None
        allowed = {"name", "models", "rpm", "tpm", "budget_usd", "budget_period", "expires_at", "admin"}
        unknown = set(changes) - allowed
        if unknown:
            raise InvalidRequest(f"unknown key fields: {', '.join(sorted(unknown))}")
        values: dict[str, object] = {}
        for field, value in changes.items():
            if field in LIMIT_BOUNDS:
                check_limit(field, value)  # type: ignore[arg-type]
            if field == "budget_usd":
                values["budget_nanos"] = None if value is None else usd_to_nanos(float(value))  # type: ignore[arg-type]
            elif field == "models":
                items = model_scope(value)  # type: ignore[arg-type]
                values["models"] = ",".join(items) if items else None
            elif field == "admin":
                values["is_admin"] = bool(value)
            elif field == "budget_period" and value not in PERIODS:
                raise InvalidRequest(f"budget_period must be one of {', '.join(PERIODS)}", param="budget_period")
            else:
                values[field] = value
        values["version"] = _version_stamp()
        with self._engine.begin() as conn:
            conn.execute(update(ApiKey).where(ApiKey.id == row.id).values(**values))
        self.refresh(force=True)
        return self.get(row.id)

    def current(self, key_id: str, *, now: dt.datetime | None = None) -> Principal | None:
        """A managed key's principal as it is now (limits and scope as last changed), or None once it is
        revoked, expired or gone: a console session made with the key re-checks it on every call."""
        for cached in self._cache.values():
            if cached.principal.key_id == key_id:
                expires = cached.principal.expires_at
                if cached.revoked or (expires is not None and expires <= (now or dt.datetime.now(dt.UTC))):
                    return None
                return cached.principal
        return None

    def principal(self, key_id: str) -> Principal | None:
        for cached in self._cache.values():
            if cached.principal.key_id == key_id:
                return cached.principal
        return None

    def with_limits(self, principal: Principal, **limits: object) -> Principal:
        return replace(principal, **limits)  # type: ignore[arg-type]


_last_stamp = 0
_stamp_lock = threading.Lock()


def _version_stamp() -> int:
    """Strictly increasing in this process, and wall-clock based so other processes' changes sort too."""
    global _last_stamp
    import time

    with _stamp_lock:
        _last_stamp = max(_last_stamp + 1, time.time_ns() // 1000)
        return _last_stamp
