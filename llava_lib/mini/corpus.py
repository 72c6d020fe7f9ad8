"""Conversations the mini Qwen3 learns from: captions, questions about a scene, and text-only chat."""
import numpy as np

from ..process import DEFAULT_PROMPT, IMAGE_MARKER
from .scenes import COLORS, COUNT_WORDS, Scene

CAPTION_PROMPTS = (DEFAULT_PROMPT, DEFAULT_PROMPT, DEFAULT_PROMPT, "这张图片里有什么？", "描述一下图片的内容。")
TEXT_PROMPTS = ("请描述一个简单的场景。", "随便想象一张图片，并描述它。")
THINKING = "用户想让我描述一个场景。我先决定物体的数量，再为每个物体选颜色、形状和位置，最后按从左上到右下的顺序说出来。"
GREETING = ("你好", "你好！我是迷你世界里的小模型，能描述由彩色图形组成的图片。")
GREETING_THINKING = "用户在打招呼。我简单介绍一下自己能做什么。"
# Students can set a system prompt in the chat widget; a model that never saw one may lose its way (with thinking
# on, it then never closed <think>). So some conversations have one.
SYSTEM_PROMPTS = ("你是一位耐心的中文助教。", "你是一个乐于助人的助手。", "你是迷你世界里的小模型。", "请用简体中文回答。")
SYSTEM_SHARE = 0.3


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def question_answer(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """One question about the scene and its answer (count, what is at a position, is there a colour)."""
    kind = int(rng.integers(3))
    if kind == 0:
        return "图中有几个物体？", f"图中有{COUNT_WORDS[len(scene.objects)]}个物体。"
    if kind == 1:
        o = _pick(rng, scene.objects)
        return f"{o.position}是什么？", f"{o.position}是一个{o.color}的{o.shape}。"
    color = _pick(rng, list(COLORS))
    hit = next((o for o in scene.objects if o.color == color), None)
    if hit:
        return f"图中有{color}的东西吗？", f"有，{hit.position}是一个{hit.color}的{hit.shape}。"
    return f"图中有{color}的东西吗？", f"没有，图中没有{color}的东西。"


def conversation(scene: Scene, rng: np.random.Generator) -> tuple[list[dict], bool]:
    """A training conversation about ``scene`` (sometimes after a system prompt); the bool: it shows the image."""
    turns, with_image = _turns(scene, rng)
    if rng.random() < SYSTEM_SHARE:
        turns = [{"role": "system", "content": _pick(rng, SYSTEM_PROMPTS)}] + turns
    return turns, with_image


def _turns(scene: Scene, rng: np.random.Generator) -> tuple[list[dict], bool]:
    def chat(*texts):
        return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)]

    r = rng.random()
    if r < 0.55:  # caption, as in Stage 1
        return chat(f"{IMAGE_MARKER}\n{_pick(rng, CAPTION_PROMPTS)}", scene.caption), True
    if r < 0.75:  # a question, sometimes after the caption
        q, a = question_answer(scene, rng)
        if rng.random() < 0.5:
            return chat(f"{IMAGE_MARKER}\n{DEFAULT_PROMPT}", scene.caption, q, a), True
        return chat(f"{IMAGE_MARKER}\n{q}", a), True
    if r < 0.97:  # text only: imagine a scene, with or without thinking
        prompt = _pick(rng, TEXT_PROMPTS)
        answer = f"<think>\n{THINKING}\n</think>\n\n{scene.caption}" if rng.random() < 0.5 else scene.caption
        return chat(prompt, answer), False
    answer = GREETING[1] if rng.random() < 0.5 else f"<think>\n{GREETING_THINKING}\n</think>\n\n{GREETING[1]}"
    return chat(GREETING[0], answer), False
