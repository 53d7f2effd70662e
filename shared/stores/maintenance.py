"""When each periodic maintenance task last ran: for operators, and for the tests that prove beat runs them.

Key: ``mmfuse:maintenance:last_run``  hash: task name -> ``"<unix time> <jobs handled>"``
"""

from __future__ import annotations

import time

from mmfuse.shared.stores.client import RedisStore, text

LAST_RUN_KEY = "mmfuse:maintenance:last_run"


class MaintenanceRuns(RedisStore):
    def record(self, task: str, handled: int) -> None:
        self._redis.hset(LAST_RUN_KEY, task, f"{time.time():.3f} {handled}")

    def last_runs(self) -> dict[str, tuple[float, int]]:
        """``{task: (unix time, jobs handled)}`` of each task's last run."""
        runs = {}
        for task, value in self._redis.hgetall(LAST_RUN_KEY).items():
            at, handled = text(value).split()
            runs[text(task)] = (float(at), int(handled))
        return runs
