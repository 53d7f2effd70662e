"""The broker's queue depths, read for the metrics (``shared.metrics.StoreCollector``).

kombu's Redis transport keeps each Celery queue as a list named after it, plus one list per priority step
(``<queue>\\x06\\x16<step>``); they belong to kombu, this store only reads their lengths.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from mmfuse.shared.stores.client import RedisStore


class BrokerQueues(RedisStore):
    def __init__(self, client: redis.Redis, queues: Sequence[str]) -> None:
        super().__init__(client)
        self.queues = tuple(queues)

    def depths(self) -> dict[str, int]:
        """Messages waiting in each queue (all its priority lists), not counting those a worker holds."""
        from kombu.transport.redis import PRIORITY_STEPS, Channel

        keys = {
            queue: [queue] + [f"{queue}{Channel.sep}{step}" for step in PRIORITY_STEPS if step] for queue in self.queues
        }
        with self._redis.pipeline(transaction=False) as pipe:
            for queue in self.queues:
                for key in keys[queue]:
                    pipe.llen(key)
            lengths = iter(pipe.execute())
        return {queue: sum(next(lengths) for _ in keys[queue]) for queue in self.queues}
