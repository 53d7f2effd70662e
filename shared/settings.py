"""One settings object for every mmfuse service, read from ``MMFUSE_*`` environment variables.

Each field documents its variable; ``Settings.from_env()`` parses and validates them all at once so a
misconfigured service fails at start with the variable's name, never later in a request.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_MODEL = "openai/clip-vit-base-patch32"


class SettingsError(ValueError):
    """A ``MMFUSE_*`` variable has a value that cannot be used."""


def _env_name(field_name: str) -> str:
    return "MMFUSE_" + field_name.upper()


@dataclass(frozen=True)
class Settings:
    # --- stores and broker ---
    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: str = ""  # empty: same as redis_url
    s3_endpoint: str = "127.0.0.1:9000"  # host:port, as the minio SDK takes it
    s3_access_key: str = "minioadmin"
    s3_secret_key: str = "minioadmin"
    s3_bucket: str = "mmfuse"
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    job_ttl_s: int = 24 * 3600  # job records, results and idempotency keys expire this long after submit
    # Celery redelivers an unacked task after this long; must exceed the slowest task.
    broker_visibility_timeout_s: int = 3600

    # --- models ---
    model: str = DEFAULT_MODEL
    image_model: str = ""  # empty: same as model
    text_model: str = ""  # empty: same as model
    device: str = "cpu"  # cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | float16 | bfloat16 (half types only on CUDA)
    torch_threads: int = 1  # per worker process; 2 threads collapse under contention on small CPUs
    logit_scale: float = 100.0  # CLIP's trained temperature for zero-shot softmax

    # --- batching, per pool ---
    image_max_batch_size: int = 16
    image_max_wait_ms: float = 5.0
    text_max_batch_size: int = 32
    text_max_wait_ms: float = 2.0
    worker_concurrency: int = 32  # threads per encoder worker: items waiting to join a batch
    # Wait max_wait_ms for a batch to fill even when no task is preparing items: bigger batches under a
    # steady trickle of arrivals (GPU), at the cost of max_wait_ms latency for a lone job.
    batch_wait_always: bool = False

    # --- API limits ---
    max_body_bytes: int = 64 * 1024 * 1024
    max_images: int = 16
    max_texts: int = 64
    max_labels: int = 256
    max_text_chars: int = 4096
    max_image_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_image_aspect_ratio: float = 20.0  # long side / short side; preprocessing upscales the short side
    image_formats: tuple[str, ...] = ("png", "jpeg", "webp", "gif", "bmp")
    max_wait_s: float = 30.0  # cap for GET /v1/jobs/<id>?wait=

    # --- access ---
    auth_required: bool = True  # /v1 needs "Authorization: Bearer <key>" (mmfuse keys create)
    rate_limit_per_s: float = 50.0  # job submissions per second and key (0: no limit); keys may override
    rate_limit_burst: int = 200

    # --- webhooks ---
    webhook_secrets: tuple[str, ...] = ()  # whsec_… ; several sign side by side during rotation
    webhook_retry_schedule_s: tuple[float, ...] = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 28800)
    webhook_connect_timeout_s: float = 10.0
    webhook_read_timeout_s: float = 10.0
    webhook_max_payload_bytes: int = 256 * 1024
    webhook_allow_networks: tuple[str, ...] = ()  # CIDRs admitted despite the SSRF guard

    # --- lifecycle: run by `mmfuse beat` on the maintenance pool ---
    job_deadline_s: int = 2 * 3600  # a job still queued/running this long after submit is failed (< job_ttl_s)
    reaper_interval_s: float = 60.0  # how often jobs past their deadline are looked for
    cleanup_interval_s: float = 3600.0  # how often S3 is swept for blobs of jobs that ended or expired

    # --- observability ---
    metrics_port: int = 0  # workers serve /metrics here; 0 disables
    log_level: str = "INFO"

    extra: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def effective_image_model(self) -> str:
        return self.image_model or self.model

    @property
    def effective_text_model(self) -> str:
        return self.text_model or self.model

    @property
    def shared_embedding_space(self) -> bool:
        """Image and text vectors are comparable only when both towers come from one checkpoint."""
        return self.effective_image_model == self.effective_text_model

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            name = _env_name(f.name)
            if name in environ:
                values[f.name] = _parse(name, environ[name], f.default)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        def bad(name: str, why: str) -> SettingsError:
            return SettingsError(f"{_env_name(name)}: {why}")

        positive = (
            "job_ttl_s",
            "broker_visibility_timeout_s",
            "torch_threads",
            "image_max_batch_size",
            "text_max_batch_size",
            "worker_concurrency",
            "max_body_bytes",
            "max_images",
            "max_texts",
            "max_labels",
            "max_text_chars",
            "max_image_bytes",
            "max_image_pixels",
            "rate_limit_burst",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise bad(name, "must be > 0")
        if self.max_image_aspect_ratio < 1:
            raise bad("max_image_aspect_ratio", "must be >= 1")
        for name in ("image_max_wait_ms", "text_max_wait_ms", "max_wait_s", "rate_limit_per_s"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise bad("device", f"expected cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise bad("dtype", f"expected float32, float16 or bfloat16, got {self.dtype!r}")
        if self.dtype != "float32" and self.device == "cpu":
            raise bad("dtype", "half precision needs a CUDA device")
        if self.webhook_secrets:
            from mmfuse_client.webhooks import decode_secrets  # the one home of the secret format

            try:
                decode_secrets(self.webhook_secrets)
            except ValueError as exc:
                raise bad("webhook_secrets", str(exc)) from None
        for net in self.webhook_allow_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise bad("webhook_allow_networks", str(exc)) from None
        if any(d < 0 for d in self.webhook_retry_schedule_s):
            raise bad("webhook_retry_schedule_s", "delays must be >= 0")
        for name in ("webhook_connect_timeout_s", "webhook_read_timeout_s", "webhook_max_payload_bytes"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be > 0")
        for name in ("job_deadline_s", "reaper_interval_s", "cleanup_interval_s"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be > 0")
        if self.job_deadline_s >= self.job_ttl_s:
            raise bad(
                "job_deadline_s",
                f"must be below MMFUSE_JOB_TTL_S ({self.job_ttl_s}): a record that expires first is never failed",
            )
        if not 0 <= self.metrics_port < 65536:
            raise bad("metrics_port", "must be a TCP port or 0")


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
