"""Model loading and the encoder protocol shared by every encoder worker.

An encoder prepares each item into its *parts* (one for an image or a text, one per 10 s window for an audio
clip), encodes a list of parts into one L2-normalised float32 row per part, and an item's vector is its
parts' rows combined (:func:`combine_parts`). Preparation (decode + preprocess one item) is separate from
encoding (one forward pass over a batch) so workers can prepare items in their own threads while the
batcher's single inference thread runs the model; :func:`embed` does all three in-process.

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
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from mmfuse.shared.audio import AudioLimits

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

    def prepare(self, raw: Any) -> list[Any]:
        """Turn one raw input (image bytes, text, audio bytes) into its parts, what ``encode`` batches: one
        for an image or a text, one per window for an audio clip. Thread-safe."""

    def encode(self, parts: list[Any]) -> np.ndarray:
        """One forward pass: (len(parts), dim) float32, rows L2-normalised."""


def combine_parts(rows: np.ndarray) -> np.ndarray:
    """An item's vector from its parts' rows (k, dim): the L2-normalised mean; a single row as it is."""
    if len(rows) == 1:
        return rows[0]
    mean = rows.mean(axis=0, dtype=np.float32)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


def embed(encoder: Encoder, raws: Sequence[Any]) -> np.ndarray:
    """(len(raws), dim) float32: prepare every item, one ``encode`` over all their parts, combine per item."""
    items = [encoder.prepare(raw) for raw in raws]
    parts = [part for item in items for part in item]
    if not parts:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    rows = encoder.encode(parts)
    bounds = np.cumsum([0] + [len(item) for item in items])
    return np.stack([combine_parts(rows[start:end]) for start, end in zip(bounds[:-1], bounds[1:], strict=True)])


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

    def prepare(self, raw: bytes) -> list:
        image = decode_image(raw, self.max_pixels, self.max_aspect_ratio)
        return [self.processor(images=image, return_tensors="pt")["pixel_values"][0]]

    def encode(self, parts: list) -> np.ndarray:
        torch = _torch()
        pixel_values = torch.stack(parts).to(device=self.device, dtype=self._dtype)
        with torch.inference_mode():
            embeds = self.model(pixel_values=pixel_values).image_embeds
        return _l2_normalise(embeds)


def audio_windows(samples: np.ndarray, window: int) -> list[np.ndarray]:
    """A clip's windows of ``window`` samples (CLAP: 10 s): the clip itself when it is no longer; else
    consecutive windows from its start, the last one its final ``window`` samples (overlapping the one
    before), so that no window is cropped at random or padded. Views, not copies."""
    if len(samples) <= window:
        return [samples]
    starts = [*range(0, len(samples) - window, window), len(samples) - window]
    return [samples[start : start + window] for start in starts]


class ClapAudioEncoder:
    """CLAP's audio tower (HTSAT) and projection; only these weights are loaded.

    A clip is decoded to mono float32 at 48 kHz (``shared.audio``) and cut into windows of the feature
    extractor's length (:func:`audio_windows`); each window is one part, its log-mel spectrogram one input of
    the forward pass, and the clip's vector the normalised mean of its windows' (:func:`combine_parts`).
    Nothing random runs: the feature extractor's "rand_trunc" mode crops at random only input longer than
    its window, which no window is, and repeats shorter input to the window's length ("repeatpad"). Fused
    checkpoints (``enable_fusion``) are refused: their "fusion" mode picks crops, and which clips of a batch
    get them, at random.
    """

    modality = "audio"
    logit_scale: float | None = None  # labels are encoded by the text tower, whose encoder carries the scale

    def __init__(self, model_id: str, device: str = "cpu", dtype: str = "float32", limits: AudioLimits | None = None):
        from transformers import ClapAudioModelWithProjection, ClapFeatureExtractor

        from mmfuse.shared.audio import CLAP_SAMPLE_RATE, AudioLimits
        from mmfuse.shared.clap_features import ClapLogMel
        from mmfuse.shared.settings import get_settings

        self.model_id = model_id
        self.device = device
        self.limits = limits if limits is not None else AudioLimits.from_settings(get_settings())
        self.feature_extractor = ClapFeatureExtractor.from_pretrained(model_id)
        self.sample_rate: int = self.feature_extractor.sampling_rate
        if self.sample_rate != CLAP_SAMPLE_RATE:
            raise ValueError(f"{model_id}: features at {self.sample_rate} Hz, clips decode at {CLAP_SAMPLE_RATE} Hz")
        model = ClapAudioModelWithProjection.from_pretrained(model_id)
        if model.config.enable_fusion:
            raise ValueError(f"{model_id}: fused CLAP checkpoints are not supported (their features crop at random)")
        self.model = _prepare_model(model, device, dtype)
        self.dim = self.model.config.projection_dim
        self.window = self.feature_extractor.nb_max_samples  # samples per window: max_length_s at 48 kHz
        # The extractor's features of a window, vectorised: its own loop over frames holds the GIL for tens of ms.
        self.log_mel = ClapLogMel.from_extractor(self.feature_extractor)
        self._dtype = _torch_dtype(dtype)

    def prepare(self, raw: bytes) -> list:
        from mmfuse.shared.audio import decode_audio

        return self.prepare_waveform(decode_audio(raw, self.limits))

    def prepare_waveform(self, samples: np.ndarray) -> list:
        """The parts of a decoded clip (mono float32 samples at 48 kHz): each window's log-mel spectrogram."""
        if samples.ndim != 1 or len(samples) == 0:
            raise InputError("invalid_audio", f"audio must be mono samples, got an array of shape {samples.shape}")
        torch = _torch()
        return [torch.from_numpy(self.log_mel(window)) for window in audio_windows(samples, self.window)]

    def encode(self, parts: list) -> np.ndarray:
        torch = _torch()
        features = torch.stack(parts).to(device=self.device, dtype=self._dtype)
        with torch.inference_mode():
            embeds = self.model(input_features=features).audio_embeds
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
        # A fast tokenizer's Rust backend, set once to truncate as encode does and never pad, counts in a
        # fraction of the wrapper's time (25 vs 59 us a text here) and needs no lock: it keeps no state per call.
        self._counting_backend = getattr(self._counting_tokenizer, "backend_tokenizer", None)
        if self._counting_backend is not None:
            self._counting_backend.enable_truncation(self.max_length)
            self._counting_backend.no_padding()

    def prepare(self, raw: str) -> list[str]:
        return [raw]

    def count_tokens(self, texts: Sequence[str]) -> int:
        """The tokens ``encode`` reads for ``texts``: special tokens included, after truncation, no padding."""
        if not texts:
            return 0
        if self._counting_backend is not None:
            return sum(len(encoding.ids) for encoding in self._counting_backend.encode_batch(list(texts)))
        with self._counting_lock:
            encoded = self._counting_tokenizer(list(texts), truncation=True, max_length=self.max_length)
        return sum(len(ids) for ids in encoded["input_ids"])

    def encode(self, parts: list[str]) -> np.ndarray:
        torch = _torch()
        tokens = self.tokenizer(
            parts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
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


class ClapTextEncoder(_TextEncoder):
    """CLAP's text tower (RoBERTa) and projection: the same space as ``ClapAudioEncoder`` of one checkpoint.

    Its scale is the audio side's (``logit_scale_a``): classifying a clip over labels is ClapModel's
    ``logits_per_audio``, which multiplies by that one.
    """

    def __init__(self, model_id: str, device: str = "cpu", dtype: str = "float32"):
        super().__init__(model_id, device, dtype)
        self.logit_scale = learned_logit_scale(model_id, CLAP_LOGIT_SCALE_WEIGHT)

    def _load_model(self, model_id: str):
        from transformers import ClapTextModelWithProjection

        return ClapTextModelWithProjection.from_pretrained(model_id)

    def _pool(self, tokens):
        return self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).text_embeds


LOGIT_SCALE_WEIGHT = "logit_scale"  # CLIPModel's learned log temperature
CLAP_LOGIT_SCALE_WEIGHT = "logit_scale_a"  # ClapModel's, of logits_per_audio (logit_scale_t: logits_per_text)


def learned_logit_scale(model_id: str, weight: str = LOGIT_SCALE_WEIGHT) -> float | None:
    """exp(``weight``) of a CLIP or CLAP checkpoint: the scale of the cosine similarities its towers were
    trained with (100 for OpenAI's released CLIPs), or None when its weights have none.

    The weight is the full model's, outside both towers, so loading a tower leaves it out: it is read alone
    from the checkpoint's weights file (safetensors, single or sharded; else pytorch_model.bin,
    memory-mapped), which loading the tower just fetched. Computed in float32, as CLIPModel and ClapModel do.
    """
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME, cached_file

    def find(filename: str) -> str | None:
        return cached_file(model_id, filename, _raise_exceptions_for_missing_entries=False)

    torch = _torch()
    value = None
    if index := find(SAFE_WEIGHTS_INDEX_NAME):
        shard = json.loads(Path(index).read_text())["weight_map"].get(weight)
        path = find(shard) if shard else None
    else:
        path = find(SAFE_WEIGHTS_NAME)
    if path:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as weights:
            if weight in weights.keys():  # noqa: SIM118 (safe_open has keys(), no __contains__)
                value = weights.get_tensor(weight)
    elif path := find(WEIGHTS_NAME):
        value = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(weight)
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
    audio_limits: AudioLimits | None = None,
) -> Encoder:
    """Build the encoder for ``modality`` from a checkpoint id or directory. ``audio_limits``: what an audio
    encoder decodes (None: the process's settings')."""
    _quiet_transformers()
    if modality == "image":
        return ClipImageEncoder(model_id, device, dtype, max_pixels, max_aspect_ratio)
    if modality == "text":
        model_type = _model_type(model_id)
        if model_type == "clip":
            return ClipTextEncoder(model_id, device, dtype)
        if model_type == "clap":
            return ClapTextEncoder(model_id, device, dtype)
        return SentenceEncoder(model_id, device, dtype)
    if modality == "audio":
        if (model_type := _model_type(model_id)) != "clap":
            raise ValueError(f"{model_id} is not a CLAP checkpoint (model type {model_type!r})")
        return ClapAudioEncoder(model_id, device, dtype, audio_limits)
    raise ValueError(f"unknown modality {modality!r}")


# The text the tower costs are estimated on: a typical caption, the kind of text a job of the default layout
# (one image, one caption) carries.
REFERENCE_CAPTION = "a photo of a red dog on a beach"


def tower_cost(modality: str, model_id: str) -> float:
    """Multiply-accumulates of one item's forward pass through a tower's transformer layers: an image, the
    reference caption as the model's tokenizer cuts it, or one 10 s window of audio (a clip costs one per
    window). Read from the checkpoint's config and tokenizer, no weights: deterministic, and cheap enough for
    the local stack to split a host's CPUs between its encoder pools by (``shared.cpus``). Per layer and
    token: the q, k, v and output projections (4 h^2), the MLP (2 h i) and attention over the sequence
    (2 s h); embeddings, pooling and projections are left out.

    CLAP's audio tower (HTSAT, a Swin transformer) attends within windows of w x w tokens and halves each
    side of its token grid (merging 2 x 2 patches) and doubles its width from one stage to the next: stage k
    of depth d_k has h_k = h_0 2^k, i_k = mlp_ratio h_k, n_k = (g / 2^k)^2 tokens of the g x g patch grid
    (g = spec_size / patch_stride) and windows of s_k = min(w, g / 2^k)^2 tokens; it costs
    d_k n_k (4 h_k^2 + 2 h_k i_k + 2 s_k h_k). Patch embedding and merging are left out.

    B/32 CLIP: the vision tower 4.3 G; the text tower 0.91 G with the test checkpoint's byte-level tokenizer
    (24 tokens), 0.38 G with CLIP's own (10 tokens). all-MiniLM-L6-v2: 0.12 G (11 tokens).
    laion/clap-htsat-unfused: the audio tower 5.7 G per window.
    """
    from transformers import AutoConfig, AutoTokenizer

    _quiet_transformers()
    config = AutoConfig.from_pretrained(model_id)
    if modality == "audio":
        if not hasattr(config, "audio_config"):
            raise ValueError(f"{model_id} has no audio tower")
        return _htsat_cost(config.audio_config)
    if modality == "image":
        config = getattr(config, "vision_config", config)
        if not hasattr(config, "image_size"):
            raise ValueError(f"{model_id} has no vision tower")
        tokens = (config.image_size // config.patch_size) ** 2 + 1  # patches and the class token
    elif modality == "text":
        config = getattr(config, "text_config", config)
        tokens = len(AutoTokenizer.from_pretrained(model_id)(REFERENCE_CAPTION)["input_ids"])
    else:
        raise ValueError(f"unknown modality {modality!r}")
    hidden, inner = config.hidden_size, config.intermediate_size
    per_token_layer = 4 * hidden * hidden + 2 * hidden * inner + 2 * tokens * hidden
    return float(config.num_hidden_layers * tokens * per_token_layer)


def _htsat_cost(audio) -> float:
    """:func:`tower_cost` of CLAP's audio tower (``ClapAudioConfig``): one window's spectrogram."""
    stride = audio.patch_stride if isinstance(audio.patch_stride, (list, tuple)) else (audio.patch_stride,) * 2
    rows, cols = audio.spec_size // stride[0], audio.spec_size // stride[1]
    total = 0
    for stage, depth in enumerate(audio.depths):
        hidden = audio.patch_embeds_hidden_size * 2**stage
        inner = int(audio.mlp_ratio * hidden)
        side_rows, side_cols = rows // 2**stage, cols // 2**stage
        window = min(audio.window_size, side_rows, side_cols) ** 2
        total += depth * side_rows * side_cols * (4 * hidden * hidden + 2 * hidden * inner + 2 * window * hidden)
    return float(total)


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
    audio_limits: AudioLimits | None = None,
) -> Encoder:
    """The process's encoder for these arguments, loaded once (workers call this at start); ``threads``: the
    process's torch threads (:func:`set_torch_threads`)."""
    key = (modality, model_id, device, dtype, max_pixels, max_aspect_ratio, audio_limits)
    with _cache_lock:
        set_torch_threads(threads)
        if key not in _cache:
            log.info("loading %s encoder %s on %s (%s)", modality, model_id, device, dtype)
            _cache[key] = load_encoder(modality, model_id, device, dtype, max_pixels, max_aspect_ratio, audio_limits)
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


TEST_SIZES = {  # CLIP's: also the choices of `mmfuse up --test-size`
    "tiny": TestCheckpointSize(32, 2, 2, 32, 2, 2, 32, 8, 32),
    # ViT-B/32 CLIP's shapes: the same compute as openai/clip-vit-base-patch32, random weights.
    "b32": TestCheckpointSize(512, 12, 8, 768, 12, 12, 224, 32, 512),
}


@dataclass(frozen=True)
class ClapTestCheckpointSize:
    text_hidden: int
    text_layers: int
    text_heads: int
    text_vocab: int  # rows of the word embeddings; 0: the fixed vocabulary's size
    audio_hidden: int  # the first stage's width (patch_embeds_hidden_size); it doubles at every stage
    audio_depths: tuple[int, ...]
    audio_heads: tuple[int, ...]
    patch: int  # patch size and stride, over the 256 x 256 spectrogram image
    projection_dim: int


CLAP_TEST_SIZES = {
    # A 10 s window's forward pass takes about 10 ms on one CPU thread.
    "tiny": ClapTestCheckpointSize(32, 2, 2, 0, 16, (2, 2), (2, 4), 8, 32),
    # laion/clap-htsat-unfused's shapes (153.5 M parameters): the same compute, random weights.
    "full": ClapTestCheckpointSize(768, 12, 12, 50265, 96, (2, 2, 6, 2), (4, 8, 16, 32), 4, 512),
}

# The choices of `mmfuse models make-test --kind K --size S`.
TEST_CHECKPOINT_SIZES: dict[str, dict[str, Any]] = {"clip": TEST_SIZES, "clap": CLAP_TEST_SIZES}


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


def _fixed_roberta_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A fixed byte-level RoBERTa (GPT-2 style) vocabulary, like :func:`_fixed_clip_vocab`: RoBERTa's special
    tokens at its ids (<s> 0, <pad> 1, </s> 2, <unk> 3), every byte, a few merges ("Ġ" marks a leading
    space), <mask> last."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("Ġa", "n"), ("Ġan", "d"), ("Ġ", "o"), ("Ġo", "f")]
    vocab_tokens = ["<s>", "<pad>", "</s>", "<unk>", *bytes_to_unicode().values()]
    vocab_tokens += [first + second for first, second in merges]
    vocab_tokens += ["<mask>"]
    return {token: index for index, token in enumerate(vocab_tokens)}, merges


def make_test_checkpoint(directory: str | Path, size: str = "tiny", seed: int = 0, kind: str = "clip") -> Path:
    """Write a checkpoint of ``kind`` ("clip" or "clap") with seeded random weights and a fixed tokenizer to
    ``directory``: the same bytes for the same arguments."""
    if kind not in TEST_CHECKPOINT_SIZES:
        raise ValueError(f"kind must be one of {sorted(TEST_CHECKPOINT_SIZES)}")
    if size not in TEST_CHECKPOINT_SIZES[kind]:
        raise ValueError(f"size of a {kind} test checkpoint must be one of {sorted(TEST_CHECKPOINT_SIZES[kind])}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "clap":
        _write_clap_checkpoint(directory, size, seed)
    else:
        _write_clip_checkpoint(directory, TEST_SIZES[size], seed)
    return directory


def _write_clip_checkpoint(directory: Path, shape: TestCheckpointSize, seed: int) -> None:
    torch = _torch()
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

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


# laion/clap-htsat-unfused's feature extractor settings (its preprocessor_config.json): the test checkpoints'.
CLAP_FEATURE_EXTRACTOR_SETTINGS: dict[str, Any] = {
    "feature_size": 64,
    "sampling_rate": 48_000,
    "hop_length": 480,
    "max_length_s": 10,
    "fft_window_size": 1024,
    "frequency_min": 50,
    "frequency_max": 14_000,
    "truncation": "rand_trunc",
    "padding": "repeatpad",
}


def _write_clap_checkpoint(directory: Path, size: str, seed: int) -> None:
    torch = _torch()
    from transformers import ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer

    vocab, merges = _fixed_roberta_vocab()
    # merges as pairs: see _write_clip_checkpoint.
    tokenizer = RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=512)  # type: ignore[arg-type]
    feature_extractor = ClapFeatureExtractor(**CLAP_FEATURE_EXTRACTOR_SETTINGS)
    ClapProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(directory)

    config = clap_test_config(size)
    torch.manual_seed(seed)
    ClapModel(config).save_pretrained(directory)


def clap_test_config(size: str):
    """The ``ClapConfig`` of the CLAP test checkpoint of ``size`` (:data:`CLAP_TEST_SIZES`)."""
    from transformers import ClapConfig

    shape = CLAP_TEST_SIZES[size]
    vocab, _ = _fixed_roberta_vocab()
    return ClapConfig(
        text_config=dict(
            vocab_size=shape.text_vocab or len(vocab),
            hidden_size=shape.text_hidden,
            intermediate_size=shape.text_hidden * 4,
            num_hidden_layers=shape.text_layers,
            num_attention_heads=shape.text_heads,
            max_position_embeddings=514,  # RoBERTa's: 512 tokens after the padding id's offset
            type_vocab_size=1,
            bos_token_id=vocab["<s>"],
            eos_token_id=vocab["</s>"],
            pad_token_id=vocab["<pad>"],
        ),
        audio_config=dict(
            patch_embeds_hidden_size=shape.audio_hidden,
            hidden_size=shape.audio_hidden * 2 ** (len(shape.audio_depths) - 1),  # the last stage's width
            depths=list(shape.audio_depths),
            num_attention_heads=list(shape.audio_heads),
            patch_size=shape.patch,
            patch_stride=[shape.patch, shape.patch],
            spec_size=256,  # 1001 frames x 64 mel bins fold into 256 x 256
            window_size=8,
            num_mel_bins=64,
            enable_fusion=False,
        ),
        projection_dim=shape.projection_dim,
    )
