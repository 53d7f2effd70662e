"""``Idempotency-Key`` entries: which job a client's key made (``gateway/idempotency.py`` says why and how).

Key: ``mmfuse:idem:<API key id>:<sha256 of the Idempotency-Key header>``  string: the entry (the job's id and
its request's hash). It is written and deleted in the same transactions as the job's record
(``JobStore.create``, ``JobStore.delete``) and expires with it.
"""

from __future__ import annotations

from mmfuse.shared.stores.client import RedisStore, raw


def entry_key(scope: str, key_sha256: str) -> str:
    """The entry of one idempotency key, scoped per API key so that clients cannot collide."""
    return f"mmfuse:idem:{scope}:{key_sha256}"


class IdempotencyEntries(RedisStore):
    def get(self, key: str) -> bytes | None:
        return raw(self._redis.get(key))
