"""classify's softmax scale: the text checkpoint's learned one by default (read from its weights, which
loading a tower leaves out), ``MMFUSE_LOGIT_SCALE`` when set, 100 for a checkpoint without one."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmfuse.shared.models import learned_logit_scale, make_test_checkpoint
from mmfuse.shared.schema import JobSpec
from mmfuse.shared.settings import Settings, SettingsError
from mmfuse.workers.fusion.fusion import FALLBACK_LOGIT_SCALE, FusionError, build_result, classify_scale


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_test_checkpoint(tmp_path_factory.mktemp("models") / "clip-tiny", "tiny")


def test_a_clip_checkpoint_has_its_learned_scale(checkpoint):
    from transformers import CLIPConfig

    # The test checkpoint's weights are CLIPModel's initial ones: logit_scale = logit_scale_init_value.
    expected = math.exp(CLIPConfig().logit_scale_init_value)
    assert learned_logit_scale(str(checkpoint)) == pytest.approx(expected, rel=1e-6)
    assert abs(expected - FALLBACK_LOGIT_SCALE) > 50  # a scale the tests can tell from the fallback


def test_the_scale_is_read_from_a_pytorch_weights_file_too(tmp_path):
    import torch

    torch.save({"logit_scale": torch.tensor(math.log(42.0))}, tmp_path / "pytorch_model.bin")
    assert learned_logit_scale(str(tmp_path)) == pytest.approx(42.0, rel=1e-6)


def test_weights_without_a_scale_have_none(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"embeddings.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    assert learned_logit_scale(str(tmp_path)) is None


def test_the_setting_overrides_the_learned_scale_and_the_fallback_covers_none():
    assert Settings().logit_scale == 0  # by default: the checkpoint's own
    assert classify_scale(0, 14.3) == 14.3
    assert classify_scale(0, None) == FALLBACK_LOGIT_SCALE
    assert classify_scale(Settings.from_env({"MMFUSE_LOGIT_SCALE": "50"}).logit_scale, 14.3) == 50
    with pytest.raises(SettingsError, match="MMFUSE_LOGIT_SCALE"):
        Settings.from_env({"MMFUSE_LOGIT_SCALE": "-1"})


def test_classify_without_a_scale_is_a_fusion_error_not_a_silent_default():
    spec = JobSpec(id="j", created_at=0, texts=["a"], labels=["x", "y"], outputs=["classify"])
    rows = np.eye(2, dtype=np.float32)
    with pytest.raises(FusionError, match="scale"):
        build_result(spec, {"text": rows[:1], "label": rows}, {})
    assert build_result(spec, {"text": rows[:1], "label": rows}, {"label": 2.0})["classify"]["texts"][0]["label"] == "x"
