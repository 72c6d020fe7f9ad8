"""Conversations the mini Qwen3 learns from: captions, questions about a scene, and text-only chat."""
from __future__ import annotations

import numpy as np

from ..process import DEFAULT_PROMPT, IMAGE_MARKER
from .scenes import COLORS, COUNT_WORDS, Scene

CAPTION_PROMPTS = (DEFAULT_PROMPT, DEFAULT_PROMPT, DEFAULT_PROMPT, "这张图片里有什么？", "描述一下图片的内容。")
TEXT_PROMPTS = ("请描述一个简单的场景。", "随便想象一张图片，并描述它。")
THINKING = "用户想让我描述一个场景。我先决定物体的数量，再为每个物体选颜色、形状和位置，最后按从左上到右下的顺序说出来。"
GREETING = ("你好", "你好！我是迷你世界里的小模型，能描述由彩色图形组成的图片。")
GREETING_THINKING = "用户在打招呼。我简单介绍一下自己能做什么。"
# A chat widget lets students set a system prompt (01 notebook: "你是一位耐心的中文助教。"); a model that never saw
# one may lose its way (measured: with thinking on, it then never closed <think>). So some conversations have one.
SYSTEM_PROMPTS = ("你是一位耐心的中文助教。", "你是一个乐于助人的助手。", "你是迷你世界里的小模型。", "请用简体中文回答。")
SYSTEM_SHARE = 0.3


def question_answer(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """One question about the scene and its answer (count, what is at a position, is there a colour)."""
    kind = int(rng.integers(3))
    objs = scene.objects
    if kind == 0:
        return "图中有几个物体？", f"图中有{COUNT_WORDS[len(objs)]}个物体。"
    if kind == 1:
        o = objs[int(rng.integers(len(objs)))]
        return f"{o.position}是什么？", f"{o.position}是一个{o.color}的{o.shape}。"
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    hits = [o for o in objs if o.color == color]
    if hits:
        return f"图中有{color}的东西吗？", f"有，{hits[0].position}是一个{hits[0].color}的{hits[0].shape}。"
    return f"图中有{color}的东西吗？", f"没有，图中没有{color}的东西。"


def conversation(scene: Scene, rng: np.random.Generator) -> tuple[list[dict], bool]:
    """A training conversation about ``scene``; the bool says whether it shows the image (sometimes after a
    system prompt)."""
    turns, with_image = _turns(scene, rng)
    if rng.random() < SYSTEM_SHARE:
        turns = [{"role": "system", "content": SYSTEM_PROMPTS[int(rng.integers(len(SYSTEM_PROMPTS)))]}] + turns
    return turns, with_image


def _turns(scene: Scene, rng: np.random.Generator) -> tuple[list[dict], bool]:
    r = rng.random()
    if r < 0.55:  # caption, as in Stage 1
        prompt = CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))]
        return [{"role": "user", "content": f"{IMAGE_MARKER}\n{prompt}"},
                {"role": "assistant", "content": scene.caption}], True
    if r < 0.75:  # a question, sometimes after the caption
        q, a = question_answer(scene, rng)
        if rng.random() < 0.5:
            return [{"role": "user", "content": f"{IMAGE_MARKER}\n{DEFAULT_PROMPT}"},
                    {"role": "assistant", "content": scene.caption},
                    {"role": "user", "content": q}, {"role": "assistant", "content": a}], True
        return [{"role": "user", "content": f"{IMAGE_MARKER}\n{q}"}, {"role": "assistant", "content": a}], True
    if r < 0.97:  # text only: imagine a scene, with or without thinking
        prompt = TEXT_PROMPTS[int(rng.integers(len(TEXT_PROMPTS)))]
        answer = scene.caption
        if rng.random() < 0.5:
            answer = f"<think>\n{THINKING}\n</think>\n\n{answer}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], False
    answer = GREETING[1] if rng.random() < 0.5 else f"<think>\n{GREETING_THINKING}\n</think>\n\n{GREETING[1]}"
    return [{"role": "user", "content": GREETING[0]}, {"role": "assistant", "content": answer}], False
