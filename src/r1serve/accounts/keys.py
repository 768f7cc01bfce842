"""API key format, keyed hashing and the server secret.

A key is ``r1-`` + an 8-character visible prefix + ``_`` + a 43-character secret (256 random bits),
for example ``r1-k3v9x2ab_Qm...``. The database keeps the prefix (to find the row and to show in
listings) and ``HMAC-SHA256(server_secret, key)``; never the key. A stolen database without the
server secret does not let anyone check guesses offline.

The server secret is ``R1SERVE_KEY_SECRET`` when set, else a random secret created once in
``data_dir/key-secret`` (mode 0600). Every process that shares one database must use the same
secret: set ``R1SERVE_KEY_SECRET`` on every host (a fingerprint in the database catches a mismatch).
"""

from __future__ import annotations

import hmac
import os
import secrets
import string
from dataclasses import dataclass
from pathlib import Path

from r1serve.settings import Settings

KEY_TAG = "r1-"
PREFIX_LEN = 8
_PREFIX_ALPHABET = string.ascii_lowercase + string.digits
SECRET_FILE = "key-secret"


@dataclass(frozen=True)
class NewKey:
    key: str
    prefix: str


def generate_key() -> NewKey:
    prefix = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(PREFIX_LEN))
    return NewKey(key=f"{KEY_TAG}{prefix}_{secrets.token_urlsafe(32)}", prefix=prefix)


def key_prefix(token: str) -> str | None:
    """The prefix of a well-formed r1 key, else None (static keys and garbage)."""
    if not token.startswith(KEY_TAG) or len(token) < len(KEY_TAG) + PREFIX_LEN + 2:
        return None
    prefix = token[len(KEY_TAG) : len(KEY_TAG) + PREFIX_LEN]
    if token[len(KEY_TAG) + PREFIX_LEN] != "_" or any(c not in _PREFIX_ALPHABET for c in prefix):
        return None
    return prefix


def display_prefix(prefix: str) -> str:
    """How a key is shown anywhere after creation: ``r1-abcd1234…``."""
    return f"{KEY_TAG}{prefix}…"


def redact(token: str) -> str:
    """What an error message or a log line may say about a presented token."""
    prefix = key_prefix(token)
    return display_prefix(prefix) if prefix else "(not an r1serve key)"


class KeyHasher:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the key secret must be at least 16 bytes")
        self._secret = secret

    def hash(self, key: str) -> str:
        # hmac.digest: one call into OpenSSL (hmac.new builds two hash objects in Python first); the same
        # value as hmac.new(...).hexdigest(). It runs on every request.
        return hmac.digest(self._secret, key.encode(), "sha256").hex()

    def matches(self, key: str, stored_hash: str) -> bool:
        return hmac.compare_digest(self.hash(key).encode(), stored_hash.encode())

    def fingerprint(self) -> str:
        """Identifies the secret without revealing it (stored in the database to catch mismatches)."""
        return self.hash("r1serve key-secret fingerprint")[:16]


def load_secret(settings: Settings) -> bytes:
    configured: str | None = getattr(settings, "key_secret", None)
    if configured:
        return configured.encode()
    path = Path(settings.data_dir).expanduser() / SECRET_FILE
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32).encode()
    # O_EXCL: two processes starting together agree on whichever secret was written first.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as f:
        f.write(value)
    return value
