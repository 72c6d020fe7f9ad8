"""From (image, conversation) to tensors: the chat text with its image block, token ids, labels, pixels.

Conversations are lists of ``{"role": ..., "content": ...}`` as in transformers' chat templates. The image (at
most one, in the first user turn) is marked by :data:`IMAGE_MARKER` inside that turn's text; rendering replaces
the marker with ``<|vision_start|>`` + N x ``<|image_pad|>`` + ``<|vision_end|>``. These three tokens are already
in Qwen3's vocabulary, so the frozen LM's embedding table is not resized and stays exactly as downloaded.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

IMAGE_MARKER = "<image>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
IMAGE_PAD_ID = 151655
IGNORE_INDEX = -100
DEFAULT_PROMPT = "请描述这张图片。"
# Stage 1 asks for the caption in many words, as the original course did (a random instruction as Q, the caption
# as A), so the projection does not learn one sentence; evaluation always uses DEFAULT_PROMPT.
CAPTION_INSTRUCTIONS = (DEFAULT_PROMPT, "这张图片里有什么？", "描述一下图片的内容。", "请简要介绍这张图片。",
                        "图中是什么场景？", "用一段话描述这幅图像。", "请说说这张照片里的内容。", "看图说话：这张图展示了什么？",
                        "请详细描述图片中的内容。", "这幅图片描绘了什么？")

# CLIP's normalisation (Chinese-CLIP uses OpenAI CLIP's statistics); the one definition in the package.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224


def num_image_tokens(image_size: int = IMAGE_SIZE, patch_size: int = 16) -> int:
    """CLS + one token per patch: 1 + (224/16)^2 = 197 for ViT-B/16."""
    return 1 + (image_size // patch_size) ** 2


# ----------------------------------------------------------------------------------------------- images
def resize_square(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """The whole image squashed to ``size`` x ``size`` (bicubic), RGB: the one geometry of the vision tower, for
    training, chat and matching alike. Chinese-CLIP was pretrained on images resized this way (no crop, aspect ratio
    changed), and a centre crop of a 3:2 SA-1B photo would drop a third of it, often the part the caption talks about.
    """
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return image


_MEAN = np.asarray(CLIP_MEAN, dtype=np.float32)[:, None, None]
_STD = np.asarray(CLIP_STD, dtype=np.float32)[:, None, None]


def clip_transform(image: Image.Image, size: int = IMAGE_SIZE) -> torch.Tensor:
    """The CLIP preprocessing: ``[3, size, size]`` float32, normalised with CLIP's mean/std."""
    arr = np.asarray(resize_square(image, size), dtype=np.float32).transpose(2, 0, 1) / 255.0
    return torch.from_numpy(np.ascontiguousarray((arr - _MEAN) / _STD))


# ----------------------------------------------------------------------------------------------- text
def caption_conversation(caption: str | None, prompt: str = DEFAULT_PROMPT) -> list[dict]:
    """The Stage-1 training conversation: the image and a fixed instruction, answered by the caption."""
    conv = [{"role": "user", "content": f"{IMAGE_MARKER}\n{prompt}"}]
    if caption is not None:
        conv.append({"role": "assistant", "content": caption})
    return conv


def has_image(messages: Sequence[dict]) -> bool:
    return any(IMAGE_MARKER in m.get("content", "") for m in messages if m["role"] == "user")


def image_block(n_tokens: int) -> str:
    return VISION_START + IMAGE_PAD * n_tokens + VISION_END


def _expand_image(messages: Sequence[dict], n_tokens: int) -> list[dict]:
    """Replace the image marker of the first user turn by the image block; later markers are an error."""
    out, seen = [], False
    for m in messages:
        content = m.get("content", "")
        if IMAGE_MARKER in content:
            if m["role"] != "user" or seen or content.count(IMAGE_MARKER) > 1:
                raise ValueError("对话里只能有一张图片，而且必须放在第一个用户轮次里（<image> 标记）。")
            seen = True
            content = content.replace(IMAGE_MARKER, image_block(n_tokens))
        out.append({**m, "content": content})
    return out


def render_chat(tokenizer, messages: Sequence[dict], n_image_tokens: int, add_generation_prompt: bool = False,
                enable_thinking: bool = False) -> str:
    """The exact text the LLM sees, through the tokenizer's own chat template."""
    return tokenizer.apply_chat_template(
        _expand_image(messages, n_image_tokens), tokenize=False,
        add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def assistant_label_mask(ids: Sequence[int], tokenizer, learn_thinking: bool = False) -> list[bool]:
    """True at the tokens that carry loss: each assistant turn's content and its closing ``<|im_end|>``. The turn
    header (``<|im_start|>assistant\\n``) and the think block are not learned: Stage 1 teaches the answer, and the
    template writes the (empty) think block itself. ``learn_thinking=True`` (to pretrain the mini LM) also learns a
    think block that has content."""
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    think, end_think = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    header = _ids(tokenizer, "assistant\n")
    mask = [False] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i] == im_start and list(ids[i + 1:i + 1 + len(header)]) == header:
            start = i + 1 + len(header)
            if start < len(ids) and ids[start] == think:
                think_at, close = start, start
                while close < len(ids) and ids[close] != end_think:
                    close += 1
                start = close + 1
                while start < len(ids) and ids[start] != im_end and not tokenizer.decode([ids[start]]).strip():
                    start += 1  # the blank lines after </think>
                if learn_thinking and tokenizer.decode(list(ids[think_at + 1:close])).strip():
                    start = think_at
            end = start
            while end < len(ids) and ids[end] != im_end:
                end += 1
            for j in range(start, min(end + 1, len(ids))):
                mask[j] = True
            i = end
        i += 1
    return mask


def encode_conversation(tokenizer, messages: Sequence[dict], n_image_tokens: int, max_text_tokens: int | None = None,
                        add_generation_prompt: bool = False, enable_thinking: bool = False,
                        learn_thinking: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and labels (``-100`` where no loss) of one conversation. ``max_text_tokens`` bounds the tokens
    outside the image block (the course's "text length 128"): the image block is never cut, the end of the text is."""
    text = render_chat(tokenizer, messages, n_image_tokens, add_generation_prompt, enable_thinking)
    ids = _ids(tokenizer, text)
    mask = assistant_label_mask(ids, tokenizer, learn_thinking)
    if max_text_tokens is not None:
        n_img = n_image_tokens + 2 if has_image(messages) else 0
        ids, mask = ids[:max_text_tokens + n_img], mask[:max_text_tokens + n_img]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    return ids, labels


def collate(tokenizer, samples: Sequence[dict], n_image_tokens: int, max_text_tokens: int | None = None) -> dict:
    """Samples -> one right-padded training batch. Each sample has ``pixel_values`` (``[3,H,W]``, or None for a
    text-only sample) and either ``messages`` or a ``caption`` (turned into :func:`caption_conversation`). Returns
    ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]`` and ``pixel_values`` ``[N_img, 3, H, W]`` for the samples
    that have an image, in order (or None)."""
    seqs, pixels = [], []
    for s in samples:
        messages = s.get("messages") or caption_conversation(s["caption"])
        if (s.get("pixel_values") is not None) != has_image(messages):
            raise ValueError("样本的图片与对话中的 <image> 标记不一致：有图片就必须有标记，反之亦然。")
        seqs.append(encode_conversation(tokenizer, messages, n_image_tokens, max_text_tokens))
        if s.get("pixel_values") is not None:
            pixels.append(s["pixel_values"])
    T = max(len(ids) for ids, _ in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, (ids, lab) in enumerate(seqs):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        labels[b, :len(lab)] = torch.tensor(lab)
        attention_mask[b, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "pixel_values": torch.stack(pixels) if pixels else None}
