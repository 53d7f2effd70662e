"""Audio clips for tests: deterministic signals, each accepted format written by libsndfile (soundfile), and
crafted bad files (headers that lie, absurd values, truncated or random data behind a valid signature)."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from functools import cache

import numpy as np
import soundfile

SAMPLE_RATES = (16_000, 44_100, 48_000)


@dataclass(frozen=True)
class Codec:
    """One way to write a clip: ``format`` is mmfuse's name for it, ``sf_format``/``subtype`` libsndfile's."""

    id: str
    format: str
    sf_format: str
    subtype: str
    lossless: bool
    rates: tuple[int, ...] | None = None  # the sample rates the encoder takes; None: any

    def supports(self, rate: int) -> bool:
        return self.rates is None or rate in self.rates

    @property
    def available(self) -> bool:
        return self.subtype in soundfile.available_subtypes(self.sf_format)


MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
CODECS = (
    Codec("wav16", "wav", "WAV", "PCM_16", lossless=True),
    Codec("wavfloat", "wav", "WAV", "FLOAT", lossless=True),
    Codec("flac", "flac", "FLAC", "PCM_16", lossless=True),
    Codec("vorbis", "ogg", "OGG", "VORBIS", lossless=False),
    Codec("opus", "ogg", "OGG", "OPUS", lossless=False, rates=(8000, 12000, 16000, 24000, 48000)),
    Codec("mp3", "mp3", "MP3", "MPEG_LAYER_III", lossless=False, rates=MP3_RATES),
)
CODEC = {codec.id: codec for codec in CODECS}


def chirp(seconds: float, rate: int, f0: float = 100.0, f1: float = 8000.0, amplitude: float = 0.5) -> np.ndarray:
    """A linear sweep from ``f0`` to ``f1`` Hz (capped below Nyquist), mono float32."""
    f1 = min(f1, 0.45 * rate)
    t = np.arange(round(seconds * rate)) / rate
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
    return (amplitude * np.sin(phase)).astype(np.float32)


def tone_noise(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """(frames, channels) float32: each channel its own tones (220 Hz x its number, plus 1.5x that) and
    seeded noise; a fixed mix, so the same arguments give the same samples. Peaks stay under 0.8."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    columns = []
    for c in range(channels):
        f = 220.0 * (c + 1)
        tones = 0.4 * np.sin(2 * np.pi * f * t) + 0.2 * np.sin(2 * np.pi * 1.5 * f * t + c)
        columns.append(tones + 0.05 * rng.standard_normal(len(t)))
    return np.stack(columns, axis=1).astype(np.float32)


def encode(samples: np.ndarray, rate: int, codec: Codec) -> bytes:
    """``samples`` ((frames,) or (frames, channels)) in ``codec``'s format. Written in blocks: libsndfile
    1.2.2's Vorbis encoder crashes on one write of a few million frames."""
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    buffer = io.BytesIO()
    with soundfile.SoundFile(buffer, "w", rate, channels, codec.subtype, format=codec.sf_format) as f:
        for start in range(0, len(samples), 16384):
            f.write(samples[start : start + 16384])
    return buffer.getvalue()


@cache
def clip(codec_id: str, rate: int = 48_000, channels: int = 1, seconds: float = 1.0, seed: int = 0) -> bytes:
    """A cached :func:`tone_noise` clip in one codec."""
    return encode(tone_noise(seconds, rate, channels, seed), rate, CODEC[codec_id])


# --- crafted files ---


def wav_bytes(
    rate: int = 16_000,
    channels: int = 1,
    bits: int = 16,
    data: bytes = b"\0" * 64,
    data_size: int | None = None,
    format_tag: int = 1,
) -> bytes:
    """A RIFF/WAVE file written field by field, so any field can hold any value (``data_size``: what the
    data chunk's header declares; by default the length of ``data``)."""
    block_align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", format_tag, channels, rate, rate * block_align, block_align, bits)
    size = len(data) if data_size is None else data_size
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", size) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def flac_with_total_samples(data: bytes, total_samples: int) -> bytes:
    """A FLAC file whose STREAMINFO declares ``total_samples`` (36 bits; 0 means "unknown")."""
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0, "STREAMINFO must be the first metadata block"
    mask = (1 << 36) - 1
    assert 0 <= total_samples <= mask
    # STREAMINFO starts at byte 8; its bytes 10..17 hold rate (20 bits), channels (3), bits (5), samples (36)
    packed = int.from_bytes(data[18:26], "big") & ~mask | total_samples
    return data[:18] + packed.to_bytes(8, "big") + data[26:]


def _ogg_crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else r << 1
        table.append(r & 0xFFFFFFFF)
    return table


_OGG_CRC = _ogg_crc_table()


def ogg_crc(page: bytes) -> int:
    """The Ogg page checksum (CRC-32, polynomial 0x04C11DB7, not reflected, initial value 0)."""
    crc = 0
    for byte in page:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC[(crc >> 24) ^ byte]
    return crc


def ogg_with_last_granule(data: bytes, granule: int) -> bytes:
    """An OGG file whose last page declares ``granule`` (libsndfile's frame count for Vorbis comes from it),
    with the page's checksum recomputed so the page stays valid."""
    start = data.rfind(b"OggS")
    segments = data[start + 26]
    size = 27 + segments + sum(data[start + 27 : start + 27 + segments])
    page = bytearray(data[start : start + size])
    checksum = struct.unpack("<I", page[22:26])[0]
    page[22:26] = bytes(4)
    assert ogg_crc(page) == checksum, "not a well-formed last page"
    page[6:14] = struct.pack("<q", granule)
    page[22:26] = struct.pack("<I", ogg_crc(page))
    return data[:start] + bytes(page) + data[start + size :]


def mp3_with_xing_frames(data: bytes, mpeg_frames: int) -> bytes:
    """An MP3 file whose Xing/Info frame declares ``mpeg_frames`` MPEG frames (1152 samples each, at 32 kHz
    and over), which is where the decoder's frame count comes from."""
    for tag in (b"Xing", b"Info"):
        at = data.find(tag, 0, 200)
        if at >= 0:
            break
    else:
        raise AssertionError("no Xing/Info frame")
    (flags,) = struct.unpack(">I", data[at + 4 : at + 8])
    assert flags & 1, "the Xing frame has no frame count"
    return data[: at + 8] + struct.pack(">I", mpeg_frames) + data[at + 12 :]


def random_with_magic(magic: bytes, size: int = 4096, seed: int = 0) -> bytes:
    """``magic`` followed by seeded random bytes: a signature the sniffer accepts, a header the decoder cannot."""
    return magic + np.random.default_rng(seed).integers(0, 256, size - len(magic), dtype=np.uint8).tobytes()


MAGICS = {
    "wav": b"RIFF\x00\x10\x00\x00WAVE",
    "flac": b"fLaC",
    "ogg": b"OggS",
    "mp3-id3": b"ID3",
    "mp3-sync": b"\xff\xfb\x90\x64",  # MPEG-1 layer III, 128 kbit/s, 44.1 kHz
}


def truncated(data: bytes, keep: int | float) -> bytes:
    """The first ``keep`` bytes (an int) or fraction (a float) of ``data``: an upload cut short."""
    return data[: keep if isinstance(keep, int) else int(len(data) * keep)]
