"""ModelScope Chinese-CLIP checkpoint -> transformers ``ChineseCLIPModel``.

ModelScope's ``iic/multi-modal_clip-vit-base-patch16_zh`` ships the original Chinese-CLIP layout
(``modelscope/models/multi_modal/clip/model.py``)::

    pytorch_model.bin            state dict, maybe wrapped in {"state_dict": ...}, maybe "module." prefixed
    vision_model_config.json     embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size
    text_model_config.json       vocab_size, text_hidden_size, text_num_hidden_layers, ... (a BERT)
    vocab.txt                    the BERT vocabulary

We map that state dict onto ``ChineseCLIPModel`` key by key instead of importing ModelScope's framework at run
time: the course then loads one transformers class for the mini world and the real model alike, and needs
modelscope only to download. The mapping is exact: every source key is used (or explicitly dropped, see
``_DROPPED``), every target key is produced and every shape is checked, so a wrong checkpoint fails loudly
here rather than as bad features later.

Source -> target (W = vision width, L = layer index)::

    visual.conv1.weight                       [W,3,P,P] -> vision_model.embeddings.patch_embedding.weight
    visual.class_embedding                    [W]       -> vision_model.embeddings.class_embedding
    visual.positional_embedding               [N+1,W]   -> vision_model.embeddings.position_embedding.weight
    visual.ln_pre.*                                     -> vision_model.pre_layrnorm.*   (transformers' spelling)
    visual.transformer.resblocks.L.attn.in_proj_weight [3W,W] -> ...layers.L.self_attn.{q,k,v}_proj.weight
    visual.transformer.resblocks.L.attn.in_proj_bias   [3W]   -> ...layers.L.self_attn.{q,k,v}_proj.bias
    visual.transformer.resblocks.L.attn.out_proj.*      -> ...layers.L.self_attn.out_proj.*
    visual.transformer.resblocks.L.ln_1/ln_2.*          -> ...layers.L.layer_norm1/layer_norm2.*
    visual.transformer.resblocks.L.mlp.c_fc/c_proj.*    -> ...layers.L.mlp.fc1/fc2.*
    visual.ln_post.*                                    -> vision_model.post_layernorm.*
    visual.proj                               [W,D]     -> visual_projection.weight [D,W]   (transposed)
    bert.embeddings.* / bert.encoder.*                  -> text_model.embeddings.* / text_model.encoder.*
    bert.pooler.dense.*                                 -> dropped (ChineseCLIPModel has no text pooler; ModelScope's
                                                           encode_text uses the [CLS] hidden state, not the pooler)
    text_projection                           [H,D]     -> text_projection.weight [D,H]     (transposed)
    logit_scale                               []        -> logit_scale
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    ChineseCLIPConfig,
    ChineseCLIPModel,
    ChineseCLIPTextConfig,
    ChineseCLIPVisionConfig,
)

from llava_lib import config as llava_config
from llava_lib.model.checkpoint import CheckpointMismatchError as _CheckpointMismatchError
from llava_lib.process import CLIP_MEAN, CLIP_STD

# File names of the ModelScope layout (modelscope.utils.constant.ModelFile and CLIPForMultiModalEmbedding).
MS_VISION_CONFIG = "vision_model_config.json"
MS_TEXT_CONFIG = "text_model_config.json"
MS_VOCAB = "vocab.txt"
# ModelScope loads ``pytorch_model.bin``; the others are names the original Chinese-CLIP release uses.
MS_WEIGHT_NAMES = ("pytorch_model.bin", "pytorch_model.pt", "clip_cn_vit-b-16.pt", "model.pt")

# CLIP's normalisation; ModelScope's CLIPPreprocessor resizes straight to 224x224 (no centre crop), bicubic.

# ModelScope's QuickGELU is x * sigmoid(1.702 x), which transformers calls "quick_gelu"; its BERT's "gelu" is the
# erf form, as is transformers' "gelu".
_TEXT_ACT = {"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu", "swish": "silu"}
VISION_HIDDEN_ACT = "quick_gelu"
VISION_LAYER_NORM_EPS = 1e-5  # ModelScope's LayerNorm subclass keeps torch's default
TEXT_LAYER_NORM_EPS = 1e-12  # hard-coded in ModelScope's CLIP.__init__
HEAD_WIDTH = 64  # ModelScope: heads = width // vision_head_width (default 64); BERT-base/large use 64 too

# Source keys that have no target on purpose (see module docstring).
_DROPPED = ("bert.pooler.dense.weight", "bert.pooler.dense.bias")


class CheckpointMismatchError(_CheckpointMismatchError):
    """The checkpoint's keys or shapes do not fit the target model; ``problems`` lists each one.

    A subclass of ``checkpoint.CheckpointMismatchError`` (itself a ``ValueError``), so one ``except`` catches
    both a bad projection checkpoint and a bad CLIP checkpoint.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


# ----------------------------------------------------------------------------------------------- config


def modelscope_to_hf_config(ms_config: Mapping) -> ChineseCLIPConfig:
    """Build a ``ChineseCLIPConfig`` from ModelScope's merged vision + text config JSON.

    ``ms_config`` has the keyword arguments of ModelScope's ``CLIP.__init__`` (``embed_dim``,
    ``image_resolution``, ``vision_layers``, ``vision_width``, ``vision_patch_size``, ``vocab_size``,
    ``text_hidden_size`` ...), i.e. what ``vision_model_config.json`` and ``text_model_config.json`` hold.
    """
    c = dict(ms_config)
    need = ("embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size", "vocab_size",
            "text_hidden_size", "text_num_hidden_layers", "text_num_attention_heads", "text_intermediate_size",
            "text_max_position_embeddings")
    missing = [k for k in need if k not in c]
    if missing:
        raise CheckpointMismatchError(f"ModelScope 配置缺少这些键：{missing}（应来自 {MS_VISION_CONFIG} / {MS_TEXT_CONFIG}）")
    if isinstance(c["vision_layers"], (list, tuple)):
        raise CheckpointMismatchError(
            f"这是 ResNet 版的 Chinese-CLIP（vision_layers={c['vision_layers']}），本课程只支持 ViT 版本，"
            f"请使用 {llava_config.CLIP_MODEL_ID}。"
        )
    width = int(c["vision_width"])
    act = c.get("text_hidden_act", "gelu")
    if act not in _TEXT_ACT:
        raise CheckpointMismatchError(f"不支持的文本激活函数 text_hidden_act={act!r}；可选：{sorted(_TEXT_ACT)}")
    vision = ChineseCLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,  # ModelScope's ResidualAttentionBlock: c_fc = Linear(d, 4d)
        projection_dim=int(c["embed_dim"]),
        num_hidden_layers=int(c["vision_layers"]),
        num_attention_heads=width // int(c.get("vision_head_width", HEAD_WIDTH)),
        image_size=int(c["image_resolution"]),
        patch_size=int(c["vision_patch_size"]),
        hidden_act=VISION_HIDDEN_ACT,
        layer_norm_eps=VISION_LAYER_NORM_EPS,
    )
    text = ChineseCLIPTextConfig(
        vocab_size=int(c["vocab_size"]),
        hidden_size=int(c["text_hidden_size"]),
        num_hidden_layers=int(c["text_num_hidden_layers"]),
        num_attention_heads=int(c["text_num_attention_heads"]),
        intermediate_size=int(c["text_intermediate_size"]),
        hidden_act=_TEXT_ACT[act],
        hidden_dropout_prob=float(c.get("text_hidden_dropout_prob", 0.1)),
        attention_probs_dropout_prob=float(c.get("text_attention_probs_dropout_prob", 0.1)),
        max_position_embeddings=int(c["text_max_position_embeddings"]),
        type_vocab_size=int(c.get("text_type_vocab_size", 2)),
        initializer_range=float(c.get("text_initializer_range", 0.02)),
        layer_norm_eps=TEXT_LAYER_NORM_EPS,
        pad_token_id=0,  # ModelScope's BertEmbeddings: padding_idx=0, and [PAD] is id 0 in its vocab
    )
    return ChineseCLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=int(c["embed_dim"])
    )


def _count_layers(keys, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return max(idx) + 1 if idx else 0


def modelscope_config_from_state_dict(ms_sd: Mapping[str, torch.Tensor]) -> dict:
    """Recover ModelScope's config dict from tensor shapes (for a directory without the JSON files).

    Head counts are not visible in shapes; like ModelScope we assume 64-wide heads.
    """
    sd = normalize_modelscope_keys(ms_sd)
    try:
        conv = sd["visual.conv1.weight"]
        pos = sd["visual.positional_embedding"]
        proj = sd["visual.proj"]
        words = sd["bert.embeddings.word_embeddings.weight"]
        return dict(
            embed_dim=proj.shape[1],
            image_resolution=math.isqrt(pos.shape[0] - 1) * conv.shape[-1],
            vision_layers=_count_layers(sd, "visual.transformer.resblocks."),
            vision_width=conv.shape[0],
            vision_patch_size=conv.shape[-1],
            vocab_size=words.shape[0],
            text_hidden_size=words.shape[1],
            text_num_hidden_layers=_count_layers(sd, "bert.encoder.layer."),
            text_num_attention_heads=words.shape[1] // HEAD_WIDTH,
            text_intermediate_size=sd["bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
            text_max_position_embeddings=sd["bert.embeddings.position_embeddings.weight"].shape[0],
            text_type_vocab_size=sd["bert.embeddings.token_type_embeddings.weight"].shape[0],
            text_hidden_act="gelu",
        )
    except KeyError as e:
        raise CheckpointMismatchError(
            f"无法从权重推断 Chinese-CLIP 的结构：缺少键 {e.args[0]}。这可能不是 ModelScope 的 ViT 版 Chinese-CLIP 权重。"
        ) from e


def read_modelscope_config(model_dir: str | Path, ms_sd: Mapping[str, torch.Tensor] | None = None) -> dict:
    """Merge ``vision_model_config.json`` and ``text_model_config.json`` (as ModelScope does); fall back to shapes."""
    model_dir = Path(model_dir)
    files = [model_dir / MS_VISION_CONFIG, model_dir / MS_TEXT_CONFIG]
    if all(f.is_file() for f in files):
        merged: dict = {}
        for f in files:
            merged.update(json.loads(f.read_text(encoding="utf-8")))
        return merged
    if ms_sd is None:
        raise CheckpointMismatchError(f"{model_dir} 中没有 {MS_VISION_CONFIG} 和 {MS_TEXT_CONFIG}，且未提供权重用于推断结构。")
    return modelscope_config_from_state_dict(ms_sd)


# ----------------------------------------------------------------------------------------- state dict


@dataclass(frozen=True)
class _Rule:
    """One source tensor -> one or more target tensors. kind: copy | transpose | split3 | drop."""

    src: str
    dst: tuple[str, ...]
    kind: str = "copy"


def _vision_rules(n_layers: int, src: str, dst: str, with_projection: bool) -> list[_Rule]:
    rules = [
        _Rule(f"{src}conv1.weight", (f"{dst}embeddings.patch_embedding.weight",)),
        _Rule(f"{src}class_embedding", (f"{dst}embeddings.class_embedding",)),
        _Rule(f"{src}positional_embedding", (f"{dst}embeddings.position_embedding.weight",)),
    ]
    for p in ("weight", "bias"):
        rules += [
            _Rule(f"{src}ln_pre.{p}", (f"{dst}pre_layrnorm.{p}",)),
            _Rule(f"{src}ln_post.{p}", (f"{dst}post_layernorm.{p}",)),
        ]
    for i in range(n_layers):
        s, d = f"{src}transformer.resblocks.{i}.", f"{dst}encoder.layers.{i}."
        qkv = ("q_proj", "k_proj", "v_proj")  # nn.MultiheadAttention packs q, k, v in this order
        rules += [
            _Rule(f"{s}attn.in_proj_weight", tuple(f"{d}self_attn.{n}.weight" for n in qkv), "split3"),
            _Rule(f"{s}attn.in_proj_bias", tuple(f"{d}self_attn.{n}.bias" for n in qkv), "split3"),
        ]
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            rules += [_Rule(f"{s}{a}.{p}", (f"{d}{b}.{p}",)) for p in ("weight", "bias")]
    if with_projection:
        rules.append(_Rule(f"{src}proj", ("visual_projection.weight",), "transpose"))
    else:  # ChineseCLIPVisionModel has no projection: the tower alone is asked for
        rules.append(_Rule(f"{src}proj", (), "drop"))
    return rules


def _text_rules(n_layers: int) -> list[_Rule]:
    names = [f"embeddings.{n}.weight" for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    names += [f"embeddings.LayerNorm.{p}" for p in ("weight", "bias")]
    for i in range(n_layers):
        for mod in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                    "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"):
            names += [f"encoder.layer.{i}.{mod}.{p}" for p in ("weight", "bias")]
    rules = [_Rule(f"bert.{n}", (f"text_model.{n}",)) for n in names]
    rules += [_Rule(k, (), "drop") for k in _DROPPED]
    rules += [
        _Rule("text_projection", ("text_projection.weight",), "transpose"),
        _Rule("logit_scale", ("logit_scale",)),
    ]
    return rules


def mapping_rules(config: ChineseCLIPConfig | ChineseCLIPVisionConfig) -> list[_Rule]:
    """All rules for a full ``ChineseCLIPModel`` or, given a vision config, a bare ``ChineseCLIPVisionModel``."""
    if isinstance(config, ChineseCLIPVisionConfig):
        return _vision_rules(config.num_hidden_layers, "visual.", "", with_projection=False)
    return _vision_rules(config.vision_config.num_hidden_layers, "visual.", "vision_model.", True) + _text_rules(
        config.text_config.num_hidden_layers
    )


def normalize_modelscope_keys(ms_sd: Mapping) -> dict[str, torch.Tensor]:
    """Undo the wrappers ModelScope's loader strips: ``{"state_dict": ...}``, ``module.``, ``clip_model.``."""
    sd = ms_sd.get("state_dict", ms_sd) if isinstance(ms_sd, Mapping) else ms_sd
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "clip_model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _expected_target_shapes(config) -> dict[str, tuple[int, ...]]:
    """Persistent parameter shapes of the target model, built on the meta device (no memory, no init)."""
    from transformers import ChineseCLIPVisionModel

    cls = ChineseCLIPVisionModel if isinstance(config, ChineseCLIPVisionConfig) else ChineseCLIPModel
    with torch.device("meta"):
        model = cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _fmt(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def convert_state_dict(
    ms_sd: Mapping[str, torch.Tensor],
    config: ChineseCLIPConfig | ChineseCLIPVisionConfig,
    dtype: torch.dtype | None = torch.float32,
) -> dict[str, torch.Tensor]:
    """Map a ModelScope Chinese-CLIP state dict onto ``ChineseCLIPModel`` keys (exactly; see module docstring).

    With a ``ChineseCLIPVisionConfig`` the source is the visual tower only (keys of ModelScope's
    ``VisualTransformer``, with or without the ``visual.`` prefix) and the result fits ``ChineseCLIPVisionModel``;
    ``proj`` is then dropped because that class has no projection. ``dtype`` casts every tensor (ModelScope
    checkpoints may be fp16); ``None`` keeps the source dtype.

    Raises :class:`CheckpointMismatchError` naming every missing, unused or mis-shaped key.
    """
    sd = normalize_modelscope_keys(ms_sd)
    if isinstance(config, ChineseCLIPVisionConfig) and not any(k.startswith("visual.") for k in sd):
        sd = {f"visual.{k}": v for k, v in sd.items()}  # a bare VisualTransformer state dict
    expected = _expected_target_shapes(config)
    rules = mapping_rules(config)
    out: dict[str, torch.Tensor] = {}
    problems: list[str] = []

    for rule in rules:
        # The source shape this rule needs, derived from the target model's shapes.
        tgt_shapes = [expected.get(d) for d in rule.dst]
        if any(s is None for s in tgt_shapes):  # a bug in the rules, never in the checkpoint
            raise RuntimeError(f"内部错误：映射规则的目标键不存在于模型中：{rule.dst}")
        if rule.kind == "copy":
            need = tgt_shapes[0]
        elif rule.kind == "transpose":
            need = tuple(reversed(tgt_shapes[0]))
        elif rule.kind == "split3":
            need = (3 * tgt_shapes[0][0],) + tuple(tgt_shapes[0][1:])
        else:  # drop: any shape is fine, and the key may be absent
            need = None
        if rule.src not in sd:
            if rule.kind == "drop":  # unused by both models, so its absence changes nothing
                continue
            problems.append(
                f"缺少权重 {rule.src}（需要形状 {_fmt(need)}，"
                f"对应目标 {', '.join(rule.dst)}）"
            )
            continue
        t = sd[rule.src]
        if need is not None and tuple(t.shape) != need:
            problems.append(
                f"权重 {rule.src} 的形状是 {_fmt(t.shape)}，但目标 {', '.join(rule.dst)} 需要 {_fmt(need)}"
            )
            continue
        if rule.kind == "drop":
            continue
        if dtype is not None:
            t = t.to(dtype)
        if rule.kind == "copy":
            out[rule.dst[0]] = t.clone()
        elif rule.kind == "transpose":
            out[rule.dst[0]] = t.t().contiguous()
        else:
            for d, part in zip(rule.dst, t.chunk(3, dim=0)):
                out[d] = part.contiguous()

    used = {r.src for r in rules}
    for k in sorted(set(sd) - used):
        shape = _fmt(sd[k].shape) if hasattr(sd[k], "shape") else type(sd[k]).__name__
        problems.append(f"多余的权重 {k}（形状 {shape}）：目标模型中没有对应的参数")
    for k in sorted(set(expected) - set(out)):
        if not any(k in r.dst for r in rules):  # produced by no rule at all: the rules are incomplete
            problems.append(f"目标参数 {k}（形状 {_fmt(expected[k])}）没有任何来源权重")

    if problems:
        shown = "\n  - ".join(problems[:20])
        more = f"\n  ……另有 {len(problems) - 20} 处" if len(problems) > 20 else ""
        raise CheckpointMismatchError(
            f"ModelScope Chinese-CLIP 权重与目标模型结构不匹配（共 {len(problems)} 处）：\n  - {shown}{more}\n"
            f"  请确认下载的是 {llava_config.CLIP_MODEL_ID} 的完整文件，且配置（{MS_VISION_CONFIG} / {MS_TEXT_CONFIG}）与权重一致。",
            problems,
        )
    return out


# ------------------------------------------------------------------------------------------- loading


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_transformers_layout(path: str | Path) -> bool:
    """True when ``path/config.json`` declares ``model_type: chinese_clip``."""
    cfg = _read_json(Path(path) / "config.json")
    return bool(cfg) and cfg.get("model_type") == "chinese_clip"


def find_modelscope_weights(path: str | Path) -> Path | None:
    path = Path(path)
    for name in MS_WEIGHT_NAMES:
        if (path / name).is_file():
            return path / name
    return None


def is_modelscope_layout(path: str | Path) -> bool:
    """True when ``path`` holds a ModelScope Chinese-CLIP checkpoint (weights + the two config files)."""
    path = Path(path)
    return find_modelscope_weights(path) is not None and (path / MS_VISION_CONFIG).is_file()


def load_modelscope_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the checkpoint file of a ModelScope directory, without running arbitrary pickle code."""
    path = Path(path)
    file = path if path.is_file() else find_modelscope_weights(path)
    if file is None:
        raise llava_config.MissingResourceError(
            f"{path} 中找不到 Chinese-CLIP 权重文件（{' / '.join(MS_WEIGHT_NAMES)}）。\n"
            f"  解决办法：运行 `{llava_config.DOWNLOAD_CMDS['clip_path']}` 重新下载。"
        )
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file or a pickle that needs code execution
        raise CheckpointMismatchError(
            f"无法读取权重文件 {file}：{e}\n  文件可能下载不完整；请删除后运行 `{llava_config.DOWNLOAD_CMDS['clip_path']}` 重新下载。"
        ) from e
    return normalize_modelscope_keys(obj)


def _missing(path: Path, why: str) -> llava_config.MissingResourceError:
    env = llava_config.ENV_VARS["clip_path"]
    return llava_config.MissingResourceError(
        f"Chinese-CLIP 模型目录{why}：{path}\n"
        f"  解决办法：运行 `{llava_config.DOWNLOAD_CMDS['clip_path']}` 下载并转换，"
        f"或把环境变量 {env} 指向已有的 Chinese-CLIP 目录（transformers 格式或 ModelScope 格式均可）。"
    )


def convert_modelscope_checkpoint(path: str | Path, dtype: torch.dtype | None = None) -> ChineseCLIPModel:
    """Load a ModelScope-layout directory into a ``ChineseCLIPModel`` (fp32 unless ``dtype``), in eval mode."""
    path = Path(path)
    ms_sd = load_modelscope_state_dict(path)
    config = modelscope_to_hf_config(read_modelscope_config(path, ms_sd))
    hf_sd = convert_state_dict(ms_sd, config)
    model = ChineseCLIPModel(config)
    model.load_state_dict(hf_sd, strict=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def converted_dir_for(src: str | Path) -> Path:
    """Where the transformers copy of a ModelScope directory is cached (one per source path)."""
    import hashlib
    src = Path(src).expanduser().resolve()
    digest = hashlib.sha1(str(src).encode("utf-8")).hexdigest()[:10]
    return llava_config.llava_home() / "converted" / f"{src.name}-{digest}"


def load_chinese_clip(path: str | Path, dtype: torch.dtype | None = None, **from_pretrained_kwargs) -> ChineseCLIPModel:
    """Load Chinese-CLIP from a transformers directory, or convert a ModelScope directory on the fly.

    Raises ``llava_lib.config.MissingResourceError`` (naming the path and the download command) otherwise.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise _missing(path, "不存在")
    if is_transformers_layout(path):
        if dtype is not None:
            from_pretrained_kwargs.setdefault("dtype", dtype)
        return ChineseCLIPModel.from_pretrained(path, **from_pretrained_kwargs).eval()
    if is_modelscope_layout(path):
        converted = converted_dir_for(path)
        convert_modelscope_dir(path, converted)  # once; later calls say in one line that they reuse it
        if dtype is not None:
            from_pretrained_kwargs.setdefault("dtype", dtype)
        return ChineseCLIPModel.from_pretrained(converted, **from_pretrained_kwargs).eval()
    cfg = _read_json(path / "config.json")
    if cfg is not None:
        raise _missing(path, f"中的 config.json 不是 Chinese-CLIP（model_type={cfg.get('model_type')!r}）")
    raise _missing(path, f"既不是 transformers 格式（缺少 config.json），也不是 ModelScope 格式（缺少 {MS_VISION_CONFIG} 或权重文件）")


# ---------------------------------------------------------------------------------------- conversion


def build_processor(vocab_file: str | Path, image_size: int = 224):
    """ChineseCLIPProcessor matching ModelScope's inference preprocessing: bicubic resize to a square, CLIP mean/std."""
    from transformers import BertTokenizer, ChineseCLIPImageProcessorPil, ChineseCLIPProcessor

    # ``vocab=`` (a path) is what transformers 5 reads; ``vocab_file=`` would be silently ignored.
    tokenizer = BertTokenizer(vocab=str(vocab_file), do_lower_case=True, model_max_length=512)
    image_processor = ChineseCLIPImageProcessorPil(
        size={"height": image_size, "width": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=False,
        resample=3,  # PIL bicubic, as ModelScope's Resize(..., BICUBIC)
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return ChineseCLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def is_converted_dir(path: str | Path) -> bool:
    """A transformers-layout Chinese-CLIP directory with weights and a processor: what conversion writes."""
    path = Path(path)
    has_weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    has_processor = (path / "processor_config.json").is_file() or (path / "preprocessor_config.json").is_file()
    return is_transformers_layout(path) and has_weights and has_processor


def convert_modelscope_dir(src: str | Path, dst: str | Path, overwrite: bool = False) -> Path:
    """Write a transformers-layout copy of a ModelScope Chinese-CLIP directory, so later runs use ``from_pretrained``.

    ``dst`` receives ``config.json`` + ``model.safetensors`` (fp32) + the processor (tokenizer from the ModelScope
    ``vocab.txt``, CLIP image settings). Written to a temporary sibling and renamed, so an interrupted run
    never leaves a half-written ``dst``. An already converted ``dst`` is kept unless ``overwrite``.
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if is_converted_dir(dst) and not overwrite:
        print(f"已存在转换好的 Chinese-CLIP（transformers 格式）：{dst}，跳过转换。")
        return dst
    if not is_modelscope_layout(src):
        raise _missing(src, f"不是 ModelScope 格式（需要权重文件和 {MS_VISION_CONFIG}）")
    if not (src / MS_VOCAB).is_file():
        raise _missing(src, f"缺少分词词表 {MS_VOCAB}")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(
            f"目标目录 {dst} 已存在且不为空，但不是转换好的 Chinese-CLIP 目录。"
            f"请换一个目录，或确认可以覆盖后使用 overwrite=True。"
        )
    print(f"正在把 ModelScope 格式的 Chinese-CLIP 转换为 transformers 格式：{src} -> {dst}")
    model = convert_modelscope_checkpoint(src)
    processor = build_processor(src / MS_VOCAB, image_size=model.config.vision_config.image_size)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        shutil.copyfile(src / MS_VOCAB, tmp / MS_VOCAB)  # older tokenizer loaders look for vocab.txt
        (tmp / "conversion.json").write_text(
            json.dumps({"source": str(src), "source_model_id": llava_config.CLIP_MODEL_ID,
                        "converter": "llava_lib.model.convert_modelscope"}, ensure_ascii=False, indent=2),
            encoding="utf-8",
        )
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"转换完成：{dst}")
    return dst
