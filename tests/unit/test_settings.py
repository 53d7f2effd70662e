import dataclasses

import pytest

from mmfuse.shared.settings import Settings, SettingsError, env_name


def test_defaults_are_production_defaults():
    s = Settings.from_env({})
    assert s.model == "openai/clip-vit-base-patch32"
    assert s.effective_image_model == s.effective_text_model == s.model
    assert s.shared_embedding_space
    assert s.effective_broker_url == s.redis_url
    assert s.device == "cpu" and s.torch_threads == "auto" and s.cpu_share == 1.0


def test_parses_types_from_environment():
    s = Settings.from_env(
        {
            "MMFUSE_S3_SECURE": "true",
            "MMFUSE_IMAGE_MAX_BATCH_SIZE": "8",
            "MMFUSE_IMAGE_MAX_WAIT_MS": "2.5",
            "MMFUSE_TEXT_MODEL": "sentence-transformers/all-MiniLM-L6-v2",
            "MMFUSE_WEBHOOK_SECRETS": "whsec_c2VjcmV0LWE= whsec_c2VjcmV0LWI=",
            "MMFUSE_WEBHOOK_RETRY_SCHEDULE_S": "1, 2.5 10",
            "MMFUSE_IMAGE_FORMATS": "png,jpeg",
            "UNRELATED": "ignored",
        }
    )
    assert s.s3_secure is True
    assert s.image_max_batch_size == 8 and s.image_max_wait_ms == 2.5
    assert not s.shared_embedding_space
    assert s.webhook_secrets == ("whsec_c2VjcmV0LWE=", "whsec_c2VjcmV0LWI=")
    assert s.webhook_retry_schedule_s == (1.0, 2.5, 10.0)
    assert s.image_formats == ("png", "jpeg")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MMFUSE_IMAGE_MAX_BATCH_SIZE", "many", "MMFUSE_IMAGE_MAX_BATCH_SIZE"),
        ("MMFUSE_IMAGE_MAX_BATCH_SIZE", "0", "must be > 0"),
        ("MMFUSE_S3_SECURE", "maybe", "boolean"),
        ("MMFUSE_DEVICE", "tpu", "cpu, cuda or cuda:N"),
        ("MMFUSE_DTYPE", "float16", "CUDA"),
        ("MMFUSE_WEBHOOK_SECRETS", "plainsecret", "whsec_"),
        ("MMFUSE_WEBHOOK_SECRETS", "whsec_not*base64", "base64"),
        ("MMFUSE_WEBHOOK_ALLOW_NETWORKS", "10.0.0.0/33", "MMFUSE_WEBHOOK_ALLOW_NETWORKS"),
        ("MMFUSE_WEBHOOK_RETRY_SCHEDULE_S", "5 -1", "MMFUSE_WEBHOOK_RETRY_SCHEDULE_S: delays must be >= 0"),
        ("MMFUSE_WEBHOOK_READ_TIMEOUT_S", "0", "MMFUSE_WEBHOOK_READ_TIMEOUT_S: must be > 0"),
        ("MMFUSE_MAX_IMAGE_ASPECT_RATIO", "0.5", "MMFUSE_MAX_IMAGE_ASPECT_RATIO: must be >= 1"),
        ("MMFUSE_MAX_WAIT_S", "-1", "MMFUSE_MAX_WAIT_S: must be >= 0"),
        ("MMFUSE_RATE_LIMIT_PER_S", "-0.5", "MMFUSE_RATE_LIMIT_PER_S: must be >= 0"),
        ("MMFUSE_METRICS_PORT", "70000", "MMFUSE_METRICS_PORT: must be a TCP port or 0"),
        ("MMFUSE_DEVICE", "cuda:first", "cpu, cuda or cuda:N"),
        ("MMFUSE_DTYPE", "int8", "expected float32, float16 or bfloat16, got 'int8'"),
        ("MMFUSE_LOG_LEVEL", "verbose", "MMFUSE_LOG_LEVEL: expected DEBUG, INFO, WARNING, ERROR or CRITICAL"),
        ("MMFUSE_LOG_FORMAT", "xml", "MMFUSE_LOG_FORMAT: expected json or text, got 'xml'"),
        ("MMFUSE_GATEWAY_BIND", "8080", "MMFUSE_GATEWAY_BIND: expected HOST:PORT or unix:PATH"),
        ("MMFUSE_GATEWAY_BIND", "0.0.0.0:http", "MMFUSE_GATEWAY_BIND"),
        ("MMFUSE_GATEWAY_BIND", "0.0.0.0:65536", "MMFUSE_GATEWAY_BIND"),
        ("MMFUSE_GATEWAY_WORKERS", "0", "MMFUSE_GATEWAY_WORKERS: must be > 0"),
        ("MMFUSE_GATEWAY_WORKERS", "two", "MMFUSE_GATEWAY_WORKERS"),
        ("MMFUSE_GATEWAY_THREADS", "-4", "MMFUSE_GATEWAY_THREADS: must be > 0"),
        ("MMFUSE_GATEWAY_ACCESS_LOG", "sometimes", "MMFUSE_GATEWAY_ACCESS_LOG: expected a boolean"),
    ],
)
def test_invalid_values_name_the_variable(name, value, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({name: value})


def test_cuda_half_precision_is_accepted():
    s = Settings.from_env({"MMFUSE_DEVICE": "cuda:1", "MMFUSE_DTYPE": "bfloat16"})
    assert (s.device, s.dtype) == ("cuda:1", "bfloat16")


def test_gateway_and_logging_settings():
    defaults = Settings.from_env({})
    assert (defaults.gateway_bind, defaults.gateway_workers, defaults.gateway_threads) == ("0.0.0.0:8080", 2, 32)
    assert (defaults.log_level, defaults.log_format, defaults.gateway_access_log) == ("INFO", "json", False)
    s = Settings.from_env(
        {
            "MMFUSE_GATEWAY_BIND": "[::]:9000",
            "MMFUSE_GATEWAY_WORKERS": "4",
            "MMFUSE_GATEWAY_THREADS": "8",
            "MMFUSE_GATEWAY_ACCESS_LOG": "on",
            "MMFUSE_LOG_LEVEL": "warning",
            "MMFUSE_LOG_FORMAT": "text",
        }
    )
    assert (s.gateway_bind, s.gateway_workers, s.gateway_threads, s.gateway_access_log) == ("[::]:9000", 4, 8, True)
    assert (s.log_level, s.log_format) == ("warning", "text")
    assert Settings.from_env({"MMFUSE_GATEWAY_BIND": "unix:/run/mmfuse.sock"}).gateway_bind == "unix:/run/mmfuse.sock"


def test_a_rule_may_depend_on_a_field_above_it():
    with pytest.raises(SettingsError, match=r"MMFUSE_JOB_DEADLINE_S: must be below MMFUSE_JOB_TTL_S \(3600\)"):
        Settings.from_env({"MMFUSE_JOB_TTL_S": "3600"})
    assert Settings.from_env({"MMFUSE_JOB_TTL_S": "3600", "MMFUSE_JOB_DEADLINE_S": "3599"}).job_deadline_s == 3599


def test_settings_built_in_code_are_validated_too():
    with pytest.raises(SettingsError, match="MMFUSE_MAX_IMAGES: must be > 0"):
        Settings(max_images=0)
    with pytest.raises(SettingsError, match="MMFUSE_GATEWAY_WORKERS"):
        dataclasses.replace(Settings(), gateway_workers=0)


def test_every_field_is_a_variable():
    names = {env_name(f.name) for f in dataclasses.fields(Settings)}
    assert {"MMFUSE_GATEWAY_BIND", "MMFUSE_GATEWAY_WORKERS", "MMFUSE_LOG_FORMAT"} <= names
    assert "MMFUSE_EXTRA" not in names
