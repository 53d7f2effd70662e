"""API keys and per-key rate limits, in Redis.

A key looks like ``mmf_<id>_<secret>``. Only its SHA-256 is stored (hash ``mmfuse:apikeys``: digest ->
record), so a leaked Redis dump reveals no usable key; the ``id`` part names the key in listings, logs
and job ownership without being a secret. The rate limit is a token bucket per key, updated atomically
by one Lua script, so every gateway process and host shares it; a job submission looks its key up and
takes a token in that same script, one round trip.
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

# Look the key up (KEYS[1] field ARGV[1]: the key's digest) and, if its record is active and names the id
# the key carries (ARGV[2]), take one token from its bucket (KEYS[2]): refilled at the key's rate per second
# up to its burst, the record's own or else the defaults (ARGV[3], ARGV[4]); a rate of 0 is no limit.
# Returns {record or false, allowed (0/1), seconds until the next token, rate, burst} (numbers as strings).
_ADMIT_LUA = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return {false, 0, '0', '0', '0'} end
local key = cjson.decode(raw)
if key.id ~= ARGV[2] or (key.revoked_at ~= nil and key.revoked_at ~= cjson.null) then
  return {raw, 0, '0', '0', '0'}
end
local rate = tonumber(ARGV[3])
if key.rate_per_s ~= nil and key.rate_per_s ~= cjson.null then rate = key.rate_per_s end
local burst = tonumber(ARGV[4])
if key.burst ~= nil and key.burst ~= cjson.null then burst = key.burst end
if rate <= 0 then return {raw, 1, '0', tostring(rate), tostring(burst)} end
local now = tonumber(ARGV[5])
local state = redis.call('HMGET', KEYS[2], 'tokens', 'at')
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
redis.call('HSET', KEYS[2], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[2], math.ceil(burst / rate) + 60)
return {raw, allowed, tostring(wait), tostring(rate), tostring(burst)}
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


@dataclass(frozen=True)
class RateLimit:
    per_s: float  # tokens added per second; 0: no limit
    burst: int  # the bucket's size


@dataclass(frozen=True)
class Admission:
    """A job submission's key and rate limit, decided in one round trip."""

    key: ApiKey | None  # None: unknown, malformed or revoked (and no token was taken)
    allowed: bool  # a token was taken, or the key has no limit
    retry_after_s: float  # when not allowed: seconds until the bucket holds a token
    limit: RateLimit  # the key's own limit, else the default


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
        self._admit = client.register_script(_ADMIT_LUA)

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
        return _active_record(self.redis.hget(KEYS_HASH, _digest(key)), key_id)

    def admit(self, key: str, default_limit: RateLimit) -> Admission:
        """Authenticate a presented key and take one token from its rate limit, in one Lua call: the key's
        active record (else None, and no token is taken) and whether a token was free."""
        key_id = key_id_of(key)
        if key_id is None:
            return Admission(key=None, allowed=False, retry_after_s=0.0, limit=default_limit)
        raw, allowed, wait_s, rate, burst = self._admit(
            keys=[KEYS_HASH, _bucket_key(key_id)],
            args=[_digest(key), key_id, default_limit.per_s, default_limit.burst, f"{time.time():.6f}"],
        )
        record = _active_record(raw, key_id)
        if record is None:
            return Admission(key=None, allowed=False, retry_after_s=0.0, limit=default_limit)
        return Admission(
            key=record,
            allowed=bool(int(allowed)),
            retry_after_s=float(wait_s),
            limit=RateLimit(per_s=float(rate), burst=int(float(burst))),
        )

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


def _bucket_key(key_id: str) -> str:
    return f"mmfuse:ratelimit:{key_id}"


def _active_record(raw: bytes | str | None, key_id: str) -> ApiKey | None:
    """The record stored under a key's digest if it is active and names the id the key carries."""
    if raw is None:
        return None
    record = ApiKey(**json.loads(raw))
    # The digest matched; comparing ids as well guards against a tampered record.
    if not hmac.compare_digest(record.id, key_id) or not record.active:
        return None
    return record
