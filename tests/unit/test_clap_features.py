"""shared/clap_features.py: CLAP's vectorised log-mel features, against transformers' ClapFeatureExtractor
called directly as the judge (its own per-frame loop), and the audio encoder's parts and vectors built on them
against ClapModel fed the extractor's features."""

import numpy as np
import pytest
import torch

from mmfuse.shared.clap_features import TRUNCATION, ClapLogMel
from mmfuse.shared.models import (
    CLAP_FEATURE_EXTRACTOR_SETTINGS,
    audio_windows,
    combine_parts,
    get_encoder,
    make_test_checkpoint,
)

RATE = 48_000
WINDOW = 10 * RATE
TOLERANCE_DB = 1e-4  # absolute, in dB: the features are the extractor's up to float32 rounding


def extractor(**changes):
    """A ClapFeatureExtractor with laion/clap-htsat-unfused's settings (as make_test_checkpoint writes them)."""
    from transformers import ClapFeatureExtractor

    return ClapFeatureExtractor(**{**CLAP_FEATURE_EXTRACTOR_SETTINGS, **changes})


def judged(feature_extractor, window: np.ndarray) -> np.ndarray:
    """The judge: the extractor's features of one window, as the audio encoder used to call it."""
    features = feature_extractor(window, sampling_rate=feature_extractor.sampling_rate, truncation=TRUNCATION)
    return np.asarray(features["input_features"][0])


def noise(length: int, scale: float, seed: int) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(length)).astype(np.float32)


def chirp(length: int) -> np.ndarray:
    """A tone rising from 50 Hz to 14 kHz: every mel band in turn, and silence-level bands around it."""
    t = np.arange(length) / RATE
    seconds = length / RATE
    return (0.5 * np.sin(2 * np.pi * (50 * t + (14_000 - 50) * t**2 / (2 * seconds)))).astype(np.float32)


FULL_WINDOWS = {
    "noise": noise(WINDOW, 0.1, seed=1),
    "chirp": chirp(WINDOW),
    "silence": np.zeros(WINDOW, dtype=np.float32),
    "loud": np.sign(noise(WINDOW, 1.0, seed=2)) * np.float32(1000.0),  # a square-ish clip far past full scale
    "tiny": noise(WINDOW, 1e-10, seed=3),  # every band on the -100 dB floor
    "near-floor": noise(WINDOW, 4e-6, seed=4),  # bands on both sides of the floor
}
# 1000 and 160000 repeat exactly; 1001 repeats 479 times with 521 samples left; over half a window: once.
SHORT_LENGTHS = [1, 1000, 1001, WINDOW // 3, WINDOW // 2 + 1, WINDOW - 1]


def assert_close_to_judge(fast: ClapLogMel, feature_extractor, window: np.ndarray) -> None:
    expected = judged(feature_extractor, window)
    got = fast(window)
    assert got.dtype == expected.dtype == np.float32
    frames = feature_extractor.nb_max_samples // feature_extractor.hop_length + 1
    assert got.shape == expected.shape == (1, frames, feature_extractor.feature_size)
    assert float(np.abs(got - expected).max()) <= TOLERANCE_DB


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory):
    return make_test_checkpoint(tmp_path_factory.mktemp("models") / "clap-tiny", "tiny", kind="clap")


@pytest.fixture(scope="module")
def checkpoint_extractor(clap_dir):
    from transformers import ClapFeatureExtractor

    return ClapFeatureExtractor.from_pretrained(str(clap_dir))


@pytest.mark.parametrize("name", FULL_WINDOWS)
def test_a_full_window_is_the_extractors(checkpoint_extractor, name):
    assert checkpoint_extractor.padding == "repeatpad"
    assert_close_to_judge(ClapLogMel.from_extractor(checkpoint_extractor), checkpoint_extractor, FULL_WINDOWS[name])


def test_the_windows_cover_the_range_of_the_features(checkpoint_extractor):
    """The control for the cases above: they reach the floor, loud values, and values just above the floor."""
    fast = ClapLogMel.from_extractor(checkpoint_extractor)
    assert np.all(fast(FULL_WINDOWS["silence"]) == -100.0) and np.all(fast(FULL_WINDOWS["tiny"]) == -100.0)
    assert fast(FULL_WINDOWS["loud"]).min() > 40.0
    near_floor = fast(FULL_WINDOWS["near-floor"])
    assert np.any(near_floor == -100.0) and np.any((near_floor > -100.0) & (near_floor < -90.0))
    chirp_features = fast(FULL_WINDOWS["chirp"])
    assert chirp_features.max() > 10.0 and np.any(chirp_features == -100.0)


@pytest.mark.parametrize("padding", ["repeatpad", "repeat", "pad"])
@pytest.mark.parametrize("length", SHORT_LENGTHS)
def test_a_short_window_is_padded_as_the_extractor_pads_it(padding, length):
    feature_extractor = extractor(padding=padding)
    fast = ClapLogMel.from_extractor(feature_extractor)
    assert_close_to_judge(fast, feature_extractor, noise(length, 0.2, seed=length))
    assert_close_to_judge(fast, feature_extractor, chirp(length))


def test_the_padding_modes_differ_on_a_short_window():
    """The control for the padding test: a window padded the wrong way would fail it."""
    window = noise(1001, 0.2, seed=5)  # repeat and repeatpad differ in its last 521 samples
    features = {padding: judged(extractor(padding=padding), window) for padding in ("repeatpad", "repeat", "pad")}
    assert np.abs(features["repeatpad"] - features["repeat"]).max() > 1.0
    assert np.abs(features["repeatpad"] - features["pad"]).max() > 1.0


def test_other_geometries_follow_the_extractors_settings():
    feature_extractor = extractor(feature_size=32, hop_length=320, fft_window_size=512, max_length_s=1)
    fast = ClapLogMel.from_extractor(feature_extractor)
    window = noise(RATE, 0.1, seed=6)
    expected = judged(feature_extractor, window)
    assert expected.shape == (1, RATE // 320 + 1, 32)
    np.testing.assert_allclose(fast(window), expected, rtol=0, atol=TOLERANCE_DB)
    np.testing.assert_allclose(fast(window[:999]), judged(feature_extractor, window[:999]), rtol=0, atol=TOLERANCE_DB)


def test_what_it_does_not_implement_is_refused():
    with pytest.raises(ValueError, match="padding 'zeros'"):
        ClapLogMel.from_extractor(extractor(padding="zeros"))  # the extractor would pad it with zeros silently
    fast = ClapLogMel.from_extractor(extractor())
    with pytest.raises(ValueError, match="longer than 480000"):
        fast(np.zeros(WINDOW + 1, dtype=np.float32))  # the extractor would crop it at a random place
    with pytest.raises(ValueError, match="mono samples"):
        fast(np.zeros((2, 1000), dtype=np.float32))
    with pytest.raises(ValueError, match="mono samples"):
        fast(np.zeros(0, dtype=np.float32))
    assert not fast.hann.flags.writeable and not fast.mel_filters.flags.writeable  # shared by task threads


def test_the_encoders_parts_and_vectors_are_claps_on_the_extractors_features(clap_dir, checkpoint_extractor):
    from transformers import ClapModel

    encoder = get_encoder("audio", str(clap_dir))
    model = ClapModel.from_pretrained(str(clap_dir)).eval()
    rng = np.random.default_rng(7)
    for seconds in (0.5, 10, 25):
        samples = (0.3 * rng.standard_normal(round(seconds * RATE))).astype(np.float32)
        parts = encoder.prepare_waveform(samples)
        windows = audio_windows(samples, WINDOW)
        expected_parts = [
            checkpoint_extractor(window, sampling_rate=RATE, truncation=TRUNCATION, return_tensors="pt")[
                "input_features"
            ][0]
            for window in windows
        ]
        assert len(parts) == len(expected_parts) == len(windows)
        for part, expected in zip(parts, expected_parts, strict=True):
            assert part.dtype == expected.dtype == torch.float32 and part.shape == expected.shape == (1, 1001, 64)
            torch.testing.assert_close(part, expected, rtol=0, atol=TOLERANCE_DB)
        with torch.no_grad():
            rows = model.get_audio_features(input_features=torch.stack(expected_parts)).pooler_output.numpy()
        mean = rows.mean(axis=0)
        np.testing.assert_allclose(combine_parts(encoder.encode(parts)), mean / np.linalg.norm(mean), atol=1e-5)
