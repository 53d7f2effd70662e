import pytest

from mmfuse.shared.settings import Settings, SettingsError


def test_defaults_are_production_defaults():
    s = Settings.from_env({})
    assert s.model == "openai/clip-vit-base-patch32"
    assert s.effective_image_model == s.effective_text_model == s.model
    assert s.shared_embedding_space
    assert s.effective_broker_url == s.redis_url
    assert s.device == "cpu" and s.torch_threads == 1


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
    ],
)
def test_invalid_values_name_the_variable(name, value, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({name: value})


def test_cuda_half_precision_is_accepted():
    s = Settings.from_env({"MMFUSE_DEVICE": "cuda:1", "MMFUSE_DTYPE": "bfloat16"})
    assert (s.device, s.dtype) == ("cuda:1", "bfloat16")
