"""The Redis commands one request of the gateway makes for its API key and rate limit: one, in either case.

Redis's slow log, with its threshold at 0 µs, records every command with its arguments; those a Lua script
ran (client address ``?:0``) are left out, as the script is one round trip. The commands naming the key
hash or a rate-limit bucket are the ones counted: workers never touch those keys."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from mmfuse.shared.apikeys import KEYS_HASH

KEY_COMMANDS = (KEYS_HASH, "mmfuse:ratelimit:")
LUA_CLIENT = "?:0"  # the slow log's client address of a command run by a script


@contextmanager
def commands_run(redis_client) -> Iterator[list[str]]:
    """Every command clients sent Redis in the block, as text, in order (its slow log, every command logged)."""
    saved = redis_client.config_get("slowlog-*")
    redis_client.config_set("slowlog-log-slower-than", 0)
    redis_client.config_set("slowlog-max-len", 100_000)
    redis_client.slowlog_reset()
    commands: list[str] = []
    try:
        yield commands
    finally:
        entries = redis_client.slowlog_get(100_000)
        for name, value in saved.items():
            redis_client.config_set(name, value)
        for entry in reversed(entries):
            if entry.get("client_address") in (LUA_CLIENT, LUA_CLIENT.encode()):
                continue
            command = entry["command"]
            commands.append(command.decode(errors="replace") if isinstance(command, bytes) else command)


def key_commands(commands: list[str]) -> list[str]:
    return [command for command in commands if any(key in command for key in KEY_COMMANDS)]


def test_a_submit_authenticates_and_takes_a_token_in_one_call(stack, api, redis_client):
    url = f"{stack.gateway_url}/v1/jobs"
    assert api.post(url, json={"texts": ["warm-up"]}, timeout=10).status_code == 202  # the script is loaded
    with commands_run(redis_client) as commands:
        submit = api.post(url, json={"texts": ["counted"]}, timeout=10)
    assert submit.status_code == 202
    (admit,) = key_commands(commands)
    assert admit.startswith("EVALSHA") and KEYS_HASH in admit and "mmfuse:ratelimit:" in admit

    with commands_run(redis_client) as commands:
        read = api.get(submit.json()["status_url"], timeout=10)
    assert read.status_code == 200
    (lookup,) = key_commands(commands)
    assert lookup.startswith("HGET") and KEYS_HASH in lookup  # reads take no token
