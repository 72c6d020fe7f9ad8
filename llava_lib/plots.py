"""Figures of the notebooks: charts with matplotlib, image grids as HTML.

Chinese text in matplotlib needs a CJK font, which many GPU machines lack (the glyphs become boxes). So:

- charts (:func:`similarity_bars`, :func:`length_histogram`, :func:`throughput_bars`, :func:`loader_speed`,
  :class:`LiveLossPlot`) label in Chinese when :func:`chinese_font` finds a CJK font, and in English otherwise;
- image grids with captions (:func:`image_grid`, :func:`topk_grid`, :func:`patch_word_grid`) are HTML, which the
  browser renders with its own fonts, so Chinese captions always show.

Each chart function returns the ``Figure`` (a notebook shows it when it is the cell's last value) and closes it
in pyplot, so it is shown once.
"""
from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path
from typing import Sequence

import matplotlib
import matplotlib.pyplot as plt
from matplotlib import font_manager
from matplotlib.figure import Figure
from PIL import Image

# Family names of common CJK fonts (Linux packages, macOS, Windows), in order of preference.
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "Source Han Sans CN", "WenQuanYi Micro Hei",
             "WenQuanYi Zen Hei", "Sarasa Gothic SC", "PingFang SC", "Heiti SC", "Hiragino Sans GB",
             "Microsoft YaHei", "SimHei", "Droid Sans Fallback", "AR PL UMing CN", "Noto Sans CJK JP")
_font_cache: list = []


def chinese_font() -> str | None:
    """Install the first CJK font found as matplotlib's sans-serif font; its name, or None if there is none."""
    if _font_cache:
        return _font_cache[0]
    installed = {f.name for f in font_manager.fontManager.ttflist}
    name = next((n for n in CJK_FONTS if n in installed), None)
    if name is None:  # any family that says it is CJK / Chinese
        name = next((n for n in sorted(installed) if any(k in n for k in ("CJK", " SC", "Hei", "Song", "Kai"))), None)
    if name is not None:
        matplotlib.rcParams["font.sans-serif"] = [name] + list(matplotlib.rcParams["font.sans-serif"])
        matplotlib.rcParams["font.family"] = "sans-serif"
        matplotlib.rcParams["axes.unicode_minus"] = False
    _font_cache.append(name)
    return name


def label(zh: str, en: str) -> str:
    """``zh`` when a CJK font is available, else ``en`` (so a chart never shows boxes)."""
    return zh if chinese_font() else en


def _ascii_or(text: str, fallback: str) -> str:
    return text if chinese_font() or text.isascii() else fallback


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


def thumbnail_uri(image, size: int = 224) -> str:
    """A JPEG ``data:`` URI of the image, at most ``size`` px on its long side."""
    im = _as_image(image)
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class HTMLFigure:
    """HTML that a notebook renders (``_repr_html_``); ``.html`` is the markup itself."""

    def __init__(self, markup: str):
        self.html = markup

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:  # a terminal or a plain-text log shows a short line, not base64
        return f"<HTMLFigure: {self.html.count('<img')} 张图片>"


def image_grid(images: Sequence, captions: Sequence[str] | None = None, ncols: int = 4, size: int = 180,
               title: str | None = None) -> HTMLFigure:
    """Images (PIL images or paths) in a grid, each with its caption under it (Chinese shows as is)."""
    captions = list(captions) if captions is not None else [""] * len(images)
    if len(captions) != len(images):
        raise ValueError(f"图片数（{len(images)}）与说明文字数（{len(captions)}）不一致。")
    cells = []
    for im, cap in zip(images, captions):
        cells.append(
            f'<figure style="margin:0;width:{size}px;">'
            f'<img src="{thumbnail_uri(im, size)}" style="width:{size}px;height:auto;border-radius:4px;"/>'
            f'<figcaption style="font-size:12px;line-height:1.4;white-space:pre-wrap;word-break:break-word;">'
            f'{html.escape(cap)}</figcaption></figure>')
    head = f'<div style="font-weight:bold;margin:4px 0;">{html.escape(title)}</div>' if title else ""
    grid = (f'<div class="llava-image-grid" style="display:grid;grid-template-columns:repeat({ncols},{size}px);'
            f'gap:10px;">' + "".join(cells) + "</div>")
    return HTMLFigure(head + grid)


def topk_grid(images: Sequence, matches, captions: Sequence[str] | None = None, names: Sequence[str] | None = None,
              size: int = 150, title: str | None = None) -> HTMLFigure:
    """The top-k of a retrieval as thumbnails: rank, score, name and caption under each.

    ``matches``: ``retrieval.Match`` objects (or ``(index, score)`` pairs); ``images`` are indexed by them.
    """
    pairs = [(m.index, m.score) if hasattr(m, "score") else (int(m[0]), float(m[1])) for m in matches]
    ims, caps = [], []
    for rank, (i, score) in enumerate(pairs, 1):
        ims.append(images[i])
        line = f"#{rank}  相似度 {score:.3f}" + (f"  {names[i]}" if names is not None else "")
        caps.append(line + (f"\n{captions[i]}" if captions is not None and captions[i] else ""))
    return image_grid(ims, caps, ncols=max(1, len(pairs)), size=size, title=title)


def patch_word_grid(images: Sequence, words: Sequence[Sequence], titles: Sequence[str] | None = None,
                    size: int = 448, faint: Sequence[str] = ("<|image_pad|>",), title: str | None = None) -> HTMLFigure:
    """Each image squashed to a square (as the vision tower sees it) under its grid of patches, with words written
    in each patch. ``words``: per image, row-major, per patch a word or a list of words (nearest first, one line
    each), e.g. the nearest LLM tokens of each projected patch feature.

    A patch whose first word is ``faint`` (the image-block filler, by default) is drawn as a small dot, and ``faint``
    words are left out of the others, so the objects' words stand out. HTML, so Chinese shows with the browser's fonts.
    """
    from .process import resize_square
    if len(words) != len(images):
        raise ValueError(f"图片数（{len(images)}）与词表格数（{len(words)}）不一致。")
    titles = list(titles) if titles is not None else [""] * len(images)
    faint = set(faint)
    figures = []
    for im, cell_words, sub in zip(images, words, titles):
        n = int(round(len(cell_words) ** 0.5))
        if n * n != len(cell_words):
            raise ValueError(f"每张图片应有 n×n 个图块的词，现在是 {len(cell_words)} 个。")
        square = resize_square(_as_image(im), size)
        cells = []
        for w in cell_words:
            ranked = [w] if isinstance(w, str) else list(w)
            dot = not ranked or ranked[0] in faint
            shown = "·" if dot else "\n".join(html.escape(t.strip() or repr(t)) for t in ranked if t not in faint)
            weight = "normal" if dot else "bold"
            cells.append(f'<div style="border:1px solid rgba(255,255,255,0.35);display:flex;align-items:center;'
                         f'justify-content:center;overflow:hidden;font-size:{max(8, size // n // 3)}px;'
                         f'line-height:1.05;text-align:center;white-space:pre-line;font-weight:{weight};'
                         f'color:#000;text-shadow:0 0 3px #fff,0 0 3px #fff;">{shown}</div>')
        grid = (f'<div style="position:relative;width:{size}px;height:{size}px;">'
                f'<img src="{thumbnail_uri(square, size)}" style="position:absolute;width:{size}px;height:{size}px;'
                f'opacity:0.75;"/><div class="llava-patch-grid" style="position:absolute;inset:0;display:grid;'
                f'grid-template-columns:repeat({n},1fr);grid-template-rows:repeat({n},1fr);">'
                + "".join(cells) + "</div></div>")
        figures.append(f'<figure style="margin:0;width:{size}px;">{grid}<figcaption style="font-size:12px;'
                       f'line-height:1.4;white-space:pre-wrap;">{html.escape(sub)}</figcaption></figure>')
    head = f'<div style="font-weight:bold;margin:4px 0;">{html.escape(title)}</div>' if title else ""
    return HTMLFigure(head + '<div style="display:flex;flex-wrap:wrap;gap:12px;">' + "".join(figures) + "</div>")


# ----------------------------------------------------------------------------------------------- charts
def similarity_bars(names: Sequence[str], scores: Sequence[float], title: str | None = None,
                    highlight: int | None = None, top: int | None = 20) -> Figure:
    """Horizontal bars of similarity scores, best at the top; ``highlight`` (an index into ``names``) in orange."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:top]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(order) + 1.2))
    colors = ["tab:orange" if i == highlight else "tab:blue" for i in order]
    ax.barh(range(len(order)), [float(scores[i]) for i in order], color=colors)
    ax.set_yticks(range(len(order)), [_ascii_or(str(names[i]), f"#{i}") for i in order], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(label("余弦相似度", "cosine similarity"))
    if title:
        ax.set_title(_ascii_or(title, "similarity"))
    return _finish(fig)


def length_histogram(lengths: Sequence[int], bins: int = 30, limit: int | None = None,
                     unit: str = "Qwen 词元") -> Figure:
    """Histogram of caption lengths, with the mean and (optionally) the training length limit marked."""
    import numpy as np
    arr = np.asarray(lengths)
    lo, hi = int(arr.min()), int(arr.max())
    if hi - lo <= 2 * bins:  # few distinct lengths: one bar per length
        bins = np.arange(lo, hi + 2) - 0.5
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.hist(arr, bins=bins, color="tab:blue", alpha=0.85)
    ax.axvline(arr.mean(), color="tab:orange", linestyle="--",
               label=label(f"平均 {arr.mean():.1f}", f"mean {arr.mean():.1f}"))
    if limit is not None:
        over = float((arr > limit).mean())
        ax.axvline(limit, color="tab:red", label=label(f"上限 {limit}（超出 {over:.1%}）", f"limit {limit} ({over:.1%} over)"))
    ax.set_xlabel(label(f"描述长度（{unit}）", "caption length (tokens)"))
    ax.set_ylabel(label("样本数", "samples"))
    ax.legend()
    return _finish(fig)


def _name(name, i: int) -> str:
    """A bar's label: ``"中文"``, or ``("中文", "english")`` whose English part is used without a CJK font."""
    if isinstance(name, tuple):
        return name[0] if chinese_font() else name[1]
    return _ascii_or(str(name), f"#{i}")


def throughput_bars(results: dict, unit: str = "样本/秒") -> Figure:
    """Bars of samples/s, the ratio of the last to the first in the title.

    ``results``: ``{name: per_s}`` or ``{name: {"per_s": ...}}`` (what :func:`measure_loader` returns); a name is
    a string or a ``(中文, english)`` pair, the English used where no CJK font is installed.
    """
    names = [_name(n, i) for i, n in enumerate(results)]
    values = [float(v["per_s"] if isinstance(v, dict) else v) for v in results.values()]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(range(len(values)), values, color=["tab:gray"] + ["tab:green"] * (len(values) - 1))
    ax.set_xticks(range(len(values)), names)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    ax.set_ylabel(label(unit, "samples/s"))
    if len(values) > 1 and values[0] > 0:
        ratio = values[-1] / values[0]
        ax.set_title(label(f"{names[-1]} 是 {names[0]} 的 {ratio:.1f} 倍", f"{names[-1]} / {names[0]} = {ratio:.1f}x"))
    ax.margins(y=0.15)
    return _finish(fig)


class LiveLossPlot:
    """``train(config, on_log=LiveLossPlot())``: redraws loss (and learning rate) in place as training logs.

    In a notebook the figure is displayed once and then updated through its display handle; elsewhere (tests,
    a terminal) it only keeps the figure up to date. ``every`` skips redraws (each costs ~0.1 s).
    """

    def __init__(self, every: int = 1, title: str | None = None):
        self.every = max(1, every)
        self.title = title
        self.calls = 0
        self.fig, (self.ax_loss, self.ax_lr) = plt.subplots(1, 2, figsize=(10, 3.2),
                                                            gridspec_kw={"width_ratios": [3, 1.3]})
        plt.close(self.fig)
        self._handle = None

    def __call__(self, history: Sequence[dict]) -> None:
        self.calls += 1
        if self.calls % self.every and history:
            return
        self.draw(history)

    def draw(self, history: Sequence[dict]) -> Figure:
        steps = [h["step"] for h in history]
        self.ax_loss.clear()
        self.ax_lr.clear()
        if steps:
            losses = [h["loss"] for h in history]
            self.ax_loss.plot(steps, losses, color="tab:blue", alpha=0.35, label=label("每步", "per step"))
            if len(losses) >= 5:
                k = max(2, len(losses) // 20)
                smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                          for i in range(len(losses))]
                self.ax_loss.plot(steps, smooth, color="tab:blue", label=label("滑动平均", "moving average"))
            self.ax_loss.legend(loc="upper right")
            self.ax_lr.plot(steps, [h["lr"] for h in history], color="tab:green")
            last = history[-1]
            self.ax_loss.set_title(label(f"第 {last['step']} 步  loss {last['loss']:.3f}",
                                         f"step {last['step']}  loss {last['loss']:.3f}"))
        self.ax_loss.set_xlabel(label("步数", "step"))
        self.ax_loss.set_ylabel("loss")
        self.ax_lr.set_xlabel(label("步数", "step"))
        self.ax_lr.set_title(label("学习率", "learning rate"))
        self.ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        if self.title:
            self.fig.suptitle(_ascii_or(self.title, ""))
        self.fig.tight_layout()
        self._show()
        return self.fig

    def _show(self) -> None:
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:  # pragma: no cover - IPython is a dependency of the notebooks only
            return
        if get_ipython() is None:
            return
        if self._handle is None:
            self._handle = display(self.fig, display_id=True)
        else:
            self._handle.update(self.fig)


# ----------------------------------------------------------------------------------------------- loader speed
def measure_loader(dataset, batch_size: int = 32, num_workers: int = 0, max_batches: int | None = None) -> dict:
    """Samples/s of one pass of a ``DataLoader`` over ``dataset`` (images only, no tokenizer).

    Returns ``samples``, ``skipped``, ``seconds``, ``per_s``. Same loader settings for every dataset compared.
    """
    from torch.utils.data import DataLoader

    from .data import collate_images
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_images)
    n = skipped = 0
    marks = []  # (samples so far, seconds so far) after each batch: what speed_intervals cuts into intervals
    t0 = time.perf_counter()
    for b, batch in enumerate(loader):
        n += len(batch["row_ids"])
        skipped += len(batch["skipped"])
        marks.append((n, time.perf_counter() - t0))
        if max_batches is not None and b + 1 >= max_batches:
            break
    seconds = time.perf_counter() - t0
    return {"samples": n, "skipped": skipped, "seconds": seconds, "per_s": n / max(seconds, 1e-9), "marks": marks}


def speed_intervals(marks: Sequence[tuple[int, float]], every: int = 4) -> list[dict]:
    """Cut a pass's ``marks`` (samples, seconds after each batch) into intervals of ``every`` batches.

    Each interval: ``end`` (samples read when it ends), ``samples``, ``seconds``, ``per_s`` and ``ms_per_sample``.
    The first interval includes the loader's start-up (opening files, starting workers), so it is often slower.
    """
    out, prev_n, prev_t = [], 0, 0.0
    for i in range(every - 1, len(marks) + every - 1, every):
        n, t = marks[min(i, len(marks) - 1)]
        if n == prev_n:
            continue
        dt = max(t - prev_t, 1e-9)
        out.append({"end": n, "samples": n - prev_n, "seconds": dt, "per_s": (n - prev_n) / dt,
                    "ms_per_sample": 1000 * dt / (n - prev_n)})
        prev_n, prev_t = n, t
    return out


def loader_speed(result: dict, every: int = 4, title: str | None = None) -> Figure:
    """One loader pass (:func:`measure_loader`) as the original course's ``dataset_test`` reported it: speed per
    interval of ``every`` batches with the mean speed as a line (left), and time per sample per interval (right)."""
    parts = speed_intervals(result["marks"], every)
    ends = [p["end"] for p in parts]
    fig, (ax_speed, ax_ms) = plt.subplots(1, 2, figsize=(10, 3.2))
    ax_speed.plot(ends, [p["per_s"] for p in parts], marker="o", color="tab:green",
                  label=label(f"每 {every} 个批次", f"per {every} batches"))
    ax_speed.axhline(result["per_s"], color="tab:gray", linestyle="--",
                     label=label(f"平均 {result['per_s']:.0f} 样本/秒", f"mean {result['per_s']:.0f} samples/s"))
    ax_speed.set_ylim(bottom=0)
    ax_speed.set_xlabel(label("已读样本数", "samples read"))
    ax_speed.set_ylabel(label("样本/秒", "samples/s"))
    ax_speed.legend(loc="lower right")
    ax_ms.bar(range(len(parts)), [p["ms_per_sample"] for p in parts], color="tab:blue")
    ax_ms.set_xticks(range(len(parts)), [str(e) for e in ends], rotation=45)
    mean_ms = 1000 * result["seconds"] / max(result["samples"], 1)
    ax_ms.axhline(mean_ms, color="tab:gray", linestyle="--")
    ax_ms.set_xlabel(label("区间结束时的样本数", "samples read at interval end"))
    ax_ms.set_ylabel(label("毫秒/样本", "ms/sample"))
    ax_ms.set_title(label(f"平均每个样本 {mean_ms:.2f} 毫秒", f"mean {mean_ms:.2f} ms/sample"))
    if title:
        fig.suptitle(_ascii_or(title, ""))
    return _finish(fig)
