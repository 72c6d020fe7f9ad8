"""The mini world's Stage 2 corpus: Chinese questions and answers about scenes, in CogVLM-SFT-311K's layout.

The mini LM learned captions and three question forms (count, "what is at ...", "is there a ... colour") while it
was built. These conversations ask in forms it never saw, with short answers: the colour or the shape at a
position, whether anything is at a position, how many shapes, whether a shape is there, and multi-turn
follow-ups that say 它 ("it") for the object of the previous turn. A Stage-1-only model answers them with caption-like sentences; Stage 2 teaches
the new forms. The scenes are drawn with their own seed, apart from the Stage 1 and LM scenes. Every token of
these texts is one the mini LM already uses: its other embedding rows are exactly zero, and the mini profile's
Stage 2 keeps the embedding table frozen, so the questions keep to a small vocabulary.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..data.conversations import LABELS_DIR, SFT_SUBSETS, TEXT_EVAL_FILE, TEXT_TRAIN_FILE
from .corpus import _turns
from .scenes import COUNT_WORDS, POSITIONS, SHAPES, Scene, make_scenes, render

SEED_OFFSET = 7  # spec.seed + 7: no other part of the build draws scenes with this seed
N_SINGLE, N_MULTI, N_TEXT_TRAIN, N_TEXT_EVAL = 2000, 1000, 600, 200
# How often each kind of single_qa comes, in its order: colour / shape at a position, anything at a position,
# how many, is there a shape. "Where is the red circle?" (answer: a position) is not among them: after 1,000 steps
# the 3-layer mini LM still answered it at chance (5 of 16), while every kind here was 85-100% right.
KIND_SHARES = (0.25, 0.25, 0.2, 0.15, 0.15)


def _at(scene: Scene, cell: int):
    return next((o for o in scene.objects if o.cell == cell), None)


def single_qa(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """One question in a form the mini LM has not seen, and its short answer."""
    kind = int(rng.choice(len(KIND_SHARES), p=KIND_SHARES))
    objs = scene.objects
    if kind in (0, 1):  # the colour / shape at a position (possibly empty)
        cell = int(rng.integers(len(POSITIONS)))
        o, pos = _at(scene, cell), POSITIONS[cell]
        what = "颜色" if kind == 0 else "形状"
        if o is None:
            return f"{pos}的物体是什么{what}？", f"{pos}没有物体。"
        return f"{pos}的物体是什么{what}？", f"{o.color if kind == 0 else o.shape}。"
    if kind == 2:  # is there anything at a position
        cell = int(rng.integers(len(POSITIONS)))
        return f"{POSITIONS[cell]}有物体吗？", "有。" if _at(scene, cell) is not None else "没有。"
    if kind == 3:
        return "图中有几个图形？", f"{COUNT_WORDS[len(objs)]}个。"
    present = [o.shape for o in objs]
    shape = present[int(rng.integers(len(present)))] if rng.random() < 0.5 else SHAPES[int(rng.integers(len(SHAPES)))]
    return f"图中有{shape}吗？", "有。" if shape in present else "没有。"


def multi_turn(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Two or three turns: the colour (or shape) at a position, then 它 ("it") asks for the other one, sometimes
    followed by a question about the whole image."""
    o = scene.objects[int(rng.integers(len(scene.objects)))]
    if rng.random() < 0.5:
        turns = [(f"{o.position}的物体是什么颜色？", f"{o.color}。"), ("它是什么形状？", f"{o.shape}。")]
    else:
        turns = [(f"{o.position}的物体是什么形状？", f"{o.shape}。"), ("它是什么颜色？", f"{o.color}。")]
    if rng.random() < 0.5:
        q, a = single_qa(scene, rng)
        turns.append((q, a))
    return turns


def as_messages(pairs: list[tuple[str, str]]) -> list[dict]:
    out = []
    for q, a in pairs:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return out


def write_corpus(root: Path, seed: int, n_single: int = N_SINGLE, n_multi: int = N_MULTI,
                 n_text_train: int = N_TEXT_TRAIN, n_text_eval: int = N_TEXT_EVAL) -> Path:
    """Write ``root/<subset>/images/NNNNNNNN.jpg`` + ``labels_zh/NNNNNNNN.json`` and the two text-only files.

    Written into a temp folder and renamed, so a half-written corpus is never taken for a finished one.
    """
    import shutil
    root = Path(root)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed + SEED_OFFSET)
    scenes = make_scenes(n_single + n_multi, seed + SEED_OFFSET)
    for subset, part in zip(SFT_SUBSETS, (scenes[:n_single], scenes[n_single:])):
        (tmp / subset / "images").mkdir(parents=True)
        (tmp / subset / LABELS_DIR).mkdir(parents=True)
        for i, scene in enumerate(part):
            pairs = [single_qa(scene, rng)] if subset == SFT_SUBSETS[0] else multi_turn(scene, rng)
            stem = f"{i:08d}"
            render(scene).save(tmp / subset / "images" / f"{stem}.jpg", quality=95)
            (tmp / subset / LABELS_DIR / f"{stem}.json").write_text(
                json.dumps({"conversations": as_messages(pairs)}, ensure_ascii=False), encoding="utf-8")
    # What the LM could do before Stage 2 without an image (imagine a scene, greet): some of it is mixed into
    # training, other conversations measure whether Stage 2 kept it.
    for name, n, offset in ((TEXT_TRAIN_FILE, n_text_train, 3), (TEXT_EVAL_FILE, n_text_eval, 1)):
        text_rng = np.random.default_rng(seed + SEED_OFFSET + offset)
        lines = []
        for scene in make_scenes(8 * n, seed + SEED_OFFSET + offset):  # about a quarter are text-only
            turns, with_image = _turns(scene, text_rng)
            if not with_image:
                lines.append(json.dumps({"conversations": turns}, ensure_ascii=False))
            if len(lines) == n:
                break
        (tmp / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


_PUNCT = re.compile(r"[\s。，,.！!？?]")


def answer_is_correct(generated: str, reference: str) -> bool:
    """The answer matches the reference, ignoring spaces and punctuation (``红色。`` == ``红色``)."""
    return _PUNCT.sub("", generated) == _PUNCT.sub("", reference)
