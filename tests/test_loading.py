"""Loading never hides a broken model: missing or misshapen weights are an error that names them."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llava_lib.model.loading import IncompleteWeightsError, load_llm, load_vision_tower

CPU = torch.device("cpu")


def _copy_with_weights(src, dst, edit):
    """``src`` model directory copied to ``dst`` with its safetensors passed through ``edit(state_dict)``."""
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    edit(weights)
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_intact_mini_towers_load_and_the_clip_text_side_stays_quiet(mini_world):
    root, _ = mini_world
    assert any(k.startswith("text_model.") for k in load_file(root / "clip" / "model.safetensors"))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("transformers.modeling_utils")  # where transformers logs its loading report
    log.addHandler(handler)
    try:
        load_vision_tower(root / "clip", CPU)
    finally:
        log.removeHandler(handler)
    assert not [r for r in records if "text_model" in r.getMessage()]  # the expected text side is not reported
    # The mini LM ties its head to the embeddings: lm_head.weight is not in the file and is not "missing".
    assert "lm_head.weight" not in load_file(root / "llm" / "model.safetensors")
    llm = load_llm(root / "llm", CPU)
    assert llm.config.tie_word_embeddings and llm.lm_head.weight is llm.model.embed_tokens.weight


def test_clip_without_some_vision_weights_is_an_error_naming_them(mini_world, tmp_path):
    root, _ = mini_world
    gone = ["vision_model.encoder.layers.0.mlp.fc1.weight", "vision_model.post_layernorm.bias"]

    def drop(weights):
        for key in gone:
            del weights[key]

    broken = _copy_with_weights(root / "clip", tmp_path / "clip", drop)
    with pytest.raises(IncompleteWeightsError) as e:
        load_vision_tower(broken, CPU)
    message = str(e.value)
    for key in gone:
        assert key.removeprefix("vision_model.") in message
    assert "2 处问题" in message and str(broken) in message and "--force" in message


def test_clip_with_a_misshapen_vision_weight_is_an_error(mini_world, tmp_path):
    root, _ = mini_world

    def widen(weights):
        w = weights["vision_model.post_layernorm.weight"]
        weights["vision_model.post_layernorm.weight"] = torch.cat([w, w])

    broken = _copy_with_weights(root / "clip", tmp_path / "clip", widen)
    with pytest.raises(IncompleteWeightsError, match="形状不符 .*post_layernorm.weight"):
        load_vision_tower(broken, CPU)


def test_llm_without_some_weights_is_an_error_naming_them(mini_world, tmp_path):
    root, _ = mini_world
    gone = ["model.norm.weight", "model.layers.1.self_attn.k_proj.weight"]

    def drop(weights):
        for key in gone:
            del weights[key]

    broken = _copy_with_weights(root / "llm", tmp_path / "llm", drop)
    with pytest.raises(IncompleteWeightsError) as e:
        load_llm(broken, CPU)
    for key in gone:
        assert key in str(e.value)
