"""One settings object for every mmfuse service, read from ``MMFUSE_*`` environment variables.

Each field documents its variable and carries its own validation rules (``setting(default, *rules)``);
``Settings.from_env()`` parses every variable and the object validates itself when it is built, so a
misconfigured service fails at start with the variable's name, never later in a request.

A rule is a function ``(value, settings) -> reason | None``: ``None`` accepts the value, a string says why
it is refused. Rules run in field order, so a rule may rely on the fields declared above its own.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_AUDIO_MODEL = "laion/clap-htsat-unfused"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("json", "text")

T = TypeVar("T")
Rule = Callable[[Any, "Settings"], str | None]


class SettingsError(ValueError):
    """A ``MMFUSE_*`` variable has a value that cannot be used."""


def env_name(field_name: str) -> str:
    """The environment variable of a settings field: ``job_ttl_s`` -> ``MMFUSE_JOB_TTL_S``."""
    return "MMFUSE_" + field_name.upper()


def setting(default: T, *rules: Rule) -> T:
    """A settings field: its default and the rules its value must pass."""
    return field(default=default, metadata={"rules": rules})


# --- rules ---------------------------------------------------------------------------------------------


def positive(value: float, _settings: Settings) -> str | None:
    return None if value > 0 else "must be > 0"


def non_negative(value: float, _settings: Settings) -> str | None:
    return None if value >= 0 else "must be >= 0"


def at_least(minimum: float) -> Rule:
    def rule(value: float, _settings: Settings) -> str | None:
        return None if value >= minimum else f"must be >= {minimum:g}"

    return rule


def below_field(other: str, why: str) -> Rule:
    """The value must be below another field's (declared above it)."""

    def rule(value: float, settings: Settings) -> str | None:
        limit = getattr(settings, other)
        return None if value < limit else f"must be below {env_name(other)} ({limit}): {why}"

    return rule


def one_of(*choices: str, ignore_case: bool = False) -> Rule:
    def rule(value: str, _settings: Settings) -> str | None:
        if (value.upper() if ignore_case else value) in choices:
            return None
        return f"expected {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}"

    return rule


def auto_or_positive_int(value: str, _settings: Settings) -> str | None:
    if value == "auto" or (value.isdigit() and int(value) >= 1):
        return None
    return f"expected auto or a whole number >= 1, got {value!r}"


def fraction(value: float, _settings: Settings) -> str | None:
    return None if 0 < value <= 1 else f"must be > 0 and <= 1, got {value:g}"


def tcp_port_or_zero(value: int, _settings: Settings) -> str | None:
    return None if 0 <= value < 65536 else "must be a TCP port or 0"


def listen_address(value: str, _settings: Settings) -> str | None:
    """What gunicorn's ``--bind`` takes: ``HOST:PORT`` (``[::]:PORT`` for IPv6) or ``unix:PATH``."""
    if value.startswith("unix:"):
        return None if len(value) > len("unix:") else "unix: needs a socket path"
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"expected HOST:PORT or unix:PATH, got {value!r}"
    return None


def ip_address(value: str, _settings: Settings) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f"{value!r} is not an IP address"
    return None


def torch_device(value: str, _settings: Settings) -> str | None:
    if value in ("cpu", "cuda") or (value.startswith("cuda:") and value[len("cuda:") :].isdigit()):
        return None
    return f"expected cpu, cuda or cuda:N, got {value!r}"


def half_precision_needs_cuda(value: str, settings: Settings) -> str | None:
    return "half precision needs a CUDA device" if value != "float32" and settings.device == "cpu" else None


def non_negative_delays(value: tuple[float, ...], _settings: Settings) -> str | None:
    return None if all(delay >= 0 for delay in value) else "delays must be >= 0"


def ip_networks(value: tuple[str, ...], _settings: Settings) -> str | None:
    for network in value:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError as exc:
            return str(exc)
    return None


def webhook_secrets_format(value: tuple[str, ...], _settings: Settings) -> str | None:
    if not value:
        return None
    from mmfuse_client.webhooks import decode_secrets  # the one home of the secret format

    try:
        decode_secrets(value)
    except ValueError as exc:
        return str(exc)
    return None


def redis_address(value: str, _settings: Settings) -> str | None:
    """A ``sentinel://`` URL must parse (shared/stores/client.py has the form); redis-py checks the others."""
    from mmfuse.shared.stores.client import is_sentinel_url, parse_sentinel_url  # the one home of the form

    if not value or not is_sentinel_url(value):
        return None
    try:
        parse_sentinel_url(value)
    except ValueError as exc:
        return str(exc)
    return None


def non_empty(value: str, _settings: Settings) -> str | None:
    return None if value.strip() else "must not be empty"


def below_redis_socket_timeout(value: int, _settings: Settings) -> str | None:
    """A blocking command must end before the client's socket timeout, which would count it as a failure."""
    from mmfuse.shared.stores.client import SOCKET_TIMEOUT_S

    limit_ms = SOCKET_TIMEOUT_S * 1000
    return None if value < limit_ms else f"must be below the Redis socket timeout ({limit_ms} ms)"


# --- the settings --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    # --- stores and broker ---
    # redis://HOST:PORT/DB, or Sentinel: sentinel://[:PASSWORD@]HOST:PORT[/DB];sentinel://HOST:PORT;... (kombu's
    # form, for the broker too; README "Redis with Sentinel")
    redis_url: str = setting("redis://127.0.0.1:6379/0", redis_address)
    broker_url: str = setting("", redis_address)  # empty: same as redis_url
    # the master group the sentinels of a sentinel:// URL monitor (`sentinel monitor <name> ...`)
    redis_sentinel_master: str = setting("mymaster", non_empty)
    # the sentinels' own password (their requirepass), if they have one; the URL's is the master's
    redis_sentinel_password: str = ""
    # Replicas that must acknowledge a submit's writes (Redis WAIT) before it is answered 202; 0: no wait.
    # Replication is asynchronous: without it, a failover can lose writes acknowledged just before it.
    redis_min_replicas_ack: int = setting(0, non_negative)
    # how long a submit waits for those acknowledgements before it answers 503 (and rolls back)
    redis_replicas_ack_timeout_ms: int = setting(500, positive, below_redis_socket_timeout)
    s3_endpoint: str = "127.0.0.1:9000"  # host:port, as the minio SDK takes it
    s3_access_key: str = "minioadmin"
    s3_secret_key: str = "minioadmin"
    s3_bucket: str = "mmfuse"
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    # job records, results and idempotency keys expire this long after submit
    job_ttl_s: int = setting(24 * 3600, positive)
    # an expired job's tombstone (its owner, when it expired) outlives the record this long: GET answers
    # 410 expired meanwhile, then 404 as for an id that never existed
    tombstone_ttl_s: int = setting(7 * 24 * 3600, positive)
    # Celery redelivers an unacked task after this long; must exceed the slowest task.
    broker_visibility_timeout_s: int = setting(3600, positive)
    # Each worker process beats this often; once its heartbeat is this old, the recovery sweep (every
    # worker_recovery_interval_s, on the maintenance pool) puts the tasks it held back on their queues:
    # a dead worker's tasks run again within lapse + sweep interval (docs/reliability.md).
    worker_heartbeat_lapse_s: float = setting(15.0, positive)
    worker_heartbeat_interval_s: float = setting(
        5.0, positive, below_field("worker_heartbeat_lapse_s", "a beat must come before the last one lapses")
    )
    worker_recovery_interval_s: float = setting(5.0, positive)

    # --- models ---
    model: str = DEFAULT_MODEL
    image_model: str = ""  # empty: same as model
    text_model: str = ""  # empty: same as model
    # The audio pool's CLAP checkpoint: its audio tower, and its text tower for the texts and labels that
    # audio is compared with (shared/spaces.py).
    audio_model: str = DEFAULT_AUDIO_MODEL
    device: str = setting("cpu", torch_device)  # cpu | cuda | cuda:N
    # float32 | float16 | bfloat16 (half types only on CUDA)
    dtype: str = setting("float32", one_of("float32", "float16", "bfloat16"), half_precision_needs_cuda)
    # Torch threads per encoder process: auto (the CPUs it may use, affinity or cgroup CPU quota, times
    # cpu_share) or a number; shared/cpus.py says how auto decides.
    torch_threads: str = setting("auto", auto_or_positive_int)
    # This pool's part of the CPUs under torch_threads=auto: 1 on a node of its own; where encoder pools
    # share a host, each one's part (`mmfuse up` sets it from each tower's cost).
    cpu_share: float = setting(1.0, fraction)
    # On CPU, the most torch threads one worker process of an encoder pool runs where the local stack
    # (`mmfuse up`, the tests, the bench) starts the pools with torch_threads=auto: a pool given more runs as
    # several worker processes (replicas on one host), each with its part. 0: one process with all of them.
    # Processes of one thread measured best for every tower on CPU (docs/performance.md): on 2 cores the bare
    # B/32 vision tower and MiniLM do 1.2-1.5x the items per second as 2 processes x 1 thread than as 1 x 2
    # (CLAP's audio tower 0.9-1.3x), and a process's task threads (decode, tokenisation) no longer take its
    # inference threads' cores: the audio pool did 5.45 clips/s against 4.13.
    image_threads_per_process: int = setting(1, non_negative)
    text_threads_per_process: int = setting(1, non_negative)
    audio_threads_per_process: int = setting(1, non_negative)
    # The scale of the cosine similarities in classify's softmax over labels. 0: the text checkpoint's own
    # (a CLIP's learned logit_scale, exp'd; 100 for a checkpoint without one, e.g. a sentence encoder).
    logit_scale: float = setting(0.0, non_negative)

    # --- batching, per pool ---
    image_max_batch_size: int = setting(16, positive)
    image_max_wait_ms: float = setting(5.0, non_negative)
    text_max_batch_size: int = setting(32, positive)
    text_max_wait_ms: float = setting(2.0, non_negative)
    # a batch item is one 10 s window of a clip (~0.3 s of one CPU thread at clap-htsat-unfused's size)
    audio_max_batch_size: int = setting(8, positive)
    audio_max_wait_ms: float = setting(10.0, non_negative)
    # trained heads in the fusion pool: the weights kept loaded per process (least recently used dropped
    # first), and their batching of jobs
    head_cache_bytes: int = setting(256 * 1024 * 1024, positive)
    head_max_batch_size: int = setting(64, positive)
    head_max_wait_ms: float = setting(2.0, non_negative)
    # threads per encoder worker: items waiting to join a batch
    worker_concurrency: int = setting(32, positive)
    # Wait max_wait_ms for a batch to fill even when no task is preparing items: bigger batches under a
    # steady trickle of arrivals (GPU), at the cost of max_wait_ms latency for a lone job.
    batch_wait_always: bool = False

    # --- API limits ---
    max_body_bytes: int = setting(64 * 1024 * 1024, positive)
    max_images: int = setting(16, positive)
    max_texts: int = setting(64, positive)
    max_labels: int = setting(256, positive)
    max_text_chars: int = setting(4096, positive)
    max_image_bytes: int = setting(16 * 1024 * 1024, positive)
    max_image_pixels: int = setting(40_000_000, positive)
    # long side / short side; preprocessing upscales the short side
    max_image_aspect_ratio: float = setting(20.0, at_least(1))
    image_formats: tuple[str, ...] = ("png", "jpeg", "webp", "gif", "bmp")
    max_audios: int = setting(8, positive)
    max_audio_bytes: int = setting(32 * 1024 * 1024, positive)
    # by the clip's header, before anything is decoded; a clip is encoded as ceil(seconds / 10) windows
    max_audio_seconds: float = setting(60.0, positive)
    max_audio_channels: int = setting(8, positive)
    min_audio_sample_rate: int = setting(
        4000, positive, below_field("max_audio_sample_rate", "the lowest sample rate must be below the highest")
    )
    max_audio_sample_rate: int = setting(384_000, positive)
    audio_formats: tuple[str, ...] = ("wav", "flac", "ogg", "mp3")
    max_wait_s: float = setting(30.0, non_negative)  # cap for GET /v1/jobs/<id>?wait= and POST Prefer: wait

    # --- gateway processes (gunicorn; `mmfuse gateway` and the local stack alike) ---
    gateway_bind: str = setting("0.0.0.0:8080", listen_address)  # `mmfuse up`: 127.0.0.1:8080
    gateway_workers: int = setting(2, positive)  # processes
    gateway_threads: int = setting(32, positive)  # threads per process: a long-poll holds one
    gateway_access_log: bool = False  # one log line per HTTP request (gunicorn's access log)

    # --- access ---
    auth_required: bool = True  # /v1 needs "Authorization: Bearer <key>" (mmfuse keys create)
    # job submissions per second and key (0: no limit); keys may override
    rate_limit_per_s: float = setting(50.0, non_negative)
    rate_limit_burst: int = setting(200, positive)

    # --- webhooks ---
    # whsec_… ; several sign side by side during rotation
    webhook_secrets: tuple[str, ...] = setting((), webhook_secrets_format)
    webhook_retry_schedule_s: tuple[float, ...] = setting(
        (5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 28800), non_negative_delays
    )
    webhook_connect_timeout_s: float = setting(10.0, positive)
    webhook_read_timeout_s: float = setting(10.0, positive)
    webhook_max_payload_bytes: int = setting(256 * 1024, positive)
    webhook_allow_networks: tuple[str, ...] = setting((), ip_networks)  # CIDRs admitted despite the SSRF guard
    # A job's webhook intent is written with its end, then handed to the queue; one still not handed over
    # this long after the end (the ender crashed, the broker refused) is queued by the outbox sweep, which
    # runs every webhook_outbox_interval_s (on the maintenance pool, sent by `mmfuse beat`).
    webhook_outbox_grace_s: float = setting(60.0, positive)
    webhook_outbox_interval_s: float = setting(30.0, positive)

    # --- POST /v1/embeddings (OpenAI-compatible; item limits as for jobs: max_texts, max_images, ...) ---
    # how long a request waits for its job; past it the job is canceled and the answer is 504
    embeddings_wait_s: float = setting(60.0, positive)
    # image URLs: one deadline for fetching all of a request's, and CIDRs admitted despite the SSRF guard
    image_url_timeout_s: float = setting(10.0, positive)
    image_url_allow_networks: tuple[str, ...] = setting((), ip_networks)

    # --- lifecycle: run by `mmfuse beat` on the maintenance pool ---
    # a job still queued/running this long after submit is failed
    job_deadline_s: int = setting(
        2 * 3600, positive, below_field("job_ttl_s", "a record that expires first is never failed")
    )
    reaper_interval_s: float = setting(60.0, positive)  # how often jobs past their deadline are looked for
    # how often S3 is swept for blobs of jobs that ended or expired
    cleanup_interval_s: float = setting(3600.0, positive)
    # A job's pending stage whose task the broker holds nowhere (not queued, not unacked: lost in a Redis
    # failover) this long after the stage's last sign of life has its task sent again by the lost-task
    # sweep, every orphan_sweep_interval_s (docs/reliability.md, "Redis failover").
    orphan_grace_s: float = setting(
        60.0, positive, below_field("job_deadline_s", "a lost task must be sent again before the reaper fails its job")
    )
    orphan_sweep_interval_s: float = setting(30.0, positive)

    # --- observability ---
    metrics_port: int = setting(0, tcp_port_or_zero)  # workers serve /metrics here; 0 disables
    metrics_address: str = setting("0.0.0.0", ip_address)  # the address workers serve /metrics on
    log_level: str = setting("INFO", one_of(*LOG_LEVELS, ignore_case=True))
    # json: one object per line, for log collectors; text: for people (`mmfuse up` uses it)
    log_format: str = setting("json", one_of(*LOG_FORMATS))

    def __post_init__(self) -> None:
        self.validate()

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def effective_image_model(self) -> str:
        return self.image_model or self.model

    @property
    def effective_text_model(self) -> str:
        return self.text_model or self.model

    def batching(self, modality: str) -> tuple[int, float]:
        """A tower's dynamic batching: (max batch size, max wait in ms), per modality it encodes."""
        return getattr(self, f"{modality}_max_batch_size"), getattr(self, f"{modality}_max_wait_ms")

    def threads_per_process(self, pool: str) -> int:
        """The most torch threads one local worker process of an encoder pool runs on CPU (0: no limit)."""
        return getattr(self, f"{pool}_threads_per_process")

    def models(self) -> dict[str, str]:
        """The model of each encoder pool: the embedding space its vectors are in (``shared.spaces``)."""
        return {"image": self.effective_image_model, "text": self.effective_text_model, "audio": self.audio_model}

    @property
    def shared_embedding_space(self) -> bool:
        """Image and text vectors are comparable only when both towers come from one checkpoint."""
        return self.effective_image_model == self.effective_text_model

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = env_name(f.name)
            if name in environ:
                values[f.name] = _parse(name, environ[name], f.default)
        return cls(**values)

    def validate(self) -> None:
        """Run every field's rules; the first refusal raises, naming the variable (runs on construction)."""
        for f in dataclasses.fields(self):
            for rule in f.metadata.get("rules", ()):
                reason = rule(getattr(self, f.name), self)
                if reason is not None:
                    raise SettingsError(f"{env_name(f.name)}: {reason}")


def _parse(name: str, raw: str, default: object) -> object:
    """Parse ``raw`` into the type of the field's default."""
    raw = raw.strip()
    try:
        if isinstance(default, bool):
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(f"expected a boolean, got {raw!r}")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, tuple):
            items = [item for item in raw.replace(",", " ").split() if item]
            if default and isinstance(default[0], (int, float)):
                return tuple(float(item) for item in items)
            return tuple(items)
        return raw
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, parsed once."""
    return Settings.from_env()
