"""Audio clips: the formats accepted, the checks on their headers, and the decode to CLAP's input.

Formats, recognised by their first bytes (:func:`sniff_audio_format`) and then by the decoder's own reading
of the header, which must name one of them too: WAV (``RIFF....WAVE``; any codec libsndfile reads in it:
PCM, float, µ-law, ADPCM, ...), FLAC (``fLaC``), OGG (``OggS``: Vorbis or Opus) and MP3 (an ID3v2 tag, or
an MPEG layer III frame header). Decoding is libsndfile's (``soundfile``), resampling libsoxr's (``soxr``).

:func:`inspect_audio` (the gateway, before a job is accepted; the worker again before decoding) reads the
header only — libsndfile takes the frame count from the header (WAV data chunk, cut to the bytes present;
FLAC STREAMINFO; MP3
Xing/Info frame or an estimate from the first frame's bitrate; OGG the last page's granule position), it
decodes nothing — and refuses, in this order:

- more bytes than ``max_bytes`` (413 ``audio_too_large``);
- a format that is not one of ``formats`` (415 ``unsupported_audio_format``);
- a header libsndfile cannot read (422 ``audio_decode_failed``);
- values no real clip has (422 ``invalid_audio``): more channels than ``max_channels``, a sample rate
  outside ``[min_sample_rate, max_sample_rate]``, no length in the header (a FLAC written as a stream);
- a duration (frames / rate) over ``max_seconds`` (422 ``audio_too_long``): this bounds the decode;
- more frames than the bytes can hold (``frames_exceed_size``) and no frames at all (``no_frames``)
  (422 ``invalid_audio``).

:func:`decode_audio` reads at most the declared frames, in blocks, mixes each block to mono (the mean of the
channels) and resamples it to 48 kHz as it goes with soxr's streaming resampler at quality "HQ", which gives
the same samples as ``soxr.resample(x, rate, 48000, quality="HQ")`` over the whole clip (deterministic: same
bytes, same array). Memory is one block of the input plus the 48 kHz output (at most ``max_seconds`` of it),
whatever the header claims. A stream that ends before the frames its header declares is corrupt
(``audio_decode_failed``); so are non-finite samples (``invalid_audio``). Except MP3: without a Xing/Info
frame its count is libsndfile's estimate from the first frame's bitrate, and libsndfile stops reading there,
so a VBR MP3 without one decodes cut short (LAME and ffmpeg write the frame).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mmfuse.shared.models import InputError
from mmfuse.shared.schema import ErrorCode

if TYPE_CHECKING:
    from mmfuse.shared.settings import Settings

CLAP_SAMPLE_RATE = 48_000

CONTENT_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "ogg": "audio/ogg", "mp3": "audio/mpeg"}

# libsndfile's major formats (SoundFile.format) as our format names; WAVEX is WAVE_FORMAT_EXTENSIBLE.
_DECODER_FORMATS = {"WAV": "wav", "WAVEX": "wav", "FLAC": "flac", "OGG": "ogg", "MP3": "mp3"}

# libsndfile's frame count for a header that does not give one (a FLAC whose STREAMINFO says 0 samples).
_UNKNOWN_FRAMES = 2**63 - 1

# Plausibility of the declared frames against the byte size: the most frames one byte can hold.
# PCM and float WAV: exactly their sample width. WAV's other codecs: the densest libsndfile reads in WAV
# (GSM 6.10, 4.9 samples a byte; 2-bit NMS ADPCM, 4) is under 8 samples a byte.
_WAV_BITS = {
    "PCM_S8": 8, "PCM_U8": 8, "ULAW": 8, "ALAW": 8, "PCM_16": 16, "PCM_24": 24, "PCM_32": 32, "FLOAT": 32,
    "DOUBLE": 64,
}  # fmt: skip
_WAV_CODEC_SAMPLES_PER_BYTE = 8
# FLAC and OGG: silence is what compresses best, and its cost is per frame, not per channel (a silent block
# costs a few bytes whatever the channel count). Measured with libsndfile's encoders, 60 s of digital
# silence at 8-192 kHz, 1-8 channels, the most frames per byte were: FLAC 346 (mono; 274 stereo, 124 for 8
# channels), Vorbis 371 (mono, 96 kHz), Opus 199. A 440 Hz tone: FLAC 2.2, Vorbis 28, Opus 6, MP3 12.
# 2048 leaves room for encoders that do better on silence than these (by estimate, not measured: Opus with
# DTX and 120 ms frames could reach about 1900). A guard against headers no encoder writes, not the bound on
# decoding: with the default limits a Vorbis file (its setup header alone is about 3.5 KB) can declare all of
# 60 s at 48 kHz; the decode is bounded by max_seconds, and a stream shorter than its header is refused when
# decoded.
_COMPRESSED_FRAMES_PER_BYTE = 2048
# MP3: frames have a fixed size per bitrate; the densest is 8 kbit/s at 24 kHz (MPEG-2), 24 frames a byte
# (60 s of silence from libsndfile's LAME: 12). 48 leaves room for tags' rounding, free-format streams aside.
_MP3_FRAMES_PER_BYTE = 48

_BLOCK_FRAMES = 1 << 16  # frames read at a time: 2 MiB of float32 for 8 channels


@dataclass(frozen=True)
class AudioLimits:
    max_bytes: int
    max_seconds: float
    max_channels: int
    min_sample_rate: int
    max_sample_rate: int
    formats: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> AudioLimits:
        return cls(
            max_bytes=settings.max_audio_bytes,
            max_seconds=settings.max_audio_seconds,
            max_channels=settings.max_audio_channels,
            min_sample_rate=settings.min_audio_sample_rate,
            max_sample_rate=settings.max_audio_sample_rate,
            formats=tuple(settings.audio_formats),
        )


@dataclass(frozen=True)
class AudioInfo:
    """A clip's header, as the decoder reads it. ``frames``: samples per channel."""

    format: str
    content_type: str
    sample_rate: int
    channels: int
    frames: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


class AudioRejected(Exception):
    """A clip refused by its bytes or header: ``status`` and ``code`` for the API, ``reason`` says which check
    (``too_large``, ``format``, ``unreadable_header``, ``too_many_channels``, ``sample_rate``, ``unknown_length``,
    ``too_long``, ``frames_exceed_size``, ``no_frames``), ``limit`` the limit it broke, if any."""

    def __init__(self, status: int, code: ErrorCode, message: str, reason: str, limit: int | float | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.reason = reason
        self.limit = limit


def sniff_audio_format(data: bytes) -> tuple[str, str] | None:
    """``(format, content_type)`` by the first bytes, or None when they are none of the formats'."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        name = "wav"
    elif data[:4] == b"fLaC":
        name = "flac"
    elif data[:4] == b"OggS":
        name = "ogg"
    elif data[:3] == b"ID3" or _is_mp3_frame_header(data[:4]):
        name = "mp3"
    else:
        return None
    return name, CONTENT_TYPES[name]


def _is_mp3_frame_header(header: bytes) -> bool:
    """An MPEG audio layer III frame header: 11 sync bits, a valid version, bitrate and sample rate index."""
    if len(header) < 4 or header[0] != 0xFF or header[1] & 0xE0 != 0xE0:
        return False
    version = (header[1] >> 3) & 3  # 1 is reserved
    layer = (header[1] >> 1) & 3  # 1 is layer III
    bitrate = header[2] >> 4  # 0 is "free format", 15 invalid
    sample_rate = (header[2] >> 2) & 3  # 3 is reserved
    emphasis = header[3] & 3  # 2 is reserved
    return version != 1 and layer == 1 and bitrate not in (0, 15) and sample_rate != 3 and emphasis != 2


def _max_plausible_frames(format: str, subtype: str, channels: int, size: int) -> int:
    if format == "wav":
        bits = _WAV_BITS.get(subtype)
        if bits is not None:
            return size * 8 // (bits * channels)
        return size * _WAV_CODEC_SAMPLES_PER_BYTE // channels
    if format == "mp3":
        return size * _MP3_FRAMES_PER_BYTE
    return size * _COMPRESSED_FRAMES_PER_BYTE


def inspect_audio(data: bytes, limits: AudioLimits) -> AudioInfo:
    """The clip's header, checked (see the module's docstring); raises :class:`AudioRejected`. Decodes nothing."""
    import soundfile

    if len(data) > limits.max_bytes:
        raise AudioRejected(
            413,
            ErrorCode.AUDIO_TOO_LARGE,
            f"{len(data)} bytes, limit is {limits.max_bytes}",
            "too_large",
            limits.max_bytes,
        )
    accepted = ", ".join(limits.formats)
    sniffed = sniff_audio_format(data)
    if sniffed is None or sniffed[0] not in limits.formats:
        raise AudioRejected(
            415, ErrorCode.UNSUPPORTED_AUDIO_FORMAT, f"not audio in an accepted format ({accepted})", "format"
        )
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            decoder_format, subtype = f.format, f.subtype
            sample_rate, channels, frames = f.samplerate, f.channels, f.frames
    except (soundfile.SoundFileError, RuntimeError, ValueError, TypeError) as exc:
        raise AudioRejected(
            422, ErrorCode.AUDIO_DECODE_FAILED, f"unreadable audio header: {exc}", "unreadable_header"
        ) from None
    # An ID3 tag may precede any format libsndfile reads: its view of the data, not the tag, decides.
    name = _DECODER_FORMATS.get(decoder_format)
    if name is None or name not in limits.formats:
        raise AudioRejected(
            415,
            ErrorCode.UNSUPPORTED_AUDIO_FORMAT,
            f"{decoder_format} audio, not an accepted format ({accepted})",
            "format",
        )
    if channels > limits.max_channels:
        raise AudioRejected(
            422,
            ErrorCode.INVALID_AUDIO,
            f"{channels} channels, limit is {limits.max_channels}",
            "too_many_channels",
            limits.max_channels,
        )
    if not limits.min_sample_rate <= sample_rate <= limits.max_sample_rate:
        limit = limits.min_sample_rate if sample_rate < limits.min_sample_rate else limits.max_sample_rate
        raise AudioRejected(
            422,
            ErrorCode.INVALID_AUDIO,
            f"sample rate {sample_rate} Hz, accepted {limits.min_sample_rate}-{limits.max_sample_rate} Hz",
            "sample_rate",
            limit,
        )
    if frames >= _UNKNOWN_FRAMES:
        raise AudioRejected(
            422, ErrorCode.INVALID_AUDIO, "the header does not give the length of the audio", "unknown_length"
        )
    seconds = frames / sample_rate
    if seconds > limits.max_seconds:
        raise AudioRejected(
            422,
            ErrorCode.AUDIO_TOO_LONG,
            f"{seconds:.1f} s of audio, limit is {limits.max_seconds:g} s",
            "too_long",
            limits.max_seconds,
        )
    most = _max_plausible_frames(name, subtype, channels, len(data))
    if frames > most:
        raise AudioRejected(
            422,
            ErrorCode.INVALID_AUDIO,
            f"the header declares {frames} frames, more than {len(data)} bytes of {name} can hold ({most})",
            "frames_exceed_size",
            most,
        )
    if frames == 0:
        raise AudioRejected(422, ErrorCode.INVALID_AUDIO, "the audio has no samples", "no_frames")
    return AudioInfo(name, CONTENT_TYPES[name], sample_rate, channels, frames)


def decode_audio(data: bytes, limits: AudioLimits) -> np.ndarray:
    """The clip as mono float32 samples at 48 kHz, 1-D and contiguous; raises :class:`InputError`
    (``audio_decode_failed`` for corrupt data, or the code of the header check that refused it)."""
    import soundfile

    try:
        info = inspect_audio(data, limits)
    except AudioRejected as exc:
        raise InputError(exc.code.value, exc.message) from None
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            samples, decoded = _decode_mono_48k(f, info)
    except InputError:
        raise
    except (soundfile.SoundFileError, RuntimeError, ValueError, TypeError) as exc:
        raise InputError(ErrorCode.AUDIO_DECODE_FAILED.value, f"cannot decode audio: {exc}") from None
    # MP3 is exempt: without a Xing/Info frame its count is an estimate from the first frame's bitrate.
    if decoded == 0 or (decoded < info.frames and info.format != "mp3"):
        raise InputError(
            ErrorCode.AUDIO_DECODE_FAILED.value,
            f"the audio ends after {decoded} of the {info.frames} frames its header declares",
        )
    return samples


def _decode_mono_48k(f, info: AudioInfo) -> tuple[np.ndarray, int]:
    """(samples at 48 kHz, frames decoded): at most ``info.frames`` read (libsndfile stops there too), a block
    at a time, each mixed to mono and fed to the streaming resampler."""
    import soxr

    stream = None
    if info.sample_rate != CLAP_SAMPLE_RATE:
        stream = soxr.ResampleStream(info.sample_rate, CLAP_SAMPLE_RATE, 1, dtype="float32", quality="HQ")
    out: list[np.ndarray] = []
    decoded = 0
    while decoded < info.frames:
        wanted = min(_BLOCK_FRAMES, info.frames - decoded)
        block = f.read(wanted, dtype="float32", always_2d=True)
        if len(block) == 0:
            break
        decoded += len(block)
        with np.errstate(over="ignore", invalid="ignore"):  # inf and nan samples are refused just below
            mono = block[:, 0].copy() if info.channels == 1 else block.mean(axis=1, dtype=np.float32)
        if not np.isfinite(mono).all():
            raise InputError(ErrorCode.INVALID_AUDIO.value, "the audio has samples that are not finite numbers")
        out.append(mono if stream is None else stream.resample_chunk(mono))
        if len(block) < wanted:
            break
    if stream is not None:
        out.append(stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
    samples = np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
    return np.ascontiguousarray(samples, dtype=np.float32), decoded
