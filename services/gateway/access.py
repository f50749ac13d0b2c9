"""Who is calling, and whether they may call now: API keys → tenants, a per-key rate limit, and a per-key limit on
the requests held open (event streams, waits)."""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections import Counter
from dataclasses import dataclass, field

from shared.errors import ConfigError

LOCAL_TENANT = "local"


@dataclass(frozen=True)
class Caller:
    tenant: str
    key_id: str | None = None  # a short fingerprint of the key, for logs and the rate limiter; None in local mode


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """``tenant=key,tenant=key`` (``OPENCLAW_API_KEYS``); unset (None) means local mode: one tenant, no keys."""

    def __init__(self, spec: str | None) -> None:
        self._keys: list[tuple[bytes, str]] = []
        for part in filter(None, (p.strip() for p in (spec or "").split(","))):
            tenant, sep, key = part.partition("=")
            if not sep or not tenant.strip() or len(key.strip()) < 16:
                raise ConfigError("OPENCLAW_API_KEYS must be tenant=key pairs separated by commas, keys of at "
                                  "least 16 characters")
            if not all("!" <= c <= "~" for c in key.strip()):  # HTTP sends a header's other bytes as latin-1
                raise ConfigError(f"OPENCLAW_API_KEYS gives tenant {tenant.strip()!r} a key with a character other "
                                  "than printable ASCII, which no header would match: use letters, digits and "
                                  "punctuation (for example `openssl rand -hex 32`)")
            if tenant.strip() == LOCAL_TENANT:  # local mode's one tenant: its executions open to anyone without a key
                raise ConfigError(f"OPENCLAW_API_KEYS names a tenant {LOCAL_TENANT!r}, the name local mode gives every "
                                  "caller: choose another name")
            digest = _digest(key.strip())
            if any(d == digest for d, _ in self._keys):  # two tenants' callers would see one tenant's executions
                raise ConfigError(f"OPENCLAW_API_KEYS gives tenant {tenant.strip()!r} a key another tenant has "
                                  "already: every key must be different")
            self._keys.append((digest, tenant.strip()))
        if spec is not None and not self._keys:  # a Secret made from an unset variable: local mode would open the API
            raise ConfigError("OPENCLAW_API_KEYS is set but empty: give tenant=key pairs, or leave it unset for local "
                              "mode (one tenant, no limits)")

    @property
    def local_mode(self) -> bool:
        return not self._keys

    def identify(self, key: str) -> Caller | None:
        """The caller a key belongs to, or None; compares every key in constant time."""
        d = _digest(key)
        found = None
        for digest, tenant in self._keys:
            if hmac.compare_digest(digest, d):
                found = Caller(tenant, d.hex()[:12])
        return found


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class RateLimiter:
    """A token bucket per key: ``per_minute`` sustained, ``burst`` at once. Per gateway replica."""

    per_minute: int
    burst: int
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def take(self, key_id: str) -> float | None:
        """None when the call may go ahead; else the seconds to wait (for Retry-After)."""
        now = time.monotonic()
        rate = self.per_minute / 60.0
        b = self._buckets.setdefault(key_id, _Bucket(float(self.burst), now))
        b.tokens = min(float(self.burst), b.tokens + (now - b.at) * rate)
        b.at = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return None
        return math.ceil((1.0 - b.tokens) / rate) if rate > 0 else 60.0


@dataclass
class OpenLimit:
    """How many long-lived requests (event streams, waits) each key holds open at once. Per gateway replica: each
    holds a subscription (an event stream, a consumer on the server) for as long as it lasts, which the rate limit,
    counting only arrivals, does not bound."""

    per_key: int
    _open: Counter[str] = field(default_factory=Counter)

    def open(self, key_id: str) -> bool:
        """Whether the key may hold one more; if so, it now does (until ``close``)."""
        if self._open[key_id] >= self.per_key:
            return False
        self._open[key_id] += 1
        return True

    def close(self, key_id: str) -> None:
        self._open[key_id] -= 1
        if self._open[key_id] <= 0:
            del self._open[key_id]
