"""What ``MMFUSE_REDIS_MIN_REPLICAS_ACK=1`` costs the accept rate: 202s per second of a gateway that waits for
one replica's acknowledgement (Redis WAIT) before each 202, against one that does not, measured in one run on
one stack: a Redis master with one replica on this host, moto S3, two gateways alike but for the setting,
and no workers (accepted jobs stay queued). Both gateways are flooded at the same time, each by its own
load generator, so that both see the same machine (on a shared machine, runs in turn differ by more than
the setting does).

    python -m bench.replicas [--seconds 10] [--connections 16] [--rounds 3] [--gateway-workers 2]

Prints each round's rates and the median of the rounds' ratios (on/off); docs/reliability.md quotes it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import requests

from bench.load import accept_flood
from mmfuse.cli.stack import LocalStack, free_port, gateway_command, redis_answers
from mmfuse.shared.stores import connect
from mmfuse.shared.stores.client import ReplicationNotAcknowledged
from mmfuse.shared.stores.jobs import JobStore

ACK_SETTINGS = {"off": {"MMFUSE_REDIS_MIN_REPLICAS_ACK": "0"}, "on": {"MMFUSE_REDIS_MIN_REPLICAS_ACK": "1"}}


def wait_until(check: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout_s:g} s")
        time.sleep(0.1)


def start_replica(stack: LocalStack) -> JobStore:
    """A redis-server replicating the stack's Redis, once it has acknowledged a write; a store over the
    master."""
    master_port = urlparse(stack.settings().redis_url).port
    port = free_port()
    data_dir = stack.var_dir / "redis-replica"
    data_dir.mkdir(parents=True, exist_ok=True)
    stack.spawn(
        "redis-replica",
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(data_dir)]
        + ["--replicaof", "127.0.0.1", str(master_port)],
    )
    wait_until(lambda: redis_answers("127.0.0.1", port), "the replica answers", 30)
    jobs = JobStore(connect(stack.settings().redis_url), ttl_s=60)

    def acknowledged() -> bool:
        try:
            jobs.wait_for_replicas(1, 1000)
        except ReplicationNotAcknowledged:
            return False
        return True

    wait_until(acknowledged, "the replica acknowledges a write", 60)
    return jobs


def acknowledgement_ms(jobs: JobStore, calls: int) -> tuple[float, float]:
    """Median milliseconds of a submit's extra step (mark + WAIT 1, one round trip) and of a PING, one
    client, one call at a time: what the setting adds to each submit, apart from the machine's noise."""
    timings: dict[str, list[float]] = {"wait": [], "ping": []}
    for _ in range(calls):
        for name, call in (("wait", lambda: jobs.wait_for_replicas(1, 1000)), ("ping", jobs.ping)):
            started = time.perf_counter()
            call()
            timings[name].append((time.perf_counter() - started) * 1e3)
    return statistics.median(timings["wait"]), statistics.median(timings["ping"])


def start_gateways(stack: LocalStack, workers: int) -> dict[str, str]:
    """One gateway per ``ACK_SETTINGS`` entry: name -> URL, once each answers /readyz."""
    urls = {}
    for name, env in ACK_SETTINGS.items():
        bind = f"127.0.0.1:{free_port()}"
        stack.spawn(f"gateway-ack-{name}", gateway_command(bind, workers), extra_env=env)
        urls[name] = f"http://{bind}"
    for name, url in urls.items():
        wait_until(lambda url=url: ready(url), f"gateway {name} is ready", 60)
    return urls


def ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/readyz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="each flood's length")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="floods of both gateways at once")
    parser.add_argument("--gateway-workers", type=int, default=2)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="mmfuse-bench-replicas-") as var_dir:
        env = {
            "MMFUSE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
            "MMFUSE_S3_ENDPOINT": f"127.0.0.1:{free_port()}",
            "MMFUSE_S3_BUCKET": "mmfuse-bench",
            "MMFUSE_LOG_LEVEL": "WARNING",
        }
        with LocalStack(var_dir=Path(var_dir), env=env) as stack:
            stack.ensure_redis()
            stack.ensure_s3()
            jobs = start_replica(stack)
            urls = start_gateways(stack, args.gateway_workers)
            api_key = stack.create_api_key("bench", rate_per_s=1e9, burst=10**9)
            ratios = []
            for round_ in range(1, args.rounds + 1):
                with ThreadPoolExecutor(len(urls)) as pool:
                    floods = {
                        name: pool.submit(accept_flood, url, args.connections, args.seconds, api_key)
                        for name, url in urls.items()
                    }
                    results = {name: flood.result() for name, flood in floods.items()}
                for name, result in results.items():
                    print(
                        f"round {round_}, MIN_REPLICAS_ACK {name}: {result['accepted_per_s']:.0f} jobs/s answered 202 "
                        f"(p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms), "
                        f"not 202: {result['not_accepted']} {result['other_status']}",
                        flush=True,
                    )
                ratios.append(results["on"]["accepted_per_s"] / results["off"]["accepted_per_s"])
            print(
                f"accept rate with MMFUSE_REDIS_MIN_REPLICAS_ACK=1 / without, median of {len(ratios)} rounds: "
                f"{statistics.median(ratios):.2f} (rounds: {', '.join(f'{r:.2f}' for r in ratios)}; "
                f"{args.connections} connections each, {args.gateway_workers} gateway workers each, one local replica)"
            )
            wait_ms, ping_ms = acknowledgement_ms(jobs, 1000)
            print(f"per submit, mark + WAIT 1: median {wait_ms:.3f} ms (a PING: {ping_ms:.3f} ms), 1000 calls")


if __name__ == "__main__":
    main()
