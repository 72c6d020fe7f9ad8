"""ModelScope Chinese-CLIP checkpoint (``pytorch_model.bin``, ``vision_model_config.json`` + ``text_model_config.json``,
``vocab.txt``) -> transformers ``ChineseCLIPModel``, mapped key by key: the course loads one transformers class for the
mini world and the real model, and needs modelscope only to download. The mapping is exact (every source key used or
deliberately dropped, every shape checked), so a wrong checkpoint fails here rather than as bad features later.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import ChineseCLIPConfig, ChineseCLIPModel, ChineseCLIPTextConfig, ChineseCLIPVisionConfig

from llava_lib import config as llava_config
from llava_lib.files import atomic_write_json
from llava_lib.model.checkpoint import CheckpointMismatchError
from llava_lib.process import CLIP_MEAN, CLIP_STD

MS_VISION_CONFIG, MS_TEXT_CONFIG, MS_VOCAB = "vision_model_config.json", "text_model_config.json", "vocab.txt"
# ModelScope loads pytorch_model.bin; the others are names of the original Chinese-CLIP release.
MS_WEIGHT_NAMES = ("pytorch_model.bin", "pytorch_model.pt", "clip_cn_vit-b-16.pt", "model.pt")
_TEXT_ACT = {"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu", "swish": "silu"}  # its BERT's gelu is erf's too
# transformers' vision names -> ModelScope's, replaced in this order (nn.MultiheadAttention's packed q, k, v and the
# transposed projections are handled in _source).
_VISION_NAMES = (("embeddings.patch_embedding.weight", "conv1.weight"),
                 ("embeddings.class_embedding", "class_embedding"),
                 ("embeddings.position_embedding.weight", "positional_embedding"), ("pre_layrnorm.", "ln_pre."),
                 ("post_layernorm.", "ln_post."), ("encoder.layers.", "transformer.resblocks."),
                 ("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
                 ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))
# No target on purpose: ChineseCLIPModel has no text pooler (ModelScope's encode_text uses [CLS], not the pooler).
_DROPPED = {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}


def modelscope_to_hf_config(ms_config: Mapping) -> ChineseCLIPConfig:
    """A ``ChineseCLIPConfig`` from ModelScope's merged ``vision_model_config.json`` + ``text_model_config.json``."""
    c = dict(ms_config)
    missing = [k for k in ("embed_dim image_resolution vision_layers vision_width vision_patch_size vocab_size "
                           "text_hidden_size text_num_hidden_layers text_num_attention_heads text_intermediate_size "
                           "text_max_position_embeddings").split() if k not in c]
    if missing:
        raise CheckpointMismatchError(f"ModelScope 配置缺少这些键：{missing}（应来自 {MS_VISION_CONFIG} / {MS_TEXT_CONFIG}）")
    if isinstance(c["vision_layers"], (list, tuple)):
        raise CheckpointMismatchError(f"这是 ResNet 版的 Chinese-CLIP（vision_layers={c['vision_layers']}），本课程只支持 "
                                      f"ViT 版本，请使用 {llava_config.CLIP_MODEL_ID}。")
    act = c.get("text_hidden_act", "gelu")
    if act not in _TEXT_ACT:
        raise CheckpointMismatchError(f"不支持的文本激活函数 text_hidden_act={act!r}；可选：{sorted(_TEXT_ACT)}")
    width = int(c["vision_width"])
    vision = ChineseCLIPVisionConfig(
        hidden_size=width, intermediate_size=4 * width, projection_dim=int(c["embed_dim"]),
        num_hidden_layers=int(c["vision_layers"]),
        num_attention_heads=width // int(c.get("vision_head_width", 64)),  # ModelScope's rule, 64-wide by default
        image_size=int(c["image_resolution"]), patch_size=int(c["vision_patch_size"]),
        hidden_act="quick_gelu", layer_norm_eps=1e-5)  # ModelScope's QuickGELU, and torch's LayerNorm default
    text = ChineseCLIPTextConfig(
        vocab_size=int(c["vocab_size"]), hidden_size=int(c["text_hidden_size"]),
        num_hidden_layers=int(c["text_num_hidden_layers"]), num_attention_heads=int(c["text_num_attention_heads"]),
        intermediate_size=int(c["text_intermediate_size"]), hidden_act=_TEXT_ACT[act],
        hidden_dropout_prob=float(c.get("text_hidden_dropout_prob", 0.1)),
        attention_probs_dropout_prob=float(c.get("text_attention_probs_dropout_prob", 0.1)),
        max_position_embeddings=int(c["text_max_position_embeddings"]),
        type_vocab_size=int(c.get("text_type_vocab_size", 2)),
        initializer_range=float(c.get("text_initializer_range", 0.02)),
        layer_norm_eps=1e-12, pad_token_id=0)  # both hard-coded in ModelScope's CLIP ([PAD] is id 0 in its vocab)
    return ChineseCLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                             projection_dim=int(c["embed_dim"]))


def _source(key: str) -> tuple[str, str]:
    """The ModelScope key a transformers key comes from, and how: ``copy``, ``t`` (transposed) or ``q``/``k``/``v``
    (that third of the packed ``in_proj``)."""
    if key in ("visual_projection.weight", "text_projection.weight"):
        return ("visual.proj" if key[0] == "v" else "text_projection"), "t"
    if key.startswith("text_model.") or key == "logit_scale":
        return re.sub(r"^text_model\.", "bert.", key), "copy"
    key, how = key.removeprefix("vision_model."), "copy"
    if m := re.search(r"self_attn\.([qkv])_proj\.(weight|bias)$", key):
        key, how = key[:m.start()] + f"attn.in_proj_{m[2]}", m[1]
    for ours, theirs in _VISION_NAMES:
        key = key.replace(ours, theirs)
    return "visual." + key, how


def convert_state_dict(ms_sd: Mapping[str, torch.Tensor], config: ChineseCLIPConfig | ChineseCLIPVisionConfig
                       ) -> dict[str, torch.Tensor]:
    """A ModelScope Chinese-CLIP state dict on ``ChineseCLIPModel``'s keys, in fp32; with a ``ChineseCLIPVisionConfig``,
    the visual tower alone (``visual.`` prefix optional) on ``ChineseCLIPVisionModel``'s. Raises
    :class:`CheckpointMismatchError` naming every missing, unused or mis-shaped key."""
    from transformers import ChineseCLIPVisionModel
    # Undo the wrappers ModelScope's loader strips: ``{"state_dict": ...}``, ``module.``, ``clip_model.``.
    sd = {re.sub(r"^(module\.)?(clip_model\.)?", "", k): v for k, v in ms_sd.get("state_dict", ms_sd).items()}
    vision_only = isinstance(config, ChineseCLIPVisionConfig)
    if vision_only and not any(k.startswith("visual.") for k in sd):
        sd = {f"visual.{k}": v for k, v in sd.items()}
    with torch.device("meta"):  # the target's shapes, without memory or init
        targets = {k: tuple(v.shape) for k, v in (ChineseCLIPVisionModel if vision_only else ChineseCLIPModel)(
            config).state_dict().items()}
    by_source: dict[str, list] = {}
    for key in targets:
        src, how = _source(key)
        by_source.setdefault(src, []).append((key, how))
    out, problems = {}, []
    for src, dsts in by_source.items():
        shape, how = targets[dsts[0][0]], dsts[0][1]
        need = shape[::-1] if how == "t" else (3 * shape[0], *shape[1:]) if how in ("q", "k", "v") else shape
        names = ", ".join(k for k, _ in dsts)
        if src not in sd:
            problems.append(f"缺少权重 {src}（需要形状 {list(need)}，对应目标 {names}）")
        elif tuple(sd[src].shape) != need:
            problems.append(f"权重 {src} 的形状是 {list(sd[src].shape)}，但目标 {names} 需要 {list(need)}")
        else:
            t = sd[src].float()
            for key, how in dsts:
                out[key] = (t.t() if how == "t" else t.chunk(3)["qkv".index(how)] if how != "copy" else t).contiguous()
    for k in sorted(set(sd) - set(by_source) - _DROPPED - ({"visual.proj"} if vision_only else set())):
        problems.append(f"多余的权重 {k}（形状 {list(getattr(sd[k], 'shape', ()))}）：目标模型中没有对应的参数")
    if problems:
        more = f"\n  ……另有 {len(problems) - 20} 处" if len(problems) > 20 else ""
        raise CheckpointMismatchError(
            f"ModelScope Chinese-CLIP 权重与目标模型结构不匹配（共 {len(problems)} 处）：\n  - " + "\n  - ".join(problems[:20])
            + f"{more}\n  请确认下载的是 {llava_config.CLIP_MODEL_ID} 的完整文件，且配置（{MS_VISION_CONFIG} / "
            f"{MS_TEXT_CONFIG}）与权重一致。", problems)
    return out


def _weights(path: Path) -> Path | None:
    return next((path / n for n in MS_WEIGHT_NAMES if (path / n).is_file()), None)


def _model_type(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def is_transformers_layout(path: str | Path) -> bool:
    """True when ``path/config.json`` declares ``model_type: chinese_clip``."""
    return _model_type(Path(path)) == "chinese_clip"


def is_modelscope_layout(path: str | Path) -> bool:
    """True when ``path`` holds a ModelScope Chinese-CLIP checkpoint (weights + the vision config)."""
    return _weights(Path(path)) is not None and (Path(path) / MS_VISION_CONFIG).is_file()


def is_converted_dir(path: str | Path) -> bool:
    """A transformers-layout Chinese-CLIP directory with weights and a processor: what conversion writes."""
    path = Path(path)
    return is_transformers_layout(path) and all(any((path / f).is_file() for f in pair) for pair in (
        ("model.safetensors", "model.safetensors.index.json"), ("processor_config.json", "preprocessor_config.json")))


def converted_dir_for(src: str | Path) -> Path:
    """Where the transformers copy of a ModelScope directory is cached (one per source path)."""
    src = Path(src).expanduser().resolve()
    return llava_config.llava_home() / "converted" / f"{src.name}-{hashlib.sha1(str(src).encode()).hexdigest()[:10]}"


def _missing(path: Path, why: str) -> llava_config.MissingResourceError:
    return llava_config.MissingResourceError(
        f"Chinese-CLIP 模型目录{why}：{path}\n  解决办法：运行 `{llava_config.DOWNLOAD_CMDS['clip_path']}` 下载并转换，"
        f"或把环境变量 {llava_config.ENV_VARS['clip_path']} 指向已有的 Chinese-CLIP 目录（transformers 格式或 ModelScope 格式均可）。")


def load_chinese_clip(path: str | Path) -> ChineseCLIPModel:
    """Chinese-CLIP from a transformers directory, or from a ModelScope one converted once (into
    :func:`converted_dir_for`); otherwise ``MissingResourceError`` naming the path and the download command."""
    path = Path(path).expanduser()
    if not path.exists():
        raise _missing(path, "不存在")
    if is_modelscope_layout(path) and not is_transformers_layout(path):
        path = convert_modelscope_dir(path, converted_dir_for(path))  # later calls say in one line that they reuse it
    if not is_transformers_layout(path):
        raise _missing(path, f"中的 config.json 不是 Chinese-CLIP（model_type={_model_type(path)!r}）" if (
            path / "config.json").is_file() else f"既不是 transformers 格式（缺少 config.json），也不是 ModelScope 格式（缺少 "
                                                  f"{MS_VISION_CONFIG} 或权重文件）")
    return ChineseCLIPModel.from_pretrained(path).eval()


def convert_modelscope_dir(src: str | Path, dst: str | Path, overwrite: bool = False) -> Path:
    """Write a transformers-layout copy of a ModelScope Chinese-CLIP directory (fp32 ``model.safetensors``, and a
    processor that preprocesses as ModelScope does), through a temporary sibling renamed at the end, so an
    interrupted run never leaves a half-written ``dst``. An already converted ``dst`` is kept unless ``overwrite``."""
    from transformers import BertTokenizer, ChineseCLIPImageProcessorPil, ChineseCLIPProcessor
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if is_converted_dir(dst) and not overwrite:
        print(f"已存在转换好的 Chinese-CLIP（transformers 格式）：{dst}，跳过转换。")
        return dst
    if not is_modelscope_layout(src) or not all((src / f).is_file() for f in (MS_TEXT_CONFIG, MS_VOCAB)):
        raise _missing(src, f"不是完整的 ModelScope 格式（需要权重文件、{MS_VISION_CONFIG}、{MS_TEXT_CONFIG} 和分词词表 {MS_VOCAB}）")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"目标目录 {dst} 已存在且不为空，但不是转换好的 Chinese-CLIP 目录。"
                              f"请换一个目录，或确认可以覆盖后使用 overwrite=True。")
    print(f"正在把 ModelScope 格式的 Chinese-CLIP 转换为 transformers 格式：{src} -> {dst}")
    try:  # weights_only: no pickle code runs
        ms_sd = torch.load(_weights(src), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, or a pickle that needs code execution
        raise CheckpointMismatchError(f"无法读取权重文件 {_weights(src)}：{e}\n  文件可能下载不完整；请删除后运行 "
                                      f"`{llava_config.DOWNLOAD_CMDS['clip_path']}` 重新下载。") from e
    config = modelscope_to_hf_config({**json.loads((src / MS_VISION_CONFIG).read_text("utf-8")),
                                      **json.loads((src / MS_TEXT_CONFIG).read_text("utf-8"))})  # as ModelScope merges
    model = ChineseCLIPModel(config)
    model.load_state_dict(convert_state_dict(ms_sd, config), strict=True)
    size = {"height": config.vision_config.image_size, "width": config.vision_config.image_size}
    processor = ChineseCLIPProcessor(  # ModelScope resizes straight to the square (no centre crop), bicubic
        image_processor=ChineseCLIPImageProcessorPil(size=size, crop_size=size, do_center_crop=False, resample=3,
                                                     image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)),
        # ``vocab=`` (a path) is what transformers 5 reads; ``vocab_file=`` would be silently ignored.
        tokenizer=BertTokenizer(vocab=str(src / MS_VOCAB), do_lower_case=True, model_max_length=512))
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Built in a temp folder and renamed into place; a failure removes the folder, and after the rename there is
    # nothing left to remove (ignore_cleanup_errors).
    with tempfile.TemporaryDirectory(prefix=f".{dst.name}.tmp-", dir=dst.parent, ignore_cleanup_errors=True) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        shutil.copyfile(src / MS_VOCAB, Path(tmp) / MS_VOCAB)  # older tokenizer loaders look for vocab.txt
        atomic_write_json(Path(tmp) / "conversion.json",
                          {"source": str(src), "source_model_id": llava_config.CLIP_MODEL_ID})
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    print(f"转换完成：{dst}")
    return dst
