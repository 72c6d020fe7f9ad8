"""Synthetic scenes of the mini world: coloured shapes on a plain background, with Chinese captions.

Pure functions of a seed: the same seed gives the same scenes, pixels and captions on every machine.
"""
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

COLORS = {"红色": (215, 38, 38), "绿色": (36, 160, 64), "蓝色": (38, 82, 215), "黄色": (236, 196, 24),  # name -> RGB
          "紫色": (140, 58, 190), "黑色": (30, 30, 30)}
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
        """Count, then each object's position, colour and shape in reading order."""
        parts = [f"{o.position}是一个{o.color}的{o.shape}" for o in self.objects]
        return f"图中有{COUNT_WORDS[len(self.objects)]}个物体：" + "，".join(parts) + "。"


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
    cell_size = IMAGE_SIZE / GRID
    objects = []
    for cell in cells:
        r, c = divmod(cell, GRID)
        radius = float(rng.uniform(*RADIUS_RANGE) * cell_size)
        jitter = cell_size / 2 - radius - 2
        cx = (c + 0.5) * cell_size + float(rng.uniform(-jitter, jitter))
        cy = (r + 0.5) * cell_size + float(rng.uniform(-jitter, jitter))
        objects.append(SceneObject(list(COLORS)[int(rng.integers(len(COLORS)))],
                                   SHAPES[int(rng.integers(len(SHAPES)))], cell, cx, cy, radius))
    bg = tuple(int(v) for v in rng.integers(205, 246, size=3))
    return Scene(tuple(objects), bg)


def make_scenes(n: int, seed: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def _draw(draw: ImageDraw.ImageDraw, o: SceneObject, fill) -> None:
    cx, cy, r = o.cx, o.cy, o.radius
    if o.shape == "圆形":
        return draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    if o.shape == "正方形":
        s = r * 0.85
        pts = [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    elif o.shape == "三角形":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif o.shape == "菱形":
        pts = [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    else:  # a star: ten points, outer and inner radius in turn
        rays = [(r if k % 2 == 0 else r * 0.45, -math.pi / 2 + k * math.pi / 5) for k in range(10)]
        pts = [(cx + rad * math.cos(a), cy + rad * math.sin(a)) for rad, a in rays]
    draw.polygon(pts, fill=fill)


def render(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw(draw, o, COLORS[o.color])
    return img


INTERIOR_FRACTION = 0.98  # a patch this full of one object shows no outline


def patch_layout(scene: Scene, min_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """``[196]`` per 16x16 patch (row-major): the index of the object covering at least ``min_fraction`` of it (or
    -1), and whether it shows part of that object's outline: only those tell a shape by themselves, as inside a circle
    and a square are the same flat colour (a per-patch pixel classifier: outline 0.89 right, interior 0.44)."""
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    for i, o in enumerate(scene.objects):
        _draw(draw, o, i + 1)
    g = IMAGE_SIZE // PATCH
    blocks = np.asarray(mask).reshape(g, PATCH, g, PATCH).transpose(0, 2, 1, 3).reshape(g * g, PATCH * PATCH)
    owner = np.full(g * g, -1, dtype=np.int64)
    full = np.zeros(g * g, dtype=bool)
    for i in range(len(scene.objects)):
        fraction = (blocks == i + 1).mean(axis=1)
        owner[fraction >= min_fraction] = i
        full |= fraction >= INTERIOR_FRACTION
    return owner, (owner >= 0) & ~full


IMAGE_WORDS = (*COLORS, *SHAPES, *POSITIONS, "<filler>")  # what the mini LM reads at a patch (lm_train, point 2)


def patch_words(scene: Scene, layout: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``[196, len(IMAGE_WORDS)]`` 0/1: the image words the mini LM reads at each patch (an object's colour and
    position, its shape too on an outline patch, or the filler); its slot embedding is this row times the word
    embeddings. ``layout``: :func:`patch_layout`, when the caller has it already."""
    owner, outline = layout if layout is not None else patch_layout(scene)
    out = np.zeros((owner.shape[0], len(IMAGE_WORDS)), dtype=np.float32)
    out[owner < 0, -1] = 1.0
    for i, o in enumerate(scene.objects):
        mine = owner == i
        out[mine, IMAGE_WORDS.index(o.color)] = out[mine, IMAGE_WORDS.index(o.position)] = 1.0
        out[mine & outline, IMAGE_WORDS.index(o.shape)] = 1.0
    return out
