"""Loading the two towers with ``from_pretrained`` — the same code for the mini world and the real models."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from transformers import logging as hf_logging
from transformers import AutoTokenizer, ChineseCLIPModel, ChineseCLIPVisionModel, Qwen3ForCausalLM

from ..config import MissingResourceError, Paths, check_path, resolve
from .llava import LlavaStage1
from .vision import VisionTower


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 for the frozen towers on a GPU that supports it, fp32 on CPU (DESIGN.md, decision 5)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def pick_attention(device: torch.device) -> str:
    """flash-attention 2 when installed and on CUDA, else PyTorch SDPA."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(path: str | Path):
    return AutoTokenizer.from_pretrained(str(path))


def load_llm(path: str | Path, device: torch.device | None = None, dtype: torch.dtype | None = None,
             attn_implementation: str | None = None) -> Qwen3ForCausalLM:
    """Qwen3 from a local directory (``Qwen/Qwen3-0.6B`` layout or the mini LM), frozen."""
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    attn = attn_implementation or pick_attention(device)
    model = Qwen3ForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation=attn)
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
    from .convert_modelscope import load_chinese_clip  # ModelScope layout support lives there
    model = load_chinese_clip(path)
    return model.to(device=device, dtype=dtype or default_dtype(device)).requires_grad_(False).eval()


def load_vision_tower(path: str | Path, device: torch.device | None = None, dtype: torch.dtype | None = None,
                      feature_layer: int = -1) -> VisionTower:
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    path = Path(path)
    if (path / "config.json").exists() and '"chinese_clip' in (path / "config.json").read_text(encoding="utf-8"):
        # Loading only the vision side of a full CLIP checkpoint: the text weights are skipped on purpose, so
        # transformers' "unexpected keys" report is noise here.
        previous = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            vm = ChineseCLIPVisionModel.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
        finally:
            hf_logging.set_verbosity(previous)
    else:
        vm = load_clip(path, device, dtype).vision_model
    return VisionTower(vm.to(device), feature_layer)


def build_model(paths: Paths | None = None, device: torch.device | str | None = None,
                projector_type: str = "linear", feature_layer: int = -1, dtype: torch.dtype | None = None,
                with_vision: bool = True):
    """Load the towers for ``paths`` (default: the resolved profile) and put a fresh projection between them.

    Returns ``(model, tokenizer)``. Prints which attention backend was chosen, so the user sees it.
    """
    paths = paths or resolve()
    device = torch.device(device) if device is not None else default_device()
    llm_dir = check_path(paths, "llm_path")
    tokenizer = load_tokenizer(llm_dir)
    llm = load_llm(llm_dir, device, dtype)
    vision = None
    if with_vision:
        vision = load_vision_tower(check_path(paths, "clip_path"), device, dtype, feature_layer)
    model = LlavaStage1(vision, llm, projector_type)
    model.model_ids = {"clip": str(paths.clip_path), "llm": str(llm_dir)}
    print(f"[llava_lib] 设备 {device}，权重精度 {llm.dtype}，注意力实现：{llm.config._attn_implementation}")
    return model, tokenizer


__all__ = ["build_model", "load_llm", "load_clip", "load_vision_tower", "load_tokenizer", "pick_attention",
           "default_device", "default_dtype", "MissingResourceError"]
