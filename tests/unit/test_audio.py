"""shared/audio.py: format sniffing, the header checks of inspect_audio and the decode to mono 48 kHz, against
soundfile + numpy + soxr called directly as the judge."""

import dataclasses
import io
import tracemalloc

import numpy as np
import pytest
import soundfile
import soxr

from mmfuse.shared.audio import (
    CLAP_SAMPLE_RATE,
    AudioInfo,
    AudioLimits,
    AudioRejected,
    decode_audio,
    inspect_audio,
    sniff_audio_format,
)
from mmfuse.shared.models import InputError
from mmfuse.shared.settings import Settings
from tests import audio_samples as samples

# The contract's defaults (Settings' own are checked against them in test_limits_from_settings).
LIMITS = AudioLimits(
    max_bytes=32 * 1024 * 1024,
    max_seconds=60.0,
    max_channels=8,
    min_sample_rate=4000,
    max_sample_rate=384_000,
    formats=("wav", "flac", "ogg", "mp3"),
)
CONTENT_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "ogg": "audio/ogg", "mp3": "audio/mpeg"}


def reference_decode(data: bytes) -> np.ndarray:
    """The judge: soundfile's whole-file read, numpy's mean over channels, soxr's one-shot resampler."""
    x, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    mono = x.mean(axis=1, dtype=np.float32)
    return mono if rate == CLAP_SAMPLE_RATE else soxr.resample(mono, rate, CLAP_SAMPLE_RATE, quality="HQ")


def rejected(data: bytes, limits: AudioLimits = LIMITS) -> AudioRejected:
    with pytest.raises(AudioRejected) as caught:
        inspect_audio(data, limits)
    return caught.value


MATRIX = [
    pytest.param(codec, channels, rate, id=f"{codec.id}-{channels}ch-{rate}")
    for codec in samples.CODECS
    for channels in (1, 2)
    for rate in samples.SAMPLE_RATES
    if codec.supports(rate)
]


@pytest.mark.parametrize(("codec", "channels", "rate"), MATRIX)
def test_every_format_decodes_to_mono_48k(codec, channels, rate):
    if not codec.available:
        pytest.skip(f"this libsndfile cannot write {codec.sf_format}/{codec.subtype}")
    signal = samples.tone_noise(1.5, rate, channels, seed=channels)
    data = samples.encode(signal, rate, codec)

    info = inspect_audio(data, LIMITS)
    assert info == AudioInfo(codec.format, CONTENT_TYPES[codec.format], rate, channels, len(signal))
    assert info.seconds == pytest.approx(1.5)
    assert sniff_audio_format(data) == (codec.format, CONTENT_TYPES[codec.format])

    out = decode_audio(data, LIMITS)
    assert out.dtype == np.float32 and out.ndim == 1 and out.flags.c_contiguous
    assert len(out) == round(len(signal) * CLAP_SAMPLE_RATE / rate) == 72_000
    reference = reference_decode(data)
    assert len(reference) == len(out)
    np.testing.assert_allclose(out, reference, rtol=0, atol=1e-6)
    # and it is the signal written: the original's channel mean, resampled, up to the codec's loss
    original = signal.mean(axis=1, dtype=np.float32)
    if rate != CLAP_SAMPLE_RATE:
        original = soxr.resample(original, rate, CLAP_SAMPLE_RATE, quality="HQ")
    if codec.lossless:
        np.testing.assert_allclose(out, original, rtol=0, atol=1e-4)  # 16-bit quantisation: 1.5e-5
    else:
        assert np.corrcoef(out, original)[0, 1] > 0.9


def test_long_clip_decodes_across_blocks_like_the_one_shot_resampler():
    # 10 s at 44.1 kHz, stereo: several of the decoder's blocks, each resampled as a stream
    data = samples.encode(samples.tone_noise(10, 44_100, 2, seed=3), 44_100, samples.CODEC["wav16"])
    out = decode_audio(data, LIMITS)
    assert len(out) == 480_000
    np.testing.assert_array_equal(out, reference_decode(data))


def test_chirp_round_trips_through_flac():
    signal = samples.chirp(2.0, 16_000)
    data = samples.encode(signal, 16_000, samples.CODEC["flac"])
    expected = soxr.resample(signal, 16_000, CLAP_SAMPLE_RATE, quality="HQ")
    np.testing.assert_allclose(decode_audio(data, LIMITS), expected, rtol=0, atol=1e-4)


def test_decode_is_deterministic():
    for codec_id in ("mp3", "vorbis", "flac"):
        data = samples.clip(codec_id, 44_100, 2, seconds=2.0)
        first = decode_audio(data, LIMITS)
        again = decode_audio(bytes(data), dataclasses.replace(LIMITS))
        assert first.tobytes() == again.tobytes()


def test_sniff():
    assert sniff_audio_format(samples.wav_bytes()) == ("wav", "audio/wav")
    assert sniff_audio_format(b"fLaC\0\0\0\x22") == ("flac", "audio/flac")
    assert sniff_audio_format(b"OggS\0\x02") == ("ogg", "audio/ogg")
    assert sniff_audio_format(b"ID3\x04\0\0\0\0\0\0") == ("mp3", "audio/mpeg")
    assert sniff_audio_format(b"\xff\xfb\x90\x64") == ("mp3", "audio/mpeg")  # MPEG-1 layer III
    assert sniff_audio_format(b"\xff\xf3\x40\xc4") == ("mp3", "audio/mpeg")  # MPEG-2 layer III
    for data in (
        b"",
        b"\x89PNG\r\n\x1a\n",
        b"RIFF\0\0\0\0AVI ",  # RIFF, not WAVE
        b"RIFF\0\0\0\0WEBPVP8 ",
        b"\xff\xfb",  # too short for a frame header
        b"\xff\xfd\x90\x64",  # layer II
        b"\xff\xff\x90\x64",  # layer I
        b"\xff\xeb\x90\x64",  # reserved MPEG version
        b"\xff\xfb\x00\x64",  # free-format bitrate
        b"\xff\xfb\xf0\x64",  # bad bitrate index
        b"\xff\xfb\x9c\x64",  # reserved sample rate
        b"\xff\xd8\xff\xe0",  # JPEG
    ):
        assert sniff_audio_format(data) is None, data


def test_limits_from_settings():
    limits = AudioLimits.from_settings(Settings.from_env({}))
    assert limits == LIMITS
    custom = AudioLimits.from_settings(
        Settings.from_env({"MMFUSE_MAX_AUDIO_SECONDS": "12.5", "MMFUSE_AUDIO_FORMATS": "wav,flac"})
    )
    assert custom.max_seconds == 12.5 and custom.formats == ("wav", "flac")


# --- refusals: (bytes, limits) -> status, code, reason, limit ---

TONE_FLAC = samples.clip("flac", 48_000, 1, seconds=0.5)
SILENCE_FLAC = samples.encode(np.zeros(480, np.float32), 48_000, samples.CODEC["flac"])  # 10 ms, ~100 bytes
# several pages: with one audio page libsndfile counts the frames in it rather than trust its granule
VORBIS = samples.clip("vorbis", 48_000, 1, seconds=1.0)
MP3 = samples.clip("mp3", 48_000, 1, seconds=1.0)
LONG_ALLOWED = dataclasses.replace(LIMITS, max_seconds=3600.0)

REFUSALS = [
    # bytes
    pytest.param(
        TONE_FLAC, dataclasses.replace(LIMITS, max_bytes=1000), 413, "audio_too_large", "too_large", 1000, id="bytes"
    ),
    # format
    pytest.param(b"\x89PNG\r\n\x1a\n" + bytes(100), LIMITS, 415, "unsupported_audio_format", "format", None, id="png"),
    pytest.param(
        TONE_FLAC,
        dataclasses.replace(LIMITS, formats=("wav", "mp3")),
        415,
        "unsupported_audio_format",
        "format",
        None,
        id="format-not-allowed",
    ),
    # an ID3 tag in front of a FLAC: the decoder reads FLAC, which these limits do not accept
    pytest.param(
        b"ID3\x04\0\0\0\0\0\x0a" + bytes(10) + TONE_FLAC,
        dataclasses.replace(LIMITS, formats=("mp3",)),
        415,
        "unsupported_audio_format",
        "format",
        None,
        id="id3-then-flac",
    ),
    # unreadable headers: random bytes behind each signature, and files cut inside their header
    *[
        pytest.param(
            samples.random_with_magic(magic), LIMITS, 422, "audio_decode_failed", "unreadable_header", None, id=name
        )
        for name, magic in samples.MAGICS.items()
    ],
    pytest.param(
        samples.truncated(samples.wav_bytes(), 30),
        LIMITS,
        422,
        "audio_decode_failed",
        "unreadable_header",
        None,
        id="wav-cut-in-header",
    ),
    pytest.param(
        samples.truncated(TONE_FLAC, 40),
        LIMITS,
        422,
        "audio_decode_failed",
        "unreadable_header",
        None,
        id="flac-cut-in-header",
    ),
    pytest.param(
        samples.truncated(VORBIS, 100),
        LIMITS,
        422,
        "audio_decode_failed",
        "unreadable_header",
        None,
        id="ogg-cut-in-header",
    ),
    # absurd header values
    pytest.param(
        samples.wav_bytes(channels=1000, data=bytes(8000)),
        LIMITS,
        422,
        "invalid_audio",
        "too_many_channels",
        8,
        id="1000-channels",
    ),
    pytest.param(samples.wav_bytes(rate=1), LIMITS, 422, "invalid_audio", "sample_rate", 4000, id="1-hz"),
    pytest.param(samples.wav_bytes(rate=10_000_000), LIMITS, 422, "invalid_audio", "sample_rate", 384_000, id="10-mhz"),
    pytest.param(
        samples.flac_with_total_samples(TONE_FLAC, 0),
        LIMITS,
        422,
        "invalid_audio",
        "unknown_length",
        None,
        id="flac-unknown-length",
    ),
    pytest.param(samples.wav_bytes(data=b""), LIMITS, 422, "invalid_audio", "no_frames", None, id="zero-frames"),
    # too long, by the header
    pytest.param(
        samples.clip("wav16", 16_000, 1, seconds=3.0),
        dataclasses.replace(LIMITS, max_seconds=2.5),
        422,
        "audio_too_long",
        "too_long",
        2.5,
        id="too-long",
    ),
    pytest.param(
        samples.flac_with_total_samples(TONE_FLAC, (1 << 36) - 1),
        LIMITS,
        422,
        "audio_too_long",
        "too_long",
        60.0,
        id="flac-declares-2^36-frames",
    ),
    pytest.param(
        samples.mp3_with_xing_frames(MP3, 10_000_000),
        LIMITS,
        422,
        "audio_too_long",
        "too_long",
        60.0,
        id="mp3-declares-10M-mpeg-frames",
    ),
    pytest.param(
        samples.ogg_with_last_granule(VORBIS, 1 << 60),
        LIMITS,
        422,
        "audio_too_long",
        "too_long",
        60.0,
        id="ogg-declares-2^60-frames",
    ),
    # more frames than the bytes can hold (within max_seconds)
    pytest.param(
        samples.flac_with_total_samples(SILENCE_FLAC, 50 * 48_000),
        LIMITS,
        422,
        "invalid_audio",
        "frames_exceed_size",
        len(SILENCE_FLAC) * 2048,
        id="flac-50s-in-100-bytes",
    ),
    pytest.param(
        samples.ogg_with_last_granule(VORBIS, 1000 * 48_000),
        LONG_ALLOWED,
        422,
        "invalid_audio",
        "frames_exceed_size",
        len(VORBIS) * 2048,
        id="ogg-1000s-in-14kb",
    ),
    pytest.param(
        samples.mp3_with_xing_frames(MP3, 2000),
        LIMITS,
        422,
        "invalid_audio",
        "frames_exceed_size",
        len(MP3) * 48,
        id="mp3-48s-in-14kb",
    ),
]


@pytest.mark.parametrize(("data", "limits", "status", "code", "reason", "limit"), REFUSALS)
def test_refusals(data, limits, status, code, reason, limit):
    exc = rejected(data, limits)
    assert (exc.status, exc.code, exc.reason, exc.limit) == (status, code, reason, limit), exc.message
    assert str(exc) == exc.message
    # the worker's decode refuses the same clip with the same code, as a failure of that job only
    with pytest.raises(InputError) as caught:
        decode_audio(data, limits)
    assert caught.value.code == code and type(caught.value.code) is str


def test_wav_data_chunk_larger_than_the_file_is_read_as_the_bytes_present():
    # libsndfile clamps the data chunk to the file: the header cannot make the clip longer than its bytes
    data = samples.wav_bytes(rate=16_000, data=bytes(3200), data_size=0xFFFFFF00)
    assert inspect_audio(data, LIMITS).frames == 1600
    assert len(decode_audio(data, LIMITS)) == 4800


def test_huge_headers_are_refused_without_allocating():
    crafted = [
        samples.flac_with_total_samples(TONE_FLAC, (1 << 36) - 1),
        samples.mp3_with_xing_frames(MP3, 0xFFFFFFFF),
        samples.ogg_with_last_granule(VORBIS, 1 << 60),
        samples.wav_bytes(channels=1000, data=bytes(8000), data_size=0xFFFFFF00),
    ]
    tracemalloc.start()
    try:
        for data in crafted:
            with pytest.raises(AudioRejected):
                inspect_audio(data, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_lying_header_within_limits_decodes_a_block_at_a_time_and_is_refused():
    # 1 s of 8 channels that declares 50 s: passes the header checks (about 3 frames a byte), and a decode
    # sized by the header would allocate 50 * 48000 * 8 * 4 = 77 MB
    real = samples.clip("flac", 48_000, 8, seconds=1.0)
    data = samples.flac_with_total_samples(real, 50 * 48_000)
    assert inspect_audio(data, LIMITS).frames == 50 * 48_000
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as caught:
            decode_audio(data, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.code == "audio_decode_failed"
    assert peak < 8 * 1024 * 1024


def test_decode_reads_no_more_than_the_header_declares():
    data = samples.flac_with_total_samples(samples.clip("flac", 16_000, 1, seconds=3.0), 16_000)
    out = decode_audio(data, LIMITS)
    assert len(out) == 48_000
    np.testing.assert_array_equal(out, reference_decode(data))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(samples.truncated(samples.clip("flac", 48_000, 2, seconds=2.0), 0.5), id="flac-cut-in-data"),
        pytest.param(
            samples.ogg_with_last_granule(samples.clip("vorbis", 48_000, 1, seconds=3.0), 55 * 48_000),
            id="ogg-declares-more-than-it-holds",
        ),
    ],
)
def test_corrupt_data_behind_a_valid_header_fails_the_decode(data):
    inspect_audio(data, LIMITS)  # the header passes
    with pytest.raises(InputError) as caught:
        decode_audio(data, LIMITS)
    assert caught.value.code == "audio_decode_failed"


def test_non_finite_samples_are_invalid():
    signal = samples.tone_noise(0.5, 16_000, 2)
    signal[1000, 1] = np.nan
    data = samples.encode(signal, 16_000, samples.CODEC["wavfloat"])
    with pytest.raises(InputError) as caught:
        decode_audio(data, LIMITS)
    assert caught.value.code == "invalid_audio"
