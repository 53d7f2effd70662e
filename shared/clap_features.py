"""CLAP's log-mel spectrogram of one audio window, vectorised.

transformers' ``ClapFeatureExtractor`` computes the same array, but its ``audio_utils.spectrogram`` runs one
FFT per frame in a Python loop (about 1000 frames per 10 s window, tens of milliseconds holding the GIL) in the
task threads that prepare clips beside the inference thread. :class:`ClapLogMel` takes ``np.fft.rfft`` of a
block of frames at a time (a strided view of the signal) and multiplies by the mel filters, following the
extractor step by step (its padding of short input, the centred reflect-padded framing, the float64 FFT
rounded to complex64, the filters' floor and the conversion to decibels) so that its values are the
extractor's to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

if TYPE_CHECKING:
    from transformers import ClapFeatureExtractor

# The extractor's mode for the audio encoder's windows: it crops input longer than its window at random (which
# no window is) and pads shorter input (its configured ``padding``) with the Slaney-scaled mel filters.
TRUNCATION = "rand_trunc"
# The extractor's ways to pad input shorter than its window: repeat it whole then pad with zeros, repeat it and
# cut, or pad with zeros.
PADDINGS = ("repeatpad", "repeat", "pad")
# audio_utils.spectrogram's defaults, which the extractor keeps: the floor of the mel power, the power clipped
# to before log10, and the reference power of 0 dB.
MEL_FLOOR = 1e-10
MIN_POWER = 1e-10
# Frames transformed at a time (2 MiB of windowed float64 samples): blocks keep each step's arrays in cache, a
# third faster than all frames at once, and few of them keep the GIL hand-overs between numpy calls few.
FRAMES_PER_BLOCK = 256


@dataclass(frozen=True, eq=False)
class ClapLogMel:
    """The ``input_features`` of one window under ``truncation="rand_trunc"``: ``extractor(window,
    truncation="rand_trunc")["input_features"][0]`` as float32 numpy, of shape (1, frames, mels).

    Built once from the extractor (:meth:`from_extractor`); its arrays are read-only, so task threads share it.
    """

    window_samples: int  # the extractor's nb_max_samples: every window is padded to this length
    padding: str  # one of PADDINGS
    hop_length: int
    hann: np.ndarray  # the periodic Hann window of fft_window_size samples, float64
    mel_filters: np.ndarray  # (frequency bins, mels), float64: the extractor's mel_filters_slaney

    @classmethod
    def from_extractor(cls, extractor: ClapFeatureExtractor) -> ClapLogMel:
        """The extractor's settings; a ValueError for a padding this class does not implement."""
        from transformers.audio_utils import window_function

        if extractor.padding not in PADDINGS:
            raise ValueError(f"CLAP feature padding {extractor.padding!r} is not one of {PADDINGS}")
        hann = np.asarray(window_function(extractor.fft_window_size, "hann"), dtype=np.float64)
        mel_filters = np.array(extractor.mel_filters_slaney, dtype=np.float64)
        if mel_filters.shape != (extractor.nb_frequency_bins, extractor.feature_size):
            raise ValueError(f"CLAP mel filters of shape {mel_filters.shape}, expected frequency bins x mels")
        hann.setflags(write=False)
        mel_filters.setflags(write=False)
        return cls(
            window_samples=extractor.nb_max_samples,
            padding=extractor.padding,
            hop_length=extractor.hop_length,
            hann=hann,
            mel_filters=mel_filters,
        )

    def __call__(self, window: np.ndarray) -> np.ndarray:
        """The log-mel spectrogram (dB) of ``window`` (mono samples, at most ``window_samples`` of them)."""
        samples = self._padded(window)
        frame_length = len(self.hann)
        # Centred frames: half a frame mirrored at each end, as the extractor pads (in the input's dtype); the
        # window's product promotes each block of frames to float64, as the extractor promotes the whole signal.
        centred = np.pad(samples, frame_length // 2, mode="reflect")
        frames = sliding_window_view(centred, frame_length)[:: self.hop_length]
        mel = np.empty((len(frames), self.mel_filters.shape[1]))
        windowed = np.empty((min(FRAMES_PER_BLOCK, len(frames)), frame_length))
        for start in range(0, len(frames), FRAMES_PER_BLOCK):
            block = frames[start : start + FRAMES_PER_BLOCK]
            np.multiply(block, self.hann, out=windowed[: len(block)])
            # The extractor stores each frame's float64 spectrum as complex64 before taking its magnitude.
            spectrum = np.fft.rfft(windowed[: len(block)], axis=-1).astype(np.complex64)
            power = np.abs(spectrum, dtype=np.float64)
            np.square(power, out=power)
            np.matmul(power, self.mel_filters, out=mel[start : start + len(block)])
        np.maximum(mel, max(MEL_FLOOR, MIN_POWER), out=mel)  # the filters' floor, then power_to_db's clip
        np.log10(mel, out=mel)
        mel *= 10.0  # power_to_db with a reference power of 1
        return mel.astype(np.float32)[None]

    def _padded(self, window: np.ndarray) -> np.ndarray:
        """``window`` brought to ``window_samples`` samples as the extractor pads shorter input."""
        if window.ndim != 1 or len(window) == 0:
            raise ValueError(f"a window must be non-empty mono samples, got an array of shape {window.shape}")
        length = len(window)
        if length > self.window_samples:
            # The extractor would crop such input at a random place; the encoder's windows are never longer.
            raise ValueError(f"a window of {length} samples is longer than {self.window_samples}")
        if length == self.window_samples:
            return window
        if self.padding == "repeat":
            window = np.tile(window, self.window_samples // length + 1)[: self.window_samples]
        elif self.padding == "repeatpad":
            window = np.tile(window, self.window_samples // length)
        return np.pad(window, (0, self.window_samples - len(window)), mode="constant", constant_values=0)
