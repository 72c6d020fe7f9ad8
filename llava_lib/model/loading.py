"""Loading the two towers with ``from_pretrained`` — the same code for the mini world and the real models."""
from __future__ import annotations

import importlib.util
import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoTokenizer, ChineseCLIPModel, ChineseCLIPVisionModel, Qwen3ForCausalLM
from transformers.utils import logging as hf_logging

from ..config import BUILD_MINI_CMD, DOWNLOAD_CMDS, MissingResourceError, Paths, check_path, resolve
from .checkpoint import META, load_projection
from .convert_modelscope import load_chinese_clip
from .llava import LlavaStage1
from .vision import VisionTower


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 for the frozen towers on a GPU that supports it (half the memory, and the towers are never trained),
    fp32 on CPU, where bf16 matmuls are slow."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def pick_attention(device: torch.device) -> str:
    """flash-attention 2 when installed and on CUDA, else PyTorch SDPA."""
    return "flash_attention_2" if device.type == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"


def load_tokenizer(path: str | Path):
    return AutoTokenizer.from_pretrained(str(path))


class IncompleteWeightsError(MissingResourceError):
    """A checkpoint whose weights do not fill its model: transformers would put random values in the gaps."""


def _require_complete(info: dict, what: str, path, fix: str, allowed_unexpected=None) -> None:
    """Raise when ``from_pretrained`` left weights missing or misshapen, or found ones the model does not have (other
    than ``allowed_unexpected``): a model with random layers only looks like it loads."""
    problems = [f"缺少 {k}" for k in sorted(info.get("missing_keys") or ())]
    problems += [f"形状不符 {k}：文件里是 {tuple(a)}，模型要 {tuple(b)}"
                 for k, a, b in sorted(info.get("mismatched_keys") or ())]
    if allowed_unexpected is not None:
        problems += [f"多余 {k}" for k in sorted(info.get("unexpected_keys") or ()) if not allowed_unexpected.match(k)]
    if not problems:
        return
    shown = "\n".join(f"    {p}" for p in problems[:20])
    more = f"\n    ……（共 {len(problems)} 处）" if len(problems) > 20 else ""
    raise IncompleteWeightsError(
        f"{what}的权重与模型对不上：{path} 有 {len(problems)} 处问题：\n{shown}{more}\n"
        f"  缺少或形状不符的权重会被随机初始化，模型就坏了，所以在这里停下。多半是下载没完成、文件损坏，"
        f"或 config.json 与权重文件不是同一个模型。\n  解决办法：{fix}")


def load_llm(path: str | Path, device: torch.device | None = None, dtype: torch.dtype | None = None,
             attn_implementation: str | None = None) -> Qwen3ForCausalLM:
    """Qwen3 from a local directory (``Qwen/Qwen3-0.6B`` layout or the mini LM), frozen; missing weights are an
    error naming them (a tied ``lm_head.weight`` is not reported missing: transformers ties it)."""
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    attn = attn_implementation or pick_attention(device)
    model, info = Qwen3ForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation=attn,
                                                   output_loading_info=True)
    _require_complete(info, "Qwen3 模型", path, f"真实模型请重新下载（`{DOWNLOAD_CMDS['llm_path']} --force`），"
                                               f"迷你世界请重建（`{BUILD_MINI_CMD} --force`）。")
    model.to(device).requires_grad_(False).eval()
    _ensure_chat_settings(model, Path(path))
    return model


_SAID_DEFAULTS: set[str] = set()


def _ensure_chat_settings(llm, path: Path) -> None:
    """Qwen3's own generation settings when ``path`` ships none (no ``generation_config.json``, or one without
    ``do_sample``): ``ChatSession`` builds every reply's settings from ``llm.generation_config``."""
    file = path / "generation_config.json"
    if file.exists() and "do_sample" in json.loads(file.read_text(encoding="utf-8")):
        return
    from ..chat import QWEN3_GENERATION
    llm.generation_config.update(**QWEN3_GENERATION)
    if str(path) not in _SAID_DEFAULTS:
        _SAID_DEFAULTS.add(str(path))
        print(f"[llava_lib] {path} 里没有生成设置（generation_config.json 缺失或没有 do_sample），改用 Qwen3 官方的默认值："
              + "，".join(f"{k}={v}" for k, v in QWEN3_GENERATION.items()))


def load_clip(path: str | Path, device: torch.device | None = None, dtype: torch.dtype | None = None
              ) -> ChineseCLIPModel:
    """The whole Chinese-CLIP (both sides), for the matching notebook; ModelScope layout is converted."""
    device = device or default_device()
    return load_chinese_clip(path).to(device=device, dtype=dtype or default_dtype(device)).requires_grad_(False).eval()


# The text side of a whole Chinese-CLIP checkpoint (and its projections): in the file, not in the vision model.
_CLIP_TEXT_SIDE = re.compile(r"^(text_model\.|text_projection\.|visual_projection\.|logit_scale$)")


@contextmanager
def _errors_only():
    """transformers' errors only: reading the vision side of a whole CLIP, its report would list every text-side
    weight as unexpected (:func:`_require_complete` checks the same information)."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_vision_tower(path: str | Path, device: torch.device | None = None, dtype: torch.dtype | None = None,
                      feature_layer: int = -1) -> VisionTower:
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    path = Path(path)
    if (path / "config.json").exists() and '"chinese_clip' in (path / "config.json").read_text(encoding="utf-8"):
        with _errors_only():  # mismatches come back in `info` instead of an error that points at the report
            vm, info = ChineseCLIPVisionModel.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa",
                                                              output_loading_info=True, ignore_mismatched_sizes=True)
        _require_complete(info, "Chinese-CLIP 视觉塔", path,
                          f"真实模型请重新下载并转换（`{DOWNLOAD_CMDS['clip_path']} --force`），"
                          f"迷你世界请重建（`{BUILD_MINI_CMD} --force`）。", allowed_unexpected=_CLIP_TEXT_SIDE)
    else:
        vm = load_clip(path, device, dtype).vision_model
    return VisionTower(vm.to(device), feature_layer)


def build_model(paths: Paths | None = None, device: torch.device | str | None = None,
                projector_type: str = "linear", feature_layer: int = -1, dtype: torch.dtype | None = None,
                with_vision: bool = True, llm_dir: str | Path | None = None, llm_dtype: torch.dtype | None = None):
    """``(model, tokenizer)``: the towers for ``paths`` (default: the resolved profile), a fresh projection between.
    ``llm_dir`` replaces ``paths.llm_path`` (a Stage 2 model's own LLM); ``llm_dtype`` replaces ``dtype`` for the
    LLM (Stage 2 trains it in fp32 under bf16 autocast: AdamW's small updates would vanish in bf16 weights)."""
    paths = paths or resolve()
    device = torch.device(device) if device is not None else default_device()
    llm_dir = Path(llm_dir) if llm_dir is not None else check_path(paths, "llm_path")
    tokenizer = load_tokenizer(llm_dir)
    llm = load_llm(llm_dir, device, llm_dtype or dtype)
    vision = load_vision_tower(check_path(paths, "clip_path"), device, dtype, feature_layer) if with_vision else None
    model = LlavaStage1(vision, llm, projector_type)
    model.model_ids = {"clip": str(paths.clip_path), "llm": str(llm_dir)}
    print(f"[llava_lib] 设备 {device}，权重精度 {llm.dtype}，注意力实现：{llm.config._attn_implementation}")
    return model, tokenizer


def load_trained(directory: str | Path, paths: Paths | None = None, device: torch.device | str | None = None):
    """The model a checkpoint was trained for: towers from ``paths`` (a Stage 2 checkpoint brings its own LLM in
    ``llm/``), the projection's type and vision layer from its ``projection.json``, then its weights (checked to
    fit). Returns ``(model, tokenizer, meta)``."""
    meta_file = Path(directory) / META
    if not meta_file.is_file():
        raise FileNotFoundError(f"在 {directory} 中找不到 {META}：这不是一个训练好的投影层目录（应是某次运行的 final/ 或 "
                                f"checkpoints/step-N/）。")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    llm_dir = Path(directory) / "llm" if meta.get("stage", 1) == 2 else None
    if llm_dir is not None and not (llm_dir / "config.json").is_file():
        raise FileNotFoundError(f"{directory} 是 Stage 2 的检查点，但其中没有 llm/（训练结束时写入的完整 LLM）。"
                                f"请加载该运行的 final/ 目录。")
    model, tokenizer = build_model(paths, device=device, projector_type=meta["projector_type"],
                                   feature_layer=meta["feature_layer"], llm_dir=llm_dir)
    return model, tokenizer, load_projection(directory, model)


__all__ = ["build_model", "load_trained", "load_llm", "load_clip", "load_vision_tower", "load_tokenizer",
           "pick_attention", "default_device", "default_dtype", "IncompleteWeightsError", "MissingResourceError"]
