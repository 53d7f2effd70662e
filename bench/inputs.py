"""The benchmark's inputs: a few photo-sized JPEGs and short captions, the same for the limit and the pipeline."""

from __future__ import annotations

import io

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
