"""A trained run as a plain transformers LLaVA (``LlavaForConditionalGeneration`` + ``LlavaProcessor``), loadable
without ``llava_lib`` by tools made for llava-hf models (lmms-eval, vLLM ...) and computing exactly what the project
computes; docs/EVALUATION.md describes the mapping (all 197 tokens of ``feature_layer`` before the post-layernorm, a
``linear`` projector as ``linear_1`` + identity, the image block where training put it)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import config as cfg_mod
from .model.checkpoint import META, RUN_INFO, find_projection, run_config, run_files
from .process import CLIP_MEAN, CLIP_STD, IMAGE_MARKER, IMAGE_PAD, IMAGE_PAD_ID, VISION_END, VISION_START

_BLOCK = VISION_START + IMAGE_PAD + VISION_END  # the processor repeats IMAGE_PAD once per image token

# Put before the LLM's own template: every message's content becomes the string training rendered (a llava-hf
# part list, or a string with ``<image>`` as lmms-eval writes it); the LLM's template then runs unchanged.
# Thinking is off unless asked for, as in training and in ``llava_lib.chat``.
TEMPLATE_PRELUDE = (
    "{%- set llava = namespace(messages=[]) -%}\n{%- for m in messages -%}\n"
    "{%- if m.content is string -%}\n"
    "{%- set text = m.content.replace('" + IMAGE_MARKER + "', '" + _BLOCK + "') if m.role == 'user' "
    "else m.content -%}\n"
    "{%- elif m.content is none -%}{%- set text = m.content -%}\n{%- else -%}\n"
    "{%- set parts = namespace(text='') -%}\n{%- for p in m.content -%}\n"
    "{%- if p.type == 'image' -%}\n"
    "{%- set parts.text = parts.text + '" + _BLOCK + "' + ('' if loop.last else '\\n') -%}\n"
    "{%- elif p.type == 'text' -%}{%- set parts.text = parts.text + p.text -%}{%- endif -%}\n"
    "{%- endfor -%}\n{%- set text = parts.text -%}\n{%- endif -%}\n"
    "{%- set llava.messages = llava.messages + [dict(m, content=text)] -%}\n{%- endfor -%}\n"
    "{%- set messages = llava.messages -%}\n"
    "{%- if enable_thinking is not defined -%}{%- set enable_thinking = false -%}{%- endif -%}\n")


class ExportError(ValueError):
    """A folder that cannot be exported; the message says what to pass instead."""


def find_checkpoint(path) -> Path:
    """The folder with ``projection.json``: ``path`` itself or its ``final/``."""
    found = find_projection(path)
    if found is None:
        raise ExportError(f"在 {path} 中找不到 {META}：请传入训练输出目录、其中的 final/ 或 checkpoints/step-N/。")
    return found


def to_llava(model, dtype: torch.dtype = torch.float32):
    """An ``LlavaForConditionalGeneration`` holding exactly the weights of ``model`` (a ``LlavaStage1``)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    vm, llm = model.vision.vision_model, model.llm
    w = {k: v.detach().float().cpu() for k, v in model.projector.state_dict().items()}
    if model.projector_type == "linear":
        d = w["weight"].shape[0]
        act, proj = "linear", {"linear_1.weight": w["weight"], "linear_1.bias": w["bias"],
                               "linear_2.weight": torch.eye(d), "linear_2.bias": torch.zeros(d)}
    else:  # nn.Sequential(Linear, GELU, Linear)
        act, proj = "gelu", {"linear_1.weight": w["0.weight"], "linear_1.bias": w["0.bias"],
                             "linear_2.weight": w["2.weight"], "linear_2.bias": w["2.bias"]}
    config = LlavaConfig(vision_config=vm.config.to_dict(), text_config=llm.config.to_dict(),
                         image_token_id=IMAGE_PAD_ID, image_seq_length=model.num_image_tokens,
                         projector_hidden_act=act, vision_feature_select_strategy="full",
                         vision_feature_layer=model.vision.feature_layer, multimodal_projector_bias=True,
                         tie_word_embeddings=bool(llm.config.tie_word_embeddings))
    hf = LlavaForConditionalGeneration(config)
    state = {f"model.vision_tower.{k}": v for k, v in vm.state_dict().items()}
    state |= {f"model.language_model.{k}": v for k, v in llm.model.state_dict().items()}
    state |= {f"model.multi_modal_projector.{k}": v for k, v in proj.items()}
    state["lm_head.weight"] = llm.lm_head.weight
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if missing or unexpected:  # anything not loaded would stay random
        raise ExportError(f"导出时权重没有对上：缺少 {missing[:5]}，多余 {unexpected[:5]}。")
    return hf.to(dtype).eval()


def build_processor(tokenizer, image_size: int, patch_size: int):
    """Squash to ``image_size`` square (bicubic), CLIP mean/std; ``<|image_pad|>`` expanded to 1 + patches."""
    from transformers import ChineseCLIPImageProcessorPil, LlavaProcessor
    square = {"height": image_size, "width": image_size}
    images = ChineseCLIPImageProcessorPil(size=square, crop_size=square, do_center_crop=False, resample=3,
                                          image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    tokenizer.chat_template = TEMPLATE_PRELUDE + tokenizer.chat_template  # also for tokenizer.apply_chat_template
    return LlavaProcessor(images, tokenizer, patch_size=patch_size, vision_feature_select_strategy="full",
                          image_token=IMAGE_PAD, num_additional_image_tokens=1, chat_template=tokenizer.chat_template)


def export(checkpoint, out, profile: str | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write the llava-hf folder of ``checkpoint`` (a run folder, its ``final/`` or a ``step-N/``) into ``out``."""
    from .chat import chat_generation_config
    from .model.loading import load_trained
    ckpt, out = find_checkpoint(checkpoint), Path(out).expanduser()
    train_cfg, metrics = run_files(ckpt)
    model, tokenizer, meta = load_trained(ckpt, run_config(ckpt, profile).paths, device="cpu")
    hf = to_llava(model, dtype)
    hf.generation_config = chat_generation_config(model.llm, enable_thinking=False)  # the chat's defaults
    hf.save_pretrained(str(out))
    vcfg = model.vision.vision_model.config
    build_processor(tokenizer, vcfg.image_size, vcfg.patch_size).save_pretrained(str(out))
    info = {"stage": meta.get("stage", 1), "step": meta.get("step"), "projector_type": meta["projector_type"],
            "feature_layer": meta["feature_layer"], "source": str(ckpt.resolve()), "train_config": train_cfg,
            "metrics": metrics}
    (out / RUN_INFO).write_text(json.dumps(info, ensure_ascii=False, indent=2), encoding="utf-8")
    (out / "README.md").write_text(model_card(info, hf.config), encoding="utf-8")
    return out


def model_card(info: dict, config) -> str:
    """The export's README.md (Chinese): what was trained on what, how to load it."""
    v, t, cfg = config.vision_config, config.text_config, info["train_config"]
    stage = ("Stage 1：只训练投影层，视觉塔与 LLM 冻结" if info["stage"] == 1 else
             f"Stage 2：投影层与 LLM{'（LoRA，已合并）' if cfg.get('lora') else ''}都经过训练，视觉塔冻结")
    data = ({1: "迷你世界的合成图形与描述", 2: "迷你世界的合成看图问答"} if cfg.get("profile") == "mini" else
            {1: "SA1B-Dense-Caption 的图文描述", 2: "CogVLM-SFT-311K 的中文看图对话"})[info["stage"]]
    shown = {k: round(v, 4) for k, v in info["metrics"].items() if "accuracy" in k or k.startswith("eval_loss")}
    return "\n".join([
        "# LLaVA（Chinese-CLIP + Qwen3），由 `python -m llava_lib.export` 导出", "",
        f"- 训练：{stage}；配置档 {cfg.get('profile', '?')}，{info['step']} 步，数据：{data}",
        f"- 视觉塔：Chinese-CLIP ViT（{v.num_hidden_layers} 层，宽 {v.hidden_size}），取第 {info['feature_layer']} 层"
        f"（-1 为最后一层）的全部 {config.image_seq_length} 个词元（含 CLS），不经过 post_layernorm",
        f"- 投影层：`{info['projector_type']}`" + ("（导出为 linear_1 + 恒等激活 + 单位矩阵 linear_2，计算结果不变）"
                                              if info["projector_type"] == "linear" else "（Linear → GELU → Linear）"),
        f"- 语言模型：Qwen3（{t.num_hidden_layers} 层，宽 {t.hidden_size}），词表未扩充，图片占位词元是 `{IMAGE_PAD}`",
        f"- 训练时的指标（metrics.json）：{json.dumps(shown, ensure_ascii=False) if shown else '无'}",
        f"- 源检查点：`{info['source']}`", "",
        "图片整体缩放（不裁剪）到 224x224（双三次插值），再按 CLIP 的均值/方差归一化；对话模板把图片块放在第一个用户"
        "轮次的文字之前，默认关闭思考（与训练一致）。装了 torchvision 时 AutoProcessor 默认用 torchvision 缩放，"
        "非 224x224 的图片与训练时略有差别；要完全一致，加 `backend=\"pil\"`。", "",
        "```python", "from PIL import Image",
        "from transformers import AutoProcessor, LlavaForConditionalGeneration", "",
        "model = LlavaForConditionalGeneration.from_pretrained(\"导出目录\")",
        "processor = AutoProcessor.from_pretrained(\"导出目录\")",
        "messages = [{\"role\": \"user\", \"content\": [",
        "    {\"type\": \"image\"}, {\"type\": \"text\", \"text\": \"请描述这张图片。\"}]}]",
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)",
        "inputs = processor(images=Image.open(\"图片.jpg\"), text=prompt, return_tensors=\"pt\")",
        "out = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
        "print(processor.decode(out[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))", "```", "",
        "Stage 1 的模型只学过描述图片，没有学过问答和选择题：在 MMBench 这类评测上接近随机是正常的。"
        if info["stage"] == 1 else "评估：`python -m llava_lib.evaluate --checkpoint 导出目录`，或 lmms-eval。",
        ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_lib.export", description="把训练好的运行导出为 transformers 的 "
                                "LlavaForConditionalGeneration 目录（不依赖 llava_lib 即可加载）。")
    p.add_argument("--checkpoint", required=True, help="训练输出目录、其中的 final/ 或 checkpoints/step-N/")
    p.add_argument("--out", required=True, help="导出目录")
    p.add_argument("--profile", choices=cfg_mod.PROFILES, help="运行目录里没有 config.json 时用哪个配置档找模型")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="保存权重的精度（默认 float32）")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.profile, getattr(torch, args.dtype))
    except (ExportError, cfg_mod.MissingResourceError, FileNotFoundError) as e:
        print(f"错误：{e}", file=sys.stderr)
        return 2
    print(f"[export] 已导出到 {out}：LlavaForConditionalGeneration.from_pretrained({str(out)!r})；"
          f"AutoProcessor.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
