"""CLAP in the model layer, on the offline test checkpoint; transformers' ClapModel and ClapProcessor called
directly are the judge."""

import hashlib
import io
import math
import shutil
import wave

import numpy as np
import pytest
import torch

from mmfuse.shared.models import (
    CLAP_LOGIT_SCALE_WEIGHT,
    audio_windows,
    clap_test_config,
    combine_parts,
    embed,
    get_encoder,
    learned_logit_scale,
    load_encoder,
    make_test_checkpoint,
    tower_cost,
)

RATE = 48_000
WINDOW = 10 * RATE


def digest(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def clip(seconds: float, seed: int) -> np.ndarray:
    """A clip that changes over time (a rising tone under noise), so that its windows differ."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * RATE)) / RATE
    tone = 0.3 * np.sin(2 * np.pi * (200 + 40 * t) * t)
    return (tone + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


def numpy_generator_state() -> tuple[bytes, int]:
    """Where numpy's global generator stands: its key and its position in it (each draw moves it)."""
    _, key, position, *_ = np.random.get_state()
    return key.tobytes(), position


def wav_bytes(samples: np.ndarray) -> bytes:
    data = io.BytesIO()
    with wave.open(data, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return data.getvalue()


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory):
    return make_test_checkpoint(tmp_path_factory.mktemp("models") / "clap-tiny", "tiny", kind="clap")


@pytest.fixture(scope="module")
def audio_encoder(clap_dir):
    return get_encoder("audio", str(clap_dir))  # as a worker loads it; one torch thread


@pytest.fixture(scope="module")
def judge(clap_dir):
    from transformers import ClapModel, ClapProcessor

    return ClapModel.from_pretrained(str(clap_dir)).eval(), ClapProcessor.from_pretrained(str(clap_dir))


def reference_audio(judge, samples: np.ndarray) -> np.ndarray:
    model, processor = judge
    with torch.no_grad():
        inputs = processor(audio=samples, sampling_rate=RATE, return_tensors="pt")
        return model.get_audio_features(**inputs).pooler_output[0].numpy()


def test_windows_cover_the_clip_from_the_start_and_end_on_its_last_samples():
    samples = np.arange(25 * RATE)
    assert [(w[0], len(w)) for w in audio_windows(samples, WINDOW)] == [
        (0, WINDOW),
        (WINDOW, WINDOW),
        (15 * RATE, WINDOW),
    ]
    assert [w[0] for w in audio_windows(samples[: 20 * RATE], WINDOW)] == [0, WINDOW]  # no overlap needed
    (whole,) = audio_windows(samples[:WINDOW], WINDOW)
    assert len(whole) == WINDOW
    (short,) = audio_windows(samples[:RATE], WINDOW)
    assert len(short) == RATE  # left to the feature extractor's repeat-padding
    first, last = audio_windows(samples[: WINDOW + 1], WINDOW)
    assert (first[0], last[0], len(last), last[-1]) == (0, 1, WINDOW, WINDOW)


@pytest.mark.parametrize("seconds", [1, 10])
def test_a_clip_of_up_to_10_s_is_one_window_as_clap_embeds_it(audio_encoder, judge, seconds):
    samples = clip(seconds, seed=seconds)
    parts = audio_encoder.prepare_waveform(samples)
    assert len(parts) == 1
    vector = combine_parts(audio_encoder.encode(parts))
    assert vector.dtype == np.float32 and vector.shape == (audio_encoder.dim,)
    np.testing.assert_allclose(vector, reference_audio(judge, samples), atol=1e-5)


def test_a_long_clip_is_the_normalised_mean_of_its_windows(audio_encoder, judge):
    samples = clip(25, seed=25)
    state = numpy_generator_state()
    first = combine_parts(audio_encoder.encode(audio_encoder.prepare_waveform(samples)))
    second = combine_parts(audio_encoder.encode(audio_encoder.prepare_waveform(samples)))
    assert numpy_generator_state() == state  # nothing drew from numpy's generator
    np.testing.assert_array_equal(first, second)

    windows = [samples[:WINDOW], samples[WINDOW : 2 * WINDOW], samples[15 * RATE :]]
    rows = np.stack([reference_audio(judge, window) for window in windows])
    assert float(rows[0] @ rows[2]) < 0.9999  # the windows differ: the mean is not any one of them
    mean = rows.mean(axis=0)
    np.testing.assert_allclose(first, mean / np.linalg.norm(mean), atol=1e-5)

    # The control: transformers alone crops a clip over 10 s at a random place, drawing from numpy.
    _, processor = judge
    processor(audio=samples, sampling_rate=RATE, return_tensors="pt")
    assert numpy_generator_state() != state


def test_embed_batches_the_windows_of_several_clips(audio_encoder):
    clips = [clip(25, seed=1), clip(1, seed=2), clip(10, seed=3)]
    raws = [wav_bytes(samples) for samples in clips]
    vectors = embed(audio_encoder, raws)
    assert vectors.shape == (3, audio_encoder.dim) and vectors.dtype == np.float32
    one_by_one = [combine_parts(audio_encoder.encode(audio_encoder.prepare(raw))) for raw in raws]
    np.testing.assert_allclose(vectors, np.stack(one_by_one), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)


def test_the_text_tower_is_claps(clap_dir, judge):
    model, processor = judge
    encoder = load_encoder("text", str(clap_dir))
    assert type(encoder).__name__ == "ClapTextEncoder" and encoder.dim == model.config.projection_dim
    texts = ["a dog barking", "the sound of rain and thunder on a tin roof"]
    tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.get_text_features(**tokens).pooler_output.numpy()
    np.testing.assert_allclose(embed(encoder, texts), expected, atol=1e-5)
    assert encoder.logit_scale == pytest.approx(float(model.logit_scale_a.detach().exp()), rel=1e-6)


def test_the_text_scale_is_the_audio_sides(clap_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    shutil.copytree(clap_dir, tmp_path, dirs_exist_ok=True)
    weights = load_file(tmp_path / "model.safetensors")
    weights["logit_scale_a"] = torch.tensor(math.log(33.0))
    weights["logit_scale_t"] = torch.tensor(math.log(7.0))
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert learned_logit_scale(str(tmp_path), CLAP_LOGIT_SCALE_WEIGHT) == pytest.approx(33.0, rel=1e-6)
    assert load_encoder("text", str(tmp_path)).logit_scale == pytest.approx(33.0, rel=1e-6)
    assert learned_logit_scale(str(tmp_path)) is None  # no CLIP "logit_scale" in a CLAP checkpoint


def test_the_audio_encoder_has_no_scale_and_refuses_other_checkpoints(audio_encoder, checkpoint_dir):
    assert audio_encoder.modality == "audio" and audio_encoder.logit_scale is None
    with pytest.raises(ValueError, match="not a CLAP checkpoint"):
        load_encoder("audio", str(checkpoint_dir))


def test_the_checkpoint_is_deterministic_and_the_cli_writes_it(clap_dir, tmp_path, capsys):
    from mmfuse.cli.main import main

    assert main(["models", "make-test", "--kind", "clap", "--size", "tiny", str(tmp_path / "cli")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert digest(tmp_path / "cli") == digest(clap_dir)
    other_seed = make_test_checkpoint(tmp_path / "seed1", "tiny", seed=1, kind="clap")
    assert digest(other_seed)["model.safetensors"] != digest(clap_dir)["model.safetensors"]
    assert main(["models", "make-test", "--kind", "clap", "--size", "b32", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_the_checkpoint_loads_as_clap_does(clap_dir):
    from transformers import (
        AutoTokenizer,
        ClapAudioModelWithProjection,
        ClapFeatureExtractor,
        ClapModel,
        ClapProcessor,
        ClapTextModelWithProjection,
    )

    path = str(clap_dir)
    extractor = ClapFeatureExtractor.from_pretrained(path)
    settings = (extractor.sampling_rate, extractor.max_length_s, extractor.feature_size, extractor.nb_max_samples)
    assert settings == (48_000, 10, 64, WINDOW)
    assert (extractor.truncation, extractor.padding, extractor.frequency_min, extractor.frequency_max) == (
        "rand_trunc",
        "repeatpad",
        50,
        14_000,
    )
    processor = ClapProcessor.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(tokenizer).__name__ == type(processor.tokenizer).__name__ == "RobertaTokenizer"
    ids = tokenizer("the sound of a dog")["input_ids"]
    assert (ids[0], ids[-1]) == (tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 2)
    assert tokenizer.pad_token_id == 1 and tokenizer.model_max_length == 512
    full = ClapModel.from_pretrained(path)
    audio = ClapAudioModelWithProjection.from_pretrained(path)
    text = ClapTextModelWithProjection.from_pretrained(path)
    assert torch.equal(audio.audio_projection.linear2.weight, full.audio_projection.linear2.weight)
    assert torch.equal(text.text_projection.linear2.weight, full.text_projection.linear2.weight)


def test_the_full_size_has_clap_htsat_unfuseds_parameters():
    from transformers import ClapModel

    config = clap_test_config("full")
    with torch.device("meta"):
        model = ClapModel(config)
    parameters = sum(p.numel() for p in model.parameters())
    assert 150e6 <= parameters <= 160e6, parameters  # laion/clap-htsat-unfused: 153.5 M
    assert not config.audio_config.enable_fusion


def test_tower_costs_of_clap(clap_dir, tmp_path):
    from transformers import AutoTokenizer

    from mmfuse.shared.models import REFERENCE_CAPTION

    # Tiny: 8 x 8 patches of the 256 x 256 spectrogram, a 32 x 32 grid, then 16 x 16; 8 x 8 windows.
    stage_0 = 2 * 32 * 32 * (4 * 16**2 + 2 * 16 * 64 + 2 * 64 * 16)
    stage_1 = 2 * 16 * 16 * (4 * 32**2 + 2 * 32 * 128 + 2 * 64 * 32)
    assert tower_cost("audio", str(clap_dir)) == stage_0 + stage_1
    tokens = len(AutoTokenizer.from_pretrained(str(clap_dir))(REFERENCE_CAPTION)["input_ids"])
    assert tower_cost("text", str(clap_dir)) == 2 * tokens * (4 * 32**2 + 2 * 32 * 128 + 2 * tokens * 32)
    with pytest.raises(ValueError, match="no vision tower"):
        tower_cost("image", str(clap_dir))

    clap_test_config("full").save_pretrained(tmp_path)  # HTSAT-tiny: 64 x 64 patches; widths 96 .. 768
    stages = [(2, 64, 96), (2, 32, 192), (6, 16, 384), (2, 8, 768)]
    expected = sum(d * side * side * (4 * h * h + 2 * h * 4 * h + 2 * 64 * h) for d, side, h in stages)
    assert tower_cost("audio", str(tmp_path)) == expected
    assert 5.6e9 < expected < 5.8e9
