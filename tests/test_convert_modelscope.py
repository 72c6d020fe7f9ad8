"""The ModelScope -> transformers Chinese-CLIP conversion, checked against ModelScope's own model code.

ModelScope's ``VisualTransformer`` / ``CLIP`` classes are importable offline, so they are the oracle: random
(seeded, perturbed) weights, the same inputs, and the converted transformers model must give the same numbers.
"""
from __future__ import annotations

import json
import time

import pytest
import torch

from llava_lib import config as llava_config
from llava_lib.model import convert_modelscope as cm

ms_clip = pytest.importorskip("modelscope.models.multi_modal.clip.model")
from transformers import ChineseCLIPModel, ChineseCLIPVisionModel  # noqa: E402

ATOL = 1e-4

# A small ModelScope config: same 224 px / patch 16 geometry (197 tokens), narrow towers.
# vision_head_width=32 gives 4 heads of width 128 (exercises the head-count rule, not just the default 64).
SMALL_MS_CONFIG = dict(
    embed_dim=32,
    image_resolution=224,
    vision_layers=2,
    vision_width=128,
    vision_patch_size=16,
    vision_head_width=32,
    vocab_size=100,
    text_attention_probs_dropout_prob=0.1,
    text_hidden_act="gelu",
    text_hidden_dropout_prob=0.1,
    text_hidden_size=64,
    text_initializer_range=0.02,
    text_intermediate_size=128,
    text_max_position_embeddings=32,
    text_num_attention_heads=4,
    text_num_hidden_layers=2,
    text_type_vocab_size=2,
)
# The real ViT-B/16 vision side (vision_model_config.json of iic/multi-modal_clip-vit-base-patch16_zh) with the
# small text side: the text tower is checked at small size only, to keep CI fast.
REAL_VISION_MS_CONFIG = dict(
    SMALL_MS_CONFIG, embed_dim=512, vision_layers=12, vision_width=768, vision_patch_size=16, vision_head_width=64
)


class _Tok:
    """Stand-in for ModelScope's FullTokenizer: CLIP.encode_text only reads ``vocab['[PAD]']``."""

    vocab = {"[PAD]": 0}


def _perturb_(module: torch.nn.Module, seed: int) -> None:
    """Add noise to every parameter: default inits (LayerNorm 1/0, zero attention biases) would hide swapped
    or mis-split tensors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def make_ms_clip(ms_config: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = ms_clip.CLIP(**ms_config, tokenizer=_Tok())
    _perturb_(model, seed + 1)
    return model.eval()


def _hooked_tokens(visual, images):
    """ModelScope's 197-token hidden states before ``ln_post`` (its forward only returns the projected CLS)."""
    seen = {}
    handle = visual.transformer.register_forward_hook(lambda m, i, o: seen.__setitem__("x", o.permute(1, 0, 2)))
    try:
        out = visual(images)
    finally:
        handle.remove()
    return seen["x"], out


def _images(n: int, size: int = 224, seed: int = 123):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _token_ids(vocab: int, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 12), generator=g)
    ids[:, 0] = 2  # [CLS]
    ids[1, 8:] = 0  # padding, so the attention masks are exercised
    ids[2, 5:] = 0
    return ids


def _convert_full(ms_model, ms_config):
    config = cm.modelscope_to_hf_config(ms_config)
    hf = ChineseCLIPModel(config)
    hf.load_state_dict(cm.convert_state_dict(ms_model.state_dict(), config), strict=True)
    return hf.eval()


# ------------------------------------------------------------------------------------------- numbers


def test_config_uses_modelscope_activations_and_norms():
    cfg = cm.modelscope_to_hf_config(SMALL_MS_CONFIG)
    assert cfg.vision_config.hidden_act == "quick_gelu"  # ModelScope's QuickGELU
    assert cfg.text_config.hidden_act == "gelu"  # its BERT's erf GELU
    assert cfg.vision_config.layer_norm_eps == 1e-5 and cfg.text_config.layer_norm_eps == 1e-12
    assert cfg.vision_config.num_attention_heads == 4  # 128 // vision_head_width 32
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size) == (224, 16)
    assert cfg.projection_dim == 32 and cfg.vision_config.intermediate_size == 4 * 128


def test_small_vision_tower_matches_modelscope():
    torch.manual_seed(0)
    visual = ms_clip.VisualTransformer(input_resolution=224, patch_size=16, width=128, layers=2, heads=4, output_dim=32)
    _perturb_(visual, 1)
    visual.eval()
    vcfg = cm.modelscope_to_hf_config(SMALL_MS_CONFIG).vision_config
    hf = ChineseCLIPVisionModel(vcfg)
    hf.load_state_dict(cm.convert_state_dict(visual.state_dict(), vcfg), strict=True)
    hf.eval()

    x = _images(2)
    with torch.no_grad():
        ms_tokens, ms_out = _hooked_tokens(visual, x)
        out = hf(pixel_values=x, output_hidden_states=True)
    assert out.hidden_states[-1].shape == (2, 197, 128)
    assert (out.hidden_states[-1] - ms_tokens).abs().max() < ATOL
    # pooler = post_layernorm(CLS); ModelScope's output is ln_post(CLS) @ proj
    assert (out.pooler_output @ visual.proj - ms_out).abs().max() < ATOL


def test_small_full_clip_matches_modelscope_image_and_text():
    ms = make_ms_clip(SMALL_MS_CONFIG)
    hf = _convert_full(ms, SMALL_MS_CONFIG)
    x, ids = _images(2), _token_ids(SMALL_MS_CONFIG["vocab_size"])
    with torch.no_grad():
        ms_tokens, _ = _hooked_tokens(ms.visual, x)
        ms_img, ms_txt = ms.encode_image(x), ms.encode_text(ids)
        vis = hf.vision_model(pixel_values=x, output_hidden_states=True)
        img = hf.get_image_features(pixel_values=x).pooler_output
        txt = hf.get_text_features(input_ids=ids, attention_mask=(ids != 0).long()).pooler_output
    assert (vis.hidden_states[-1] - ms_tokens).abs().max() < ATOL
    assert img.shape == ms_img.shape == (2, 32)
    assert (img - ms_img).abs().max() < ATOL
    assert txt.shape == ms_txt.shape == (3, 32)
    assert (txt - ms_txt).abs().max() < ATOL
    assert torch.equal(hf.logit_scale.detach(), ms.logit_scale.detach())


@pytest.mark.slow
def test_real_size_vit_b16_matches_modelscope():
    t0 = time.perf_counter()
    ms = make_ms_clip(REAL_VISION_MS_CONFIG, seed=3)
    hf = _convert_full(ms, REAL_VISION_MS_CONFIG)
    vc = hf.config.vision_config
    assert (vc.hidden_size, vc.num_hidden_layers, vc.num_attention_heads, vc.patch_size, vc.image_size) == (
        768, 12, 12, 16, 224)
    assert hf.config.projection_dim == 512
    x = _images(1)
    with torch.no_grad():
        ms_tokens, ms_img = _hooked_tokens(ms.visual, x)
        vis = hf.vision_model(pixel_values=x, output_hidden_states=True)
        img = hf.get_image_features(pixel_values=x).pooler_output
    assert vis.hidden_states[-1].shape == ms_tokens.shape == (1, 197, 768)
    assert (vis.hidden_states[-1] - ms_tokens).abs().max() < ATOL
    assert (img - ms_img).abs().max() < ATOL
    assert time.perf_counter() - t0 < 120  # budget: ~60 s on 2 CPU cores, with slack for slow CI machines


# ------------------------------------------------------------------------------------------- faults


@pytest.fixture(scope="module")
def small_pair():
    ms = make_ms_clip(SMALL_MS_CONFIG)
    return ms.state_dict(), cm.modelscope_to_hf_config(SMALL_MS_CONFIG)


def test_deleted_key_is_named(small_pair):
    sd, cfg = small_pair
    sd = dict(sd)
    key = "visual.transformer.resblocks.1.attn.in_proj_weight"
    del sd[key]
    with pytest.raises(cm.CheckpointMismatchError) as e:
        cm.convert_state_dict(sd, cfg)
    assert key in str(e.value) and "缺少" in str(e.value)
    assert "[384, 128]" in str(e.value)  # the shape it needed


def test_misshaped_key_names_both_shapes(small_pair):
    sd, cfg = small_pair
    sd = dict(sd)
    sd["visual.proj"] = torch.zeros(128, 16)
    with pytest.raises(cm.CheckpointMismatchError) as e:
        cm.convert_state_dict(sd, cfg)
    msg = str(e.value)
    assert "visual.proj" in msg and "[128, 16]" in msg and "[128, 32]" in msg
    assert isinstance(e.value, ValueError) and len(e.value.problems) == 1


def test_unused_key_is_named(small_pair):
    sd, cfg = small_pair
    sd = dict(sd, **{"visual.extra_token": torch.zeros(3)})
    with pytest.raises(cm.CheckpointMismatchError, match="visual.extra_token"):
        cm.convert_state_dict(sd, cfg)


def test_wrappers_prefixes_and_fp16_are_handled(small_pair):
    sd, cfg = small_pair
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v.half() for k, v in sd.items()}}
    out = cm.convert_state_dict(wrapped, cfg)
    assert all(t.dtype == torch.float32 for t in out.values())
    assert "text_model.pooler.dense.weight" not in out  # the BERT pooler is dropped on purpose
    plain = cm.convert_state_dict(sd, cfg)
    assert set(out) == set(plain)


# ----------------------------------------------------------------------------------- directories


def _vocab(n: int) -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return specials + [chr(0x4E00 + i) for i in range(n - len(specials))]


@pytest.fixture(scope="module")
def ms_dir(tmp_path_factory):
    """A ModelScope-layout directory as the hub ships it (weights wrapped and ``module.``-prefixed)."""
    d = tmp_path_factory.mktemp("ms_clip")
    ms = make_ms_clip(SMALL_MS_CONFIG, seed=5)
    torch.save({"state_dict": {f"module.{k}": v for k, v in ms.state_dict().items()}}, d / "pytorch_model.bin")
    vision_keys = [k for k in SMALL_MS_CONFIG if not (k.startswith("text_") or k == "vocab_size")]
    (d / cm.MS_VISION_CONFIG).write_text(json.dumps({k: SMALL_MS_CONFIG[k] for k in vision_keys}))
    (d / cm.MS_TEXT_CONFIG).write_text(json.dumps({k: v for k, v in SMALL_MS_CONFIG.items() if k not in vision_keys}))
    (d / cm.MS_VOCAB).write_text("\n".join(_vocab(SMALL_MS_CONFIG["vocab_size"])) + "\n", encoding="utf-8")
    (d / "configuration.json").write_text(json.dumps({"framework": "pytorch", "task": "multi-modal-embedding"}))
    return d, ms


def test_load_chinese_clip_converts_a_modelscope_dir_once(ms_dir, tmp_path, monkeypatch, capsys):
    d, ms = ms_dir
    monkeypatch.setenv("LLAVA_HOME", str(tmp_path / "home"))
    assert cm.is_modelscope_layout(d) and not cm.is_transformers_layout(d)
    hf = cm.load_chinese_clip(d)
    converted = cm.converted_dir_for(d)
    assert converted.parent == tmp_path / "home" / "converted" and cm.is_converted_dir(converted)
    assert "转换完成" in capsys.readouterr().out
    x = _images(1)
    with torch.no_grad():
        assert (hf.get_image_features(pixel_values=x).pooler_output - ms.encode_image(x)).abs().max() < ATOL
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    again = cm.load_chinese_clip(d)  # the cached copy, announced in one line
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and str(converted) in out[0]
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp
    with torch.no_grad():
        assert torch.equal(again.get_image_features(pixel_values=x).pooler_output,
                           hf.get_image_features(pixel_values=x).pooler_output)


def test_convert_modelscope_dir_writes_a_from_pretrained_dir(ms_dir, tmp_path):
    from transformers import ChineseCLIPProcessor

    from modelscope.models.multi_modal.clip.bert_tokenizer import FullTokenizer

    src, ms = ms_dir
    dst = tmp_path / "clip"
    cm.convert_modelscope_dir(src, dst)
    assert cm.is_converted_dir(dst)
    assert not list(tmp_path.glob(".clip.tmp-*"))  # the temporary directory was renamed, not left behind
    hf = cm.load_chinese_clip(dst)  # plain from_pretrained path now
    x, ids = _images(1), _token_ids(SMALL_MS_CONFIG["vocab_size"])
    with torch.no_grad():
        assert (hf.get_image_features(pixel_values=x).pooler_output - ms.encode_image(x)).abs().max() < ATOL
        txt = hf.get_text_features(input_ids=ids, attention_mask=(ids != 0).long()).pooler_output
        assert (txt - ms.encode_text(ids)).abs().max() < ATOL

    proc = ChineseCLIPProcessor.from_pretrained(dst)
    text = "一丁七万"
    ms_tok = FullTokenizer(vocab_file=str(src / cm.MS_VOCAB))
    want = [ms_tok.vocab["[CLS]"]] + ms_tok.convert_tokens_to_ids(ms_tok.tokenize(text)) + [ms_tok.vocab["[SEP]"]]
    assert proc.tokenizer(text)["input_ids"] == want
    ip = proc.image_processor
    assert list(ip.image_mean) == list(cm.CLIP_MEAN) and list(ip.image_std) == list(cm.CLIP_STD)
    assert ip.size["height"] == ip.size["width"] == 224 and not ip.do_center_crop
    from PIL import Image

    pv = proc(images=Image.new("RGB", (320, 200), (200, 30, 30)), return_tensors="pt")["pixel_values"]
    assert pv.shape == (1, 3, 224, 224)

    # A second call keeps the converted directory instead of redoing the work.
    mtime = (dst / "model.safetensors").stat().st_mtime_ns
    cm.convert_modelscope_dir(src, dst)
    assert (dst / "model.safetensors").stat().st_mtime_ns == mtime


def test_load_chinese_clip_missing_dir_names_path_and_command(tmp_path):
    for path in (tmp_path / "nope", tmp_path):
        with pytest.raises(llava_config.MissingResourceError) as e:
            cm.load_chinese_clip(path)
        assert str(path) in str(e.value)
        assert llava_config.DOWNLOAD_CMDS["clip_path"] in str(e.value)


def test_load_chinese_clip_rejects_other_model_types(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    with pytest.raises(llava_config.MissingResourceError, match="qwen3"):
        cm.load_chinese_clip(tmp_path)


def test_truncated_weights_file_is_reported(ms_dir, tmp_path):
    src, _ = ms_dir
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    w = tmp_path / "pytorch_model.bin"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(cm.CheckpointMismatchError, match="pytorch_model.bin"):
        cm.load_chinese_clip(tmp_path)


def test_mismatch_error_is_the_library_wide_one():
    from llava_lib.model.checkpoint import CheckpointMismatchError as Base

    assert issubclass(cm.CheckpointMismatchError, Base) and issubclass(cm.CheckpointMismatchError, ValueError)


def test_missing_scalar_key_shows_its_empty_shape(small_pair):
    sd, cfg = small_pair
    sd = {k: v for k, v in sd.items() if k != "logit_scale" and not k.startswith("bert.pooler.")}
    with pytest.raises(cm.CheckpointMismatchError) as e:  # the pooler may be absent; logit_scale may not
        cm.convert_state_dict(sd, cfg)
    assert len(e.value.problems) == 1 and "logit_scale" in e.value.problems[0] and "[]" in e.value.problems[0]
