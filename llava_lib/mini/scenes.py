"""Synthetic scenes of the mini world: coloured shapes on a plain background, with Chinese captions.

Pure functions of a seed: the same seed gives the same scenes, pixels and captions on every machine.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 224
GRID = 2  # objects sit in a 2x2 grid of cells, one object per cell
PATCH = 16
RADIUS_RANGE = (0.26, 0.36)  # object radius, as a fraction of the cell size

COLORS = {  # name -> RGB
    "红色": (215, 38, 38),
    "绿色": (36, 160, 64),
    "蓝色": (38, 82, 215),
    "黄色": (236, 196, 24),
    "紫色": (140, 58, 190),
    "黑色": (30, 30, 30),
}
SHAPES = ("圆形", "正方形", "三角形", "菱形", "星形")
POSITIONS = ("左上方", "右上方", "左下方", "右下方")  # row-major cells
COUNT_WORDS = {1: "一", 2: "两", 3: "三"}


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    cell: int  # 0..3, row-major in the 2x2 grid
    cx: float
    cy: float
    radius: float

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # sorted by cell: the caption's order
    background: tuple[int, int, int]

    @property
    def caption(self) -> str:
        return caption_for(self.objects)


def caption_for(objects) -> str:
    """The global caption: count, then each object's position, colour and shape in reading order."""
    parts = [f"{o.position}是一个{o.color}的{o.shape}" for o in objects]
    return f"图中有{COUNT_WORDS[len(objects)]}个物体：" + "，".join(parts) + "。"


def local_captions(scene: Scene) -> list[str]:
    return [f"一个{o.color}的{o.shape}" for o in scene.objects]


_OBJ_RE = re.compile("(" + "|".join(COLORS) + ")的(" + "|".join(SHAPES) + ")")


def caption_objects(text: str) -> Counter:
    """The multiset of (colour, shape) pairs a caption names, e.g. ``红色的圆形`` -> ('红色', '圆形')."""
    return Counter(_OBJ_RE.findall(text))


def caption_is_correct(generated: str, reference: str) -> bool:
    """True when the generated caption names exactly the objects (colour + shape) of the reference."""
    return caption_objects(generated) == caption_objects(reference)


def sample_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.integers(1, 4))
    cells = sorted(rng.choice(GRID * GRID, size=n, replace=False).tolist())
    color_names = list(COLORS)
    cell_size = IMAGE_SIZE / GRID
    objects = []
    for cell in cells:
        r, c = divmod(cell, GRID)
        radius = float(rng.uniform(*RADIUS_RANGE) * cell_size)
        jitter = cell_size / 2 - radius - 2
        cx = (c + 0.5) * cell_size + float(rng.uniform(-jitter, jitter))
        cy = (r + 0.5) * cell_size + float(rng.uniform(-jitter, jitter))
        objects.append(SceneObject(color_names[int(rng.integers(len(color_names)))],
                                   SHAPES[int(rng.integers(len(SHAPES)))], cell, cx, cy, radius))
    bg = tuple(int(v) for v in rng.integers(205, 246, size=3))
    return Scene(tuple(objects), bg)


def make_scenes(n: int, seed: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def _polygon(o: SceneObject) -> list[tuple[float, float]] | None:
    cx, cy, r = o.cx, o.cy, o.radius
    if o.shape == "正方形":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if o.shape == "三角形":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if o.shape == "菱形":
        return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    if o.shape == "星形":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    return None  # circle


def _draw(draw: ImageDraw.ImageDraw, o: SceneObject, fill) -> None:
    poly = _polygon(o)
    if poly is None:
        draw.ellipse([o.cx - o.radius, o.cy - o.radius, o.cx + o.radius, o.cy + o.radius], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def render(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw(draw, o, COLORS[o.color])
    return img


def _patch_fractions(scene: Scene) -> np.ndarray:
    """``[objects, 196]``: the share of each 16x16 patch (row-major) that each object covers."""
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    for i, o in enumerate(scene.objects):
        _draw(draw, o, i + 1)
    m = np.asarray(mask)
    g = IMAGE_SIZE // PATCH
    blocks = m.reshape(g, PATCH, g, PATCH).transpose(0, 2, 1, 3).reshape(g * g, PATCH * PATCH)
    return np.stack([(blocks == i + 1).mean(axis=1) for i in range(len(scene.objects))])


def patch_layout(scene: Scene, min_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """:func:`patch_owner` and :func:`outline_patches` of ``scene`` from one rendering of its mask."""
    fractions = _patch_fractions(scene)
    owner = np.full((IMAGE_SIZE // PATCH) ** 2, -1, dtype=np.int64)
    for i, frac in enumerate(fractions):
        owner[frac >= min_fraction] = i
    full = (fractions >= INTERIOR_FRACTION).any(axis=0) if len(fractions) else np.zeros(owner.shape, bool)
    return owner, (owner >= 0) & ~full


def patch_owner(scene: Scene, min_fraction: float = 0.25) -> np.ndarray:
    """For each of the 14x14 patches (row-major), the index of the object covering it, or -1.

    A patch belongs to an object when at least ``min_fraction`` of its pixels are that object's.
    """
    return patch_layout(scene, min_fraction)[0]


INTERIOR_FRACTION = 0.98  # a patch this full of one object shows no outline


def outline_patches(scene: Scene) -> np.ndarray:
    """``[196]`` bool: the patch belongs to an object (:func:`patch_owner`) and shows part of its outline.

    Only these patches can tell a shape by themselves: a patch inside a shape is one flat colour, the same for a
    circle and a square (measured with a small per-patch classifier on pixels: ~0.89 of outline patches right,
    0.44 of interior ones, chance 0.2). So the mini world's image words carry the shape only at outline patches.
    """
    return patch_layout(scene)[1]


IMAGE_WORDS = (*COLORS, *SHAPES, *POSITIONS, "<filler>")  # what the mini LM reads at a patch (lm_train, point 2)


def patch_words(scene: Scene, layout: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``[196, len(IMAGE_WORDS)]`` 0/1: which image words the mini LM reads at each patch.

    An object's patch: its colour and position words, plus its shape word where the patch shows the outline;
    a background patch: the filler. The LM's slot embedding is this row times the matching word embeddings, so
    any map that gets these rows right (a linear one included) gets the LM's input right, whatever the LM.
    ``layout``: :func:`patch_layout` of the scene, when the caller has it already (it renders the mask).
    """
    owner, outline = layout if layout is not None else patch_layout(scene)
    out = np.zeros((owner.shape[0], len(IMAGE_WORDS)), dtype=np.float32)
    out[owner < 0, -1] = 1.0
    colors, shapes = list(COLORS), list(SHAPES)
    for i, o in enumerate(scene.objects):
        mine = owner == i
        out[mine, colors.index(o.color)] = 1.0
        out[mine, len(COLORS) + len(SHAPES) + o.cell] = 1.0
        out[mine & outline, len(COLORS) + shapes.index(o.shape)] = 1.0
    return out
