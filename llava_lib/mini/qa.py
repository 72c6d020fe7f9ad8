"""The mini world's Stage 2 corpus (CogVLM-SFT-311K's layout): questions in forms the mini LM never saw while it was
built (the colour or shape at a position, is anything there, how many, is a shape there, follow-ups about 它 "it")
with short answers, which a Stage-1-only model answers with caption-like sentences. Every token is one the mini LM
already uses (its other embedding rows are zero and the mini Stage 2 keeps them frozen)."""
import json
import re
import shutil
from pathlib import Path

import numpy as np

from ..data.conversations import LABELS_DIR, SFT_SUBSETS, TEXT_EVAL_FILE, TEXT_TRAIN_FILE
from .corpus import _turns
from .scenes import COUNT_WORDS, POSITIONS, SHAPES, Scene, make_scenes, render

SEED_OFFSET = 7  # spec.seed + 7: no other part of the build draws scenes with this seed
N_SINGLE, N_MULTI, N_TEXT_TRAIN, N_TEXT_EVAL = 2000, 1000, 600, 200
# Shares of colour / shape at a position, anything at a position, how many, is there a shape. "Where is the red
# circle?" is left out: after 1,000 steps the 3-layer mini LM still answered it at chance.
KIND_SHARES = (0.25, 0.25, 0.2, 0.15, 0.15)


def single_qa(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """One question in a form the mini LM has not seen, and its short answer."""
    kind = int(rng.choice(len(KIND_SHARES), p=KIND_SHARES))
    objs = scene.objects
    if kind < 3:  # about a position (possibly empty)
        cell = int(rng.integers(len(POSITIONS)))
        o, pos = next((o for o in objs if o.cell == cell), None), POSITIONS[cell]
        if kind == 2:
            return f"{pos}有物体吗？", "有。" if o is not None else "没有。"
        what = "颜色" if kind == 0 else "形状"
        return f"{pos}的物体是什么{what}？", f"{pos}没有物体。" if o is None else f"{o.color if kind == 0 else o.shape}。"
    if kind == 3:
        return "图中有几个图形？", f"{COUNT_WORDS[len(objs)]}个。"
    present = [o.shape for o in objs]
    shape = present[int(rng.integers(len(present)))] if rng.random() < 0.5 else SHAPES[int(rng.integers(len(SHAPES)))]
    return f"图中有{shape}吗？", "有。" if shape in present else "没有。"


def multi_turn(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """The colour (or shape) at a position, then 它 ("it") asks for the other; sometimes a third question."""
    o = scene.objects[int(rng.integers(len(scene.objects)))]
    color, shape = ("颜色", f"{o.color}。"), ("形状", f"{o.shape}。")
    first, second = (color, shape) if rng.random() < 0.5 else (shape, color)
    turns = [(f"{o.position}的物体是什么{first[0]}？", first[1]), (f"它是什么{second[0]}？", second[1])]
    if rng.random() < 0.5:
        turns.append(single_qa(scene, rng))
    return turns


def write_corpus(root: Path, seed: int) -> Path:
    """Write ``root/<subset>/images/NNNNNNNN.jpg`` + ``labels_zh/NNNNNNNN.json`` and the two text-only files,
    into a temp folder renamed at the end (a half-written corpus is never taken for a finished one)."""
    root = Path(root)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed + SEED_OFFSET)
    scenes = make_scenes(N_SINGLE + N_MULTI, seed + SEED_OFFSET)
    for subset, part in zip(SFT_SUBSETS, (scenes[:N_SINGLE], scenes[N_SINGLE:])):
        (tmp / subset / "images").mkdir(parents=True)
        (tmp / subset / LABELS_DIR).mkdir(parents=True)
        for i, scene in enumerate(part):
            pairs = [single_qa(scene, rng)] if subset == SFT_SUBSETS[0] else multi_turn(scene, rng)
            messages = [{"role": r, "content": c} for q, a in pairs for r, c in (("user", q), ("assistant", a))]
            render(scene).save(tmp / subset / "images" / f"{i:08d}.jpg", quality=95)
            (tmp / subset / LABELS_DIR / f"{i:08d}.json").write_text(
                json.dumps({"conversations": messages}, ensure_ascii=False), encoding="utf-8")
    # What the LM could do without an image before Stage 2 (imagine a scene, greet): some is mixed into
    # training, the rest measures whether Stage 2 kept it.
    for name, n, offset in ((TEXT_TRAIN_FILE, N_TEXT_TRAIN, 3), (TEXT_EVAL_FILE, N_TEXT_EVAL, 1)):
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
