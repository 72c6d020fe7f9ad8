"""Figures of the notebooks: charts with matplotlib, image grids as HTML.

Many GPU machines have no CJK font, and matplotlib then draws Chinese as boxes: charts label in Chinese only when
:func:`chinese_font` finds one, in English otherwise. Image grids are HTML, so the browser's fonts show Chinese.
Each chart returns its ``Figure`` closed in pyplot, so a notebook shows it once, as the cell's value.
"""
from __future__ import annotations

import base64
import functools
import html
import io
import itertools
import time
from pathlib import Path
from typing import Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from IPython import get_ipython
from IPython.display import HTML, display
from matplotlib import font_manager
from matplotlib.figure import Figure
from PIL import Image

# Family names of common CJK fonts (Linux packages, macOS, Windows), in order of preference.
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "Source Han Sans CN", "WenQuanYi Micro Hei",
             "WenQuanYi Zen Hei", "Sarasa Gothic SC", "PingFang SC", "Heiti SC", "Hiragino Sans GB",
             "Microsoft YaHei", "SimHei", "Droid Sans Fallback", "AR PL UMing CN", "Noto Sans CJK JP")


@functools.cache
def chinese_font() -> str | None:
    """Install the first CJK font found as matplotlib's sans-serif font; its name, or None if there is none."""
    installed = {f.name for f in font_manager.fontManager.ttflist}
    name = next((n for n in CJK_FONTS if n in installed), None) or next(
        (n for n in sorted(installed) if any(k in n for k in ("CJK", " SC", "Hei", "Song", "Kai"))), None)
    if name is not None:
        matplotlib.rcParams.update({"font.sans-serif": [name, *matplotlib.rcParams["font.sans-serif"]],
                                    "font.family": "sans-serif", "axes.unicode_minus": False})
    return name


def label(zh, en: str = "") -> str:
    """``zh`` when a CJK font is available, else ``en``; ``zh`` may be a ``(中文, english)`` pair."""
    if isinstance(zh, tuple):
        zh, en = zh
    return zh if chinese_font() or zh.isascii() else en


def _finish(fig: Figure) -> Figure:
    fig.tight_layout()
    plt.close(fig)  # shown once, as the cell's value, not again by the inline backend
    return fig


# ----------------------------------------------------------------------------------------------- images as HTML
def _as_image(item) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    with Image.open(Path(item)) as im:
        return im.convert("RGB")


def thumbnail_jpeg(image, size: int = 224) -> bytes:
    """JPEG bytes of the image (PIL image or path), at most ``size`` px on its long side."""
    im = _as_image(image)
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def thumbnail_uri(image, size: int = 224) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(thumbnail_jpeg(image, size)).decode("ascii")


def _figure(inner: str, caption: str, size: int) -> str:
    return (f'<figure style="margin:0;width:{size}px;">{inner}<figcaption style="font-size:12px;line-height:1.4;'
            f'white-space:pre-wrap;word-break:break-word;">{html.escape(caption)}</figcaption></figure>')


def image_grid(images: Sequence, captions: Sequence[str] | None = None, ncols: int = 4, size: int = 180,
               title: str | None = None) -> HTML:
    """Images (PIL images or paths) in a grid, each with its caption under it."""
    captions = list(captions) if captions is not None else [""] * len(images)
    if len(captions) != len(images):
        raise ValueError(f"图片数（{len(images)}）与说明文字数（{len(captions)}）不一致。")
    cells = [_figure(f'<img src="{thumbnail_uri(im, size)}" style="width:{size}px;height:auto;border-radius:4px;"/>',
                     cap, size) for im, cap in zip(images, captions)]
    head = f'<div style="font-weight:bold;margin:4px 0;">{html.escape(title)}</div>' if title else ""
    grid = f"display:grid;grid-template-columns:repeat({ncols},{size}px);gap:10px;"
    return HTML(f'{head}<div style="{grid}">{"".join(cells)}</div>')


def topk_grid(images: Sequence, matches, captions: Sequence[str] | None = None, names: Sequence[str] | None = None,
              size: int = 150, title: str | None = None) -> HTML:
    """The top-k of a retrieval (``retrieval.Match`` or ``(index, score)``): rank, score, name, caption under each."""
    pairs = [(m.index, m.score) if hasattr(m, "score") else (int(m[0]), float(m[1])) for m in matches]
    caps = [f"#{rank}  相似度 {score:.3f}" + (f"  {names[i]}" if names is not None else "")
            + (f"\n{captions[i]}" if captions is not None and captions[i] else "")
            for rank, (i, score) in enumerate(pairs, 1)]
    return image_grid([images[i] for i, _ in pairs], caps, ncols=max(1, len(pairs)), size=size, title=title)


def patch_word_grid(images: Sequence, words: Sequence[Sequence], titles: Sequence[str] | None = None,
                    size: int = 448) -> HTML:
    """Each image squashed to a square (as the vision tower sees it) under its grid of patches, the words of each
    patch written in it (``words``: per image, row-major, a word or a list of words per patch, one line each).
    The image-block filler is left out, and a patch whose first word is it becomes a dot, so the objects' words
    stand out."""
    from .process import IMAGE_PAD, resize_square
    if len(words) != len(images):
        raise ValueError(f"图片数（{len(images)}）与词表格数（{len(words)}）不一致。")
    figures = []
    for im, cell_words, sub in zip(images, words, titles or [""] * len(images)):
        n = int(round(len(cell_words) ** 0.5))
        if n * n != len(cell_words):
            raise ValueError(f"每张图片应有 n×n 个图块的词，现在是 {len(cell_words)} 个。")
        cells = []
        for w in cell_words:
            ranked = [w] if isinstance(w, str) else list(w)
            dot = not ranked or ranked[0] == IMAGE_PAD
            shown = "·" if dot else "\n".join(html.escape(t.strip() or repr(t)) for t in ranked if t != IMAGE_PAD)
            cells.append(f'<div style="border:1px solid rgba(255,255,255,0.35);display:flex;align-items:center;'
                         f'justify-content:center;overflow:hidden;font-size:{max(8, size // n // 3)}px;'
                         f'line-height:1.05;text-align:center;white-space:pre-line;font-weight:'
                         f'{"normal" if dot else "bold"};color:#000;text-shadow:0 0 3px #fff,0 0 3px #fff;">{shown}</div>')
        src = thumbnail_uri(resize_square(_as_image(im), size), size)
        figures.append(_figure(
            f'<div style="position:relative;width:{size}px;height:{size}px;"><img src="{src}" style="position:'
            f'absolute;width:{size}px;height:{size}px;opacity:0.75;"/><div class="llava-patch-grid" style="position:'
            f'absolute;inset:0;display:grid;grid-template-columns:repeat({n},1fr);grid-template-rows:repeat({n},1fr);">'
            + "".join(cells) + "</div></div>", sub, size))
    return HTML(f'<div style="display:flex;flex-wrap:wrap;gap:12px;">{"".join(figures)}</div>')


# ----------------------------------------------------------------------------------------------- charts
def similarity_bars(names: Sequence[str], scores: Sequence[float], title: str | None = None,
                    highlight: int | None = None, top: int | None = 20) -> Figure:
    """Horizontal bars of similarity scores, best at the top; ``highlight`` (an index into ``names``) in orange."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:top]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(order) + 1.2))
    ax.barh(range(len(order)), [float(scores[i]) for i in order],
            color=["tab:orange" if i == highlight else "tab:blue" for i in order])
    ax.set_yticks(range(len(order)), [label(str(names[i]), f"#{i}") for i in order], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(label("余弦相似度", "cosine similarity"))
    ax.set_title(label(title, "similarity") if title else "")
    return _finish(fig)


def length_histogram(lengths: Sequence[int], limit: int | None = None) -> Figure:
    """Histogram of caption lengths (Qwen tokens), with the mean and (optionally) the training length limit marked."""
    arr = np.asarray(lengths)
    bins = 30
    if arr.max() - arr.min() <= 2 * bins:  # few distinct lengths: one bar per length
        bins = np.arange(arr.min(), arr.max() + 2) - 0.5
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.hist(arr, bins=bins, color="tab:blue", alpha=0.85)
    ax.axvline(arr.mean(), color="tab:orange", linestyle="--",
               label=label(f"平均 {arr.mean():.1f}", f"mean {arr.mean():.1f}"))
    if limit is not None:
        over = float((arr > limit).mean())
        ax.axvline(limit, color="tab:red",
                   label=label(f"上限 {limit}（超出 {over:.1%}）", f"limit {limit} ({over:.1%} over)"))
    ax.set_xlabel(label("描述长度（Qwen 词元）", "caption length (tokens)"))
    ax.set_ylabel(label("样本数", "samples"))
    ax.legend()
    return _finish(fig)


def throughput_bars(results: dict) -> Figure:
    """Bars of samples/s, the ratio of the last to the first in the title. ``results``: ``{name: per_s}`` or
    ``{name: measure_loader(...)}``; a name is a string or a ``(中文, english)`` pair."""
    names = [label(n) if isinstance(n, tuple) else label(str(n), f"#{i}") for i, n in enumerate(results)]
    values = [float(v["per_s"] if isinstance(v, dict) else v) for v in results.values()]
    fig, ax = plt.subplots(figsize=(6, 3))
    bars = ax.bar(range(len(values)), values, color=["tab:gray"] + ["tab:green"] * (len(values) - 1))
    ax.set_xticks(range(len(values)), names)
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel(label("样本/秒", "samples/s"))
    if len(values) > 1 and values[0] > 0:
        ratio = values[-1] / values[0]
        ax.set_title(label(f"{names[-1]} 是 {names[0]} 的 {ratio:.1f} 倍", f"{names[-1]} / {names[0]} = {ratio:.1f}x"))
    ax.margins(y=0.15)
    return _finish(fig)


class LiveLossPlot:
    """``train(config, on_log=LiveLossPlot())``: redraws loss (and learning rate) in place as training logs, through
    a display handle in a notebook. ``every`` skips redraws (each costs ~0.1 s)."""

    def __init__(self, every: int = 1):
        self.every, self.calls = max(1, every), 0
        self.fig, (self.ax_loss, self.ax_lr) = plt.subplots(1, 2, figsize=(10, 3.2),
                                                            gridspec_kw={"width_ratios": [3, 1.3]})
        plt.close(self.fig)
        self._handle = None

    def __call__(self, history: Sequence[dict]) -> None:
        self.calls += 1
        if not history or self.calls % self.every == 0:
            self.draw(history)

    def draw(self, history: Sequence[dict]) -> Figure:
        self.ax_loss.clear()
        self.ax_lr.clear()
        if history:
            steps, losses = [h["step"] for h in history], np.array([h["loss"] for h in history])
            self.ax_loss.plot(steps, losses, color="tab:blue", alpha=0.35, label=label("每步", "per step"))
            if len(losses) >= 5:  # trailing mean over k steps (fewer at the start)
                k = max(2, len(losses) // 20)
                smooth = [losses[max(0, i - k + 1):i + 1].mean() for i in range(len(losses))]
                self.ax_loss.plot(steps, smooth, color="tab:blue", label=label("滑动平均", "moving average"))
            self.ax_loss.legend(loc="upper right")
            self.ax_lr.plot(steps, [h["lr"] for h in history], color="tab:green")
            last = history[-1]
            self.ax_loss.set_title(label(f"第 {last['step']} 步  loss {last['loss']:.3f}",
                                         f"step {last['step']}  loss {last['loss']:.3f}"))
        self.ax_loss.set(xlabel=label("步数", "step"), ylabel="loss")
        self.ax_lr.set(xlabel=label("步数", "step"), title=label("学习率", "learning rate"))
        self.ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        self.fig.tight_layout()
        if get_ipython() is not None:  # tests and terminals only keep the figure up to date
            if self._handle is None:
                self._handle = display(self.fig, display_id=True)
            else:
                self._handle.update(self.fig)
        return self.fig


# ----------------------------------------------------------------------------------------------- loader speed
def measure_loader(dataset, batch_size: int = 32, num_workers: int = 0, max_batches: int | None = None) -> dict:
    """Samples/s of one pass of a ``DataLoader`` over ``dataset`` (images only, the same settings for every dataset
    compared): ``samples``, ``skipped``, ``seconds``, ``per_s`` and ``marks``, (samples, seconds) after each batch."""
    from torch.utils.data import DataLoader

    from . import data
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=data.collate_images)
    n, skipped, marks = 0, 0, []
    t0 = time.perf_counter()
    for batch in itertools.islice(loader, max_batches):
        n += len(batch["row_ids"])
        skipped += len(batch["skipped"])
        marks.append((n, time.perf_counter() - t0))
    seconds = time.perf_counter() - t0
    return {"samples": n, "skipped": skipped, "seconds": seconds, "per_s": n / max(seconds, 1e-9), "marks": marks}


def speed_intervals(marks: Sequence[tuple[int, float]], every: int = 4) -> list[dict]:
    """Cut a pass's ``marks`` into intervals of ``every`` batches: ``end`` (samples read), ``per_s``,
    ``ms_per_sample``. The first includes the loader's start-up, so it is often slower."""
    out, prev_n, prev_t = [], 0, 0.0
    for n, t in list(marks[every - 1::every]) + ([marks[-1]] if len(marks) % every else []):
        if n == prev_n:  # only skipped samples in this interval
            continue
        dt = max(t - prev_t, 1e-9)
        out.append({"end": n, "per_s": (n - prev_n) / dt, "ms_per_sample": 1000 * dt / (n - prev_n)})
        prev_n, prev_t = n, t
    return out


def loader_speed(result: dict, every: int = 4) -> Figure:
    """One :func:`measure_loader` pass as the original course's ``dataset_test`` reported it: speed per interval
    of ``every`` batches against the mean (left), time per sample per interval (right)."""
    parts = speed_intervals(result["marks"], every)
    ends = [p["end"] for p in parts]
    fig, (ax_speed, ax_ms) = plt.subplots(1, 2, figsize=(10, 3.2))
    ax_speed.plot(ends, [p["per_s"] for p in parts], marker="o", color="tab:green",
                  label=label(f"每 {every} 个批次", f"per {every} batches"))
    ax_speed.axhline(result["per_s"], color="tab:gray", linestyle="--",
                     label=label(f"平均 {result['per_s']:.0f} 样本/秒", f"mean {result['per_s']:.0f} samples/s"))
    ax_speed.set_ylim(bottom=0)
    ax_speed.set(xlabel=label("已读样本数", "samples read"), ylabel=label("样本/秒", "samples/s"))
    ax_speed.legend(loc="lower right")
    ax_ms.bar(range(len(parts)), [p["ms_per_sample"] for p in parts], color="tab:blue")
    ax_ms.set_xticks(range(len(parts)), [str(e) for e in ends], rotation=45)
    mean_ms = 1000 * result["seconds"] / max(result["samples"], 1)
    ax_ms.axhline(mean_ms, color="tab:gray", linestyle="--")
    ax_ms.set(xlabel=label("区间结束时的样本数", "samples read at interval end"), ylabel=label("毫秒/样本", "ms/sample"),
              title=label(f"平均每个样本 {mean_ms:.2f} 毫秒", f"mean {mean_ms:.2f} ms/sample"))
    return _finish(fig)
