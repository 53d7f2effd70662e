"""The dynamic batcher: flush on size and on time, ownership of results, failures, shutdown."""

import threading
import time

import pytest

from mmfuse.shared.batching import Batched, BatcherClosed, DynamicBatcher


class Recorder:
    def __init__(self, delay_s: float = 0.0, fail_on=None):
        self.batches: list[list] = []
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, items):
        with self.lock:
            self.batches.append(list(items))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [item * 10 for item in items]


def test_flushes_when_batch_is_full_without_waiting():
    fn = Recorder()
    batcher = DynamicBatcher(fn, max_batch_size=4, max_wait_ms=10_000)
    started = time.monotonic()
    futures = batcher.submit_many([1, 2, 3, 4])
    assert [f.result(timeout=5) for f in futures] == [Batched(10, 4), Batched(20, 4), Batched(30, 4), Batched(40, 4)]
    assert time.monotonic() - started < 2  # did not wait for the 10 s deadline
    assert fn.batches == [[1, 2, 3, 4]]
    batcher.close()


def test_flushes_partial_batch_after_max_wait():
    fn = Recorder()
    batcher = DynamicBatcher(fn, max_batch_size=64, max_wait_ms=100)
    started = time.monotonic()
    futures = batcher.submit_many([1, 2])
    assert [f.result(timeout=5) for f in futures] == [Batched(10, 2), Batched(20, 2)]
    elapsed = time.monotonic() - started
    assert 0.09 <= elapsed < 2
    assert fn.batches == [[1, 2]]
    batcher.close()


def test_results_go_to_their_own_callers_across_threads():
    fn = Recorder(delay_s=0.01)
    batcher = DynamicBatcher(fn, max_batch_size=8, max_wait_ms=5)
    results = {}

    def producer(base):
        futures = batcher.submit_many(list(range(base, base + 10)))
        results[base] = [f.result(timeout=10).value for f in futures]

    threads = [threading.Thread(target=producer, args=(base,)) for base in range(0, 200, 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for base, values in results.items():
        assert values == [v * 10 for v in range(base, base + 10)]
    assert max(len(b) for b in fn.batches) > 1
    assert all(len(b) <= 8 for b in fn.batches)
    assert sorted(i for b in fn.batches for i in b) == list(range(200))  # each item run exactly once
    batcher.close()


def test_a_failing_item_fails_only_itself():
    fn = Recorder(fail_on=3)
    batcher = DynamicBatcher(fn, max_batch_size=5, max_wait_ms=10_000)
    futures = batcher.submit_many([1, 2, 3, 4, 5])
    assert futures[0].result(timeout=5) == Batched(10, 1)  # rerun alone after the batch failed
    assert futures[4].result(timeout=5) == Batched(50, 1)
    with pytest.raises(ValueError, match="bad item 3"):
        futures[2].result(timeout=5)
    assert futures[1].result().value == 20 and futures[3].result().value == 40
    batcher.close()


def test_wrong_result_count_is_an_error_for_the_batch():
    batcher = DynamicBatcher(lambda items: [0], max_batch_size=2, max_wait_ms=10_000)
    futures = batcher.submit_many(["a", "b"])
    # isolated reruns return one result each, so each item gets its own answer
    assert [f.result(timeout=5) for f in futures] == [Batched(0, 1), Batched(0, 1)]
    single = DynamicBatcher(lambda items: [], max_batch_size=1, max_wait_ms=0)
    with pytest.raises(RuntimeError, match="0 results for 1"):
        single.submit("x").result(timeout=5)
    batcher.close()
    single.close()


def test_close_answers_every_pending_item_once():
    fn = Recorder(delay_s=0.02)
    batcher = DynamicBatcher(fn, max_batch_size=3, max_wait_ms=50)
    futures = batcher.submit_many(list(range(20)))
    batcher.close(timeout=10)
    assert [f.result(timeout=0).value for f in futures] == [i * 10 for i in range(20)]
    assert sorted(i for b in fn.batches for i in b) == list(range(20))
    with pytest.raises(BatcherClosed):
        batcher.submit(99)


def test_stats_callback_reports_batches():
    seen = []
    batcher = DynamicBatcher(lambda items: items, max_batch_size=2, max_wait_ms=10_000, on_batch=seen.append)
    for f in batcher.submit_many([1, 2, 3, 4]):
        f.result(timeout=5)
    batcher.close()
    assert [s.size for s in seen] == [2, 2]
    assert all(s.inference_s >= 0 and s.max_queue_wait_s >= 0 and s.failed == 0 for s in seen)


def test_no_wait_when_no_producer_is_preparing_items():
    fn = Recorder()
    expecting = {"more": False}
    asked = threading.Event()  # the batcher holds the queued items and asks whether more are coming

    def expecting_more() -> bool:
        asked.set()
        return expecting["more"]

    batcher = DynamicBatcher(fn, max_batch_size=64, max_wait_ms=2_000, expecting_more=expecting_more)
    started = time.monotonic()
    assert batcher.submit(1).result(timeout=5) == Batched(10, 1)
    assert time.monotonic() - started < 1  # not the 2 s deadline
    expecting["more"] = True  # someone is preparing: the batcher waits for them, up to the deadline
    asked.clear()
    first = batcher.submit(2)
    assert asked.wait(5)  # it holds item 2 alone, and was told more are coming
    second = batcher.submit(3)
    assert [first.result(timeout=5), second.result(timeout=5)] == [Batched(20, 2), Batched(30, 2)]
    assert fn.batches == [[1], [2, 3]]
    batcher.close()
