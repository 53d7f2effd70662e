"""The benchmark's inputs: a few photo-sized JPEGs, short captions and 10 s WAV clips, the same for the limit
and the pipeline."""

from __future__ import annotations

import io
import wave

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
OBJECTS = ["dog", "cat", "bicycle", "car", "teapot", "chair", "lighthouse", "guitar"]
PLACES = ["on a beach", "in a city street", "on a table", "in the snow", "under a blue sky", "in a kitchen"]


def make_texts(count: int) -> list[str]:
    """Short captions like typical CLIP prompts ("a photo of a red dog on a beach")."""
    texts = []
    for i in range(count):
        color, obj, place = COLORS[i % len(COLORS)], OBJECTS[(i // 3) % len(OBJECTS)], PLACES[i % len(PLACES)]
        texts.append(f"a photo of a {color} {obj} {place}")
    return texts


def make_images(count: int, size: tuple[int, int] = (640, 480), quality: int = 90) -> list[bytes]:
    """Distinct 640x480 JPEGs (gradient, shapes and fine detail), ~80 kB each like a web photo.

    Decoding and CLIP preprocessing (resize 224 + crop + normalise) of these costs what a real photo costs.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    width, height = size
    images = []
    for i in range(count):
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([(x * (i + 1)) % 256, (y * 2 + i * 40) % 256, ((x + y) // 3) % 256], axis=-1)
        noise = rng.integers(0, 24, size=(height, width, 3))
        image = Image.fromarray(np.clip(base + noise, 0, 255).astype("uint8"))
        draw = ImageDraw.Draw(image)
        for j in range(6):
            x0, y0 = int(rng.integers(0, width - 120)), int(rng.integers(0, height - 120))
            draw.ellipse(
                (x0, y0, x0 + 60 + 10 * j, y0 + 50 + 8 * j), fill=tuple(int(c) for c in rng.integers(0, 256, 3))
            )
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        images.append(buffer.getvalue())
    return images


AUDIO_RATE = 48_000  # CLAP's sample rate: the clips decode without resampling, as most recorded audio would not


def make_audios(count: int, seconds: float = 10.0, rate: int = AUDIO_RATE) -> list[bytes]:
    """Distinct mono 16-bit PCM WAV clips (10 s at 48 kHz: one CLAP window each, ~940 kB), the same bytes on
    every run: each a chord of two tones gliding up through the clip, a note onset every half second and
    seeded noise.

    Decoding and CLAP's feature extraction (log-mel spectrogram of the window) cost what any 10 s clip of
    this format costs: the content changes neither.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    t = np.arange(round(seconds * rate)) / rate
    clips = []
    for i in range(count):
        base = 110.0 * (1 + i % 4) * (1.5 if i >= 4 else 1.0)
        glide = base * t + 0.5 * base * t**2 / seconds  # phase of a tone rising from base to 2x base
        envelope = 0.4 + 0.6 * np.exp(-8.0 * (t % 0.5))  # an onset every 0.5 s
        tones = np.sin(2 * np.pi * glide) + 0.5 * np.sin(2 * np.pi * 1.5 * glide)
        signal = 0.45 * envelope * tones + 0.05 * rng.standard_normal(len(t))
        pcm = np.clip(signal * 32767, -32768, 32767).astype("<i2")
        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(rate)
            out.writeframes(pcm.tobytes())
        clips.append(buffer.getvalue())
    return clips
