"""API keys and per-key rate limits, in Redis.

A key looks like ``mmf_<id>_<secret>``. Only its SHA-256 is stored (hash ``mmfuse:apikeys``: digest ->
record), so a leaked Redis dump reveals no usable key; the ``id`` part names the key in listings, logs
and job ownership without being a secret. The rate limit is a token bucket per key, updated atomically
by one Lua script, so every gateway process and host shares it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import asdict, dataclass

import redis

KEYS_HASH = "mmfuse:apikeys"
KEY_PREFIX = "mmf_"

# Token bucket: refill at ARGV[1] tokens/s up to ARGV[2]; take one token if there is one.
# Returns {allowed (0/1), seconds until the next token as a string}.
_TAKE_TOKEN_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
return {allowed, tostring(wait)}
"""


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    created_at: float
    revoked_at: float | None = None
    rate_per_s: float | None = None  # overrides the service's default rate limit for this key
    burst: int | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str | None:
    """The id part of a well-formed key, else None."""
    if not key.startswith(KEY_PREFIX):
        return None
    parts = key[len(KEY_PREFIX) :].split("_", 1)
    return parts[0] if len(parts) == 2 and parts[0] and parts[1] else None


class KeyStore:
    def __init__(self, client: redis.Redis):
        self.redis = client
        self._take_token = client.register_script(_TAKE_TOKEN_LUA)

    def create(self, name: str, rate_per_s: float | None = None, burst: int | None = None) -> tuple[str, ApiKey]:
        """A new key; the plaintext is returned once and never stored."""
        if rate_per_s is not None and rate_per_s < 0:
            raise ValueError("rate_per_s must be >= 0 (0: no limit)")
        if burst is not None and burst < 1:
            raise ValueError("burst must be >= 1")
        key_id = secrets.token_hex(6)
        plaintext = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        record = ApiKey(id=key_id, name=name, created_at=time.time(), rate_per_s=rate_per_s, burst=burst)
        self.redis.hset(KEYS_HASH, _digest(plaintext), json.dumps(asdict(record)))
        return plaintext, record

    def authenticate(self, key: str) -> ApiKey | None:
        """The active key record for a presented key, else None."""
        key_id = key_id_of(key)
        if key_id is None:
            return None
        raw = self.redis.hget(KEYS_HASH, _digest(key))
        if raw is None:
            return None
        record = ApiKey(**json.loads(raw))
        # The digest matched; comparing ids as well guards against a tampered record.
        if not hmac.compare_digest(record.id, key_id) or not record.active:
            return None
        return record

    def list(self) -> list[ApiKey]:
        records = [ApiKey(**json.loads(raw)) for raw in self.redis.hvals(KEYS_HASH)]
        return sorted(records, key=lambda r: r.created_at)

    def revoke(self, key_id: str) -> bool:
        for digest, raw in self.redis.hgetall(KEYS_HASH).items():
            record = ApiKey(**json.loads(raw))
            if record.id == key_id and record.active:
                revoked = dataclasses.replace(record, revoked_at=time.time())
                self.redis.hset(KEYS_HASH, digest, json.dumps(asdict(revoked)))
                return True
        return False

    def take_token(self, key_id: str, rate_per_s: float, burst: int) -> tuple[bool, float]:
        """Spend one request from the key's bucket: (allowed, seconds until a token is free)."""
        allowed, wait = self._take_token(
            keys=[f"mmfuse:ratelimit:{key_id}"], args=[rate_per_s, burst, f"{time.time():.6f}"]
        )
        return bool(int(allowed)), float(wait)
