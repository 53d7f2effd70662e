"""Model loading and the encoder protocol shared by every encoder worker.

An encoder turns a list of prepared inputs into one L2-normalised float32 row per input. Preparation
(decode + preprocess one item) is separate from encoding (one forward pass over a batch) so workers can
prepare items in their own threads while the batcher's single inference thread runs the model.

Checkpoints load with ``from_pretrained(id_or_path)``: a hub id in production, a local directory
offline (``mmfuse models make-test`` writes one).
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)


class InputError(ValueError):
    """An input the model cannot take (corrupt image, ...): the job fails, retrying cannot help."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Encoder(Protocol):
    modality: str
    model_id: str
    dim: int
    # The softmax scale the checkpoint learned for zero-shot classification over the texts this encoder
    # encodes (CLIP: exp of its ``logit_scale`` weight); None when it has none (image and sentence encoders).
    logit_scale: float | None

    def prepare(self, raw: Any) -> Any:
        """Turn one raw input (image bytes, text) into what ``encode`` batches. Thread-safe."""

    def encode(self, prepared: list[Any]) -> np.ndarray:
        """One forward pass: (len(prepared), dim) float32, rows L2-normalised."""


def _torch():
    import torch

    return torch


def _l2_normalise(matrix) -> np.ndarray:
    array = matrix.float().cpu().numpy().astype(np.float32, copy=False)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.maximum(norms, 1e-12)


def _torch_dtype(dtype: str):
    torch = _torch()
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def _quiet_transformers() -> None:
    # Loading one tower of a CLIP checkpoint reports the other tower's weights as unexpected: expected here.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _model_type(model_id: str) -> str:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_id).model_type


def _prepare_model(model, device: str, dtype: str):
    torch = _torch()
    model = model.to(device=torch.device(device), dtype=_torch_dtype(dtype))
    model.eval()
    return model


class ClipImageEncoder:
    """CLIP's vision tower and projection; only these weights are loaded."""

    modality = "image"
    logit_scale: float | None = None  # labels are encoded by the text tower, whose encoder carries the scale

    def __init__(
        self,
        model_id: str,
        device: str = "cpu",
        dtype: str = "float32",
        max_pixels: int = 0,
        max_aspect_ratio: float = 0,
    ):
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        self.model_id = model_id
        self.device = device
        self.max_pixels = max_pixels
        self.max_aspect_ratio = max_aspect_ratio
        self.processor = CLIPImageProcessor.from_pretrained(model_id)
        self.model = _prepare_model(CLIPVisionModelWithProjection.from_pretrained(model_id), device, dtype)
        self.dim = self.model.config.projection_dim
        self._dtype = _torch_dtype(dtype)

    def prepare(self, raw: bytes):
        image = decode_image(raw, self.max_pixels, self.max_aspect_ratio)
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def encode(self, prepared: list) -> np.ndarray:
        torch = _torch()
        pixel_values = torch.stack(prepared).to(device=self.device, dtype=self._dtype)
        with torch.inference_mode():
            embeds = self.model(pixel_values=pixel_values).image_embeds
        return _l2_normalise(embeds)


class _TextEncoder:
    """Tokenise per batch (padded to the batch's longest item), one forward pass, pool, normalise."""

    modality = "text"
    logit_scale: float | None = None

    def __init__(self, model_id: str, device: str = "cpu", dtype: str = "float32"):
        from transformers import AutoTokenizer

        self.model_id = model_id
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(model_id)
        self.model = _prepare_model(self._load_model(model_id), device, dtype)
        config = self.model.config
        self.dim = getattr(config, "projection_dim", None) or config.hidden_size
        self.max_length = min(self.tokenizer.model_max_length, config.max_position_embeddings)
        # count_tokens runs in task threads while the inference thread tokenises batches: a fast tokenizer keeps
        # its truncation and padding settings as state that each call sets, so counting has one of its own.
        self._counting_tokenizer = AutoTokenizer.from_pretrained(model_id)
        self._counting_lock = threading.Lock()

    def prepare(self, raw: str) -> str:
        return raw

    def count_tokens(self, texts: Sequence[str]) -> int:
        """The tokens ``encode`` reads for ``texts``: special tokens included, after truncation, no padding."""
        if not texts:
            return 0
        with self._counting_lock:
            encoded = self._counting_tokenizer(list(texts), truncation=True, max_length=self.max_length)
        return sum(len(ids) for ids in encoded["input_ids"])

    def encode(self, prepared: list[str]) -> np.ndarray:
        torch = _torch()
        tokens = self.tokenizer(
            prepared, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            pooled = self._pool(tokens)
        return _l2_normalise(pooled)

    def _load_model(self, model_id: str):
        raise NotImplementedError

    def _pool(self, tokens):
        raise NotImplementedError


class ClipTextEncoder(_TextEncoder):
    """CLIP's text tower and projection: the same space as ``ClipImageEncoder`` of one checkpoint."""

    def __init__(self, model_id: str, device: str = "cpu", dtype: str = "float32"):
        super().__init__(model_id, device, dtype)
        self.logit_scale = learned_logit_scale(model_id)

    def _load_model(self, model_id: str):
        from transformers import CLIPTextModelWithProjection

        return CLIPTextModelWithProjection.from_pretrained(model_id)

    def _pool(self, tokens):
        return self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).text_embeds


class SentenceEncoder(_TextEncoder):
    """A sentence-transformers style encoder (e.g. all-MiniLM-L6-v2): mean pooling over tokens."""

    def _load_model(self, model_id: str):
        from transformers import AutoModel

        return AutoModel.from_pretrained(model_id)

    def _pool(self, tokens):
        hidden = self.model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


LOGIT_SCALE_WEIGHT = "logit_scale"  # CLIPModel's learned log temperature


def learned_logit_scale(model_id: str) -> float | None:
    """exp(``logit_scale``) of a CLIP checkpoint: the scale of the image-text cosine similarities its towers
    were trained with (100 for OpenAI's released CLIPs), or None when its weights have none.

    The weight is CLIPModel's, outside both towers, so loading a tower leaves it out: it is read alone from
    the checkpoint's weights file (safetensors, single or sharded; else pytorch_model.bin, memory-mapped),
    which loading the tower just fetched. Computed in float32, as CLIPModel does.
    """
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME, cached_file

    def find(filename: str) -> str | None:
        return cached_file(model_id, filename, _raise_exceptions_for_missing_entries=False)

    torch = _torch()
    value = None
    if index := find(SAFE_WEIGHTS_INDEX_NAME):
        shard = json.loads(Path(index).read_text())["weight_map"].get(LOGIT_SCALE_WEIGHT)
        path = find(shard) if shard else None
    else:
        path = find(SAFE_WEIGHTS_NAME)
    if path:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as weights:
            if LOGIT_SCALE_WEIGHT in weights.keys():  # noqa: SIM118 (safe_open has keys(), no __contains__)
                value = weights.get_tensor(LOGIT_SCALE_WEIGHT)
    elif path := find(WEIGHTS_NAME):
        value = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(LOGIT_SCALE_WEIGHT)
    return None if value is None else float(value.float().exp())


def decode_image(raw: bytes, max_pixels: int = 0, max_aspect_ratio: float = 0):
    """Decode image bytes to RGB, refusing corrupt data and (before the full decode) pixel bombs."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as image:
            width, height = image.size
            if max_pixels and width * height > max_pixels:
                raise InputError("image_too_large", f"image has {width * height} pixels, limit {max_pixels}")
            if max_aspect_ratio and aspect_ratio(width, height) > max_aspect_ratio:
                # Preprocessing scales the short side up to the model's input: a 4,000,000 x 1 image of
                # 12 KB would need tens of GB.
                raise InputError(
                    "image_too_elongated", f"image is {width}x{height}, aspect ratio limit {max_aspect_ratio:g}"
                )
            image.load()
            return image.convert("RGB")
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError("image_decode_failed", f"cannot decode image: {exc}") from None


def aspect_ratio(width: int, height: int) -> float:
    return max(width, height) / max(1, min(width, height))


def load_encoder(
    modality: str,
    model_id: str,
    device: str = "cpu",
    dtype: str = "float32",
    max_pixels: int = 0,
    max_aspect_ratio: float = 0,
) -> Encoder:
    """Build the encoder for ``modality`` from a checkpoint id or directory."""
    _quiet_transformers()
    if modality == "image":
        return ClipImageEncoder(model_id, device, dtype, max_pixels, max_aspect_ratio)
    if modality == "text":
        if _model_type(model_id) == "clip":
            return ClipTextEncoder(model_id, device, dtype)
        return SentenceEncoder(model_id, device, dtype)
    raise ValueError(f"unknown modality {modality!r}")


# The text the tower costs are estimated on: a typical caption, the kind of text a job of the default layout
# (one image, one caption) carries.
REFERENCE_CAPTION = "a photo of a red dog on a beach"


def tower_cost(modality: str, model_id: str) -> float:
    """Multiply-accumulates of one item's forward pass through a tower's transformer layers: an image, or
    the reference caption as the model's tokenizer cuts it. Read from the checkpoint's config and tokenizer,
    no weights: deterministic, and cheap enough for the local stack to split a host's CPUs between its
    encoder pools by (``shared.cpus``). Per layer and token: the q, k, v and output projections (4 h^2),
    the MLP (2 h i) and attention over the sequence (2 s h); embeddings, pooling and projections are left out.

    B/32 CLIP: the vision tower 4.3 G; the text tower 0.91 G with the test checkpoint's byte-level tokenizer
    (24 tokens), 0.38 G with CLIP's own (10 tokens). all-MiniLM-L6-v2: 0.12 G (11 tokens).
    """
    from transformers import AutoConfig, AutoTokenizer

    _quiet_transformers()
    config = AutoConfig.from_pretrained(model_id)
    if modality == "image":
        config = getattr(config, "vision_config", config)
        tokens = (config.image_size // config.patch_size) ** 2 + 1  # patches and the class token
    elif modality == "text":
        config = getattr(config, "text_config", config)
        tokens = len(AutoTokenizer.from_pretrained(model_id)(REFERENCE_CAPTION)["input_ids"])
    else:
        raise ValueError(f"unknown modality {modality!r}")
    hidden, inner = config.hidden_size, config.intermediate_size
    per_token_layer = 4 * hidden * hidden + 2 * hidden * inner + 2 * tokens * hidden
    return float(config.num_hidden_layers * tokens * per_token_layer)


_cache: dict[tuple, Encoder] = {}
_cache_lock = threading.Lock()
_interop_threads_set = False


def set_torch_threads(threads: int) -> None:
    """This process's torch threads: ``threads`` intra-op threads for the forward passes, one inter-op thread.

    An encoder process runs one forward pass at a time, from its batcher's inference thread, and never forks
    torch work (``torch.jit.fork``): an inter-op pool (one thread per core by default) would only idle. torch
    takes the inter-op count once per process and only before any parallel work, so the first call sets it.
    """
    global _interop_threads_set
    torch = _torch()
    if not _interop_threads_set:
        _interop_threads_set = True
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError as exc:  # parallel work already ran in this process (a test, an embedding script)
            log.debug("inter-op threads left at %d: %s", torch.get_num_interop_threads(), exc)
    torch.set_num_threads(threads)


def get_encoder(
    modality: str,
    model_id: str,
    device: str = "cpu",
    dtype: str = "float32",
    threads: int = 1,
    max_pixels: int = 0,
    max_aspect_ratio: float = 0,
) -> Encoder:
    """The process's encoder for these arguments, loaded once (workers call this at start); ``threads``: the
    process's torch threads (:func:`set_torch_threads`)."""
    key = (modality, model_id, device, dtype, max_pixels, max_aspect_ratio)
    with _cache_lock:
        set_torch_threads(threads)
        if key not in _cache:
            log.info("loading %s encoder %s on %s (%s)", modality, model_id, device, dtype)
            _cache[key] = load_encoder(modality, model_id, device, dtype, max_pixels, max_aspect_ratio)
        return _cache[key]


# --- offline test checkpoints ---------------------------------------------------------------------


@dataclass(frozen=True)
class TestCheckpointSize:
    text_hidden: int
    text_layers: int
    text_heads: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    projection_dim: int


TEST_SIZES = {  # also the choices of `mmfuse models make-test --size`
    "tiny": TestCheckpointSize(32, 2, 2, 32, 2, 2, 32, 8, 32),
    # ViT-B/32 CLIP's shapes: the same compute as openai/clip-vit-base-patch32, random weights.
    "b32": TestCheckpointSize(512, 12, 8, 768, 12, 12, 224, 32, 512),
}


def _fixed_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A fixed byte-level CLIP vocabulary: every byte alone and word-final, plus a few merges.

    A tokenizer trained at run time is not deterministic; this one is the same on every machine.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab_tokens = symbols + [s + "</w>" for s in symbols]
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("i", "n"), ("o", "f</w>")]
    vocab_tokens += [first + second for first, second in merges]
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(vocab_tokens)}, merges


def make_test_checkpoint(directory: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a CLIP checkpoint with seeded random weights and a fixed tokenizer to ``directory``."""
    torch = _torch()
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    if size not in TEST_SIZES:
        raise ValueError(f"size must be one of {sorted(TEST_SIZES)}")
    shape = TEST_SIZES[size]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    vocab, merges = _fixed_clip_vocab()
    # transformers annotates merges as ``str | list[str]``, but hands them to tokenizers' BPE, which takes
    # (first, second) pairs and rejects "first second" strings: the annotation is wrong, the pairs are right.
    CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77).save_pretrained(directory)  # type: ignore[arg-type]

    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=shape.text_hidden,
            intermediate_size=shape.text_hidden * 4,
            num_hidden_layers=shape.text_layers,
            num_attention_heads=shape.text_heads,
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
            projection_dim=shape.projection_dim,
        ),
        vision_config=dict(
            hidden_size=shape.vision_hidden,
            intermediate_size=shape.vision_hidden * 4,
            num_hidden_layers=shape.vision_layers,
            num_attention_heads=shape.vision_heads,
            image_size=shape.image_size,
            patch_size=shape.patch_size,
            projection_dim=shape.projection_dim,
        ),
        projection_dim=shape.projection_dim,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(directory)
    CLIPImageProcessor(
        size={"shortest_edge": shape.image_size},
        crop_size={"height": shape.image_size, "width": shape.image_size},
    ).save_pretrained(directory)
    return directory
