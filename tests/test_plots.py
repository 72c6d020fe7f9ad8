"""Figures of the notebooks: HTML image grids, charts (with or without a CJK font), the live loss plot."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from llava_lib import plots  # noqa: E402


@pytest.fixture(params=[None, "Fake CJK"], ids=["no-cjk-font", "cjk-font"])
def font(request, monkeypatch):
    monkeypatch.setattr(plots, "chinese_font", lambda: request.param)
    return request.param


def _img(color=(200, 10, 10), size=(64, 48)):
    return Image.new("RGB", size, color)


def test_image_grid_is_html_with_escaped_captions(tmp_path):
    p = tmp_path / "a.jpg"
    _img(size=(400, 300)).save(p)
    g = plots.image_grid([_img(), p], ["红色的<圆形>", "第二张\n两行"], ncols=2, size=100, title="标题")
    html = g._repr_html_()
    assert html.count("<img") == 2 and "data:image/jpeg;base64," in html
    assert "红色的&lt;圆形&gt;" in html and "标题" in html
    assert "repeat(2,100px)" in html
    assert "<img" not in repr(g)  # a terminal shows a short line, not base64
    with pytest.raises(ValueError, match="不一致"):
        plots.image_grid([_img()], ["a", "b"])


def test_thumbnail_keeps_aspect_and_bounds_size():
    import base64
    import io
    uri = plots.thumbnail_uri(_img(size=(800, 400)), size=100)
    im = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert im.size == (100, 50)


def test_topk_grid_lists_rank_score_name_caption():
    from llava_lib.retrieval import Match
    imgs = [_img((i * 40, 0, 0)) for i in range(5)]
    g = plots.topk_grid(imgs, [Match(3, 0.91234), Match(0, 0.5)], captions=[f"描述{i}" for i in range(5)],
                        names=[f"{i:04d}.jpg" for i in range(5)])
    html = g.data
    assert html.count("<img") == 2
    assert html.index("#1  相似度 0.912  0003.jpg") < html.index("#2  相似度 0.500  0000.jpg")
    assert "描述3" in html and "描述1" not in html
    assert plots.topk_grid(imgs, [(1, 0.2)]).data.count("<img") == 1


@pytest.mark.filterwarnings("ignore:Glyph")  # the fake CJK font has no glyphs
def test_charts_return_closed_figures(font):
    import matplotlib.pyplot as plt
    figs = [plots.similarity_bars([f"{i:04d}.jpg" for i in range(30)], [i / 30 for i in range(30)],
                                  title="图片相似度", highlight=29, top=10),
            plots.length_histogram([10, 12, 15, 40, 200], limit=128),
            plots.throughput_bars({("直接下载", "direct"): 50.0, "读取缓存": {"per_s": 400.0}})]
    for f in figs:
        assert isinstance(f, Figure)
        assert f.number not in plt.get_fignums()  # closed in pyplot: shown once, as the cell's value
        f.canvas.draw()
    bars = figs[0].axes[0].patches
    assert len(bars) == 10 and bars[0].get_width() == pytest.approx(29 / 30)  # best first
    assert bars[0].get_facecolor() != bars[1].get_facecolor()  # the highlighted one
    title = figs[2].axes[0].get_title()
    assert "8.0" in title
    ticks = [t.get_text() for t in figs[2].axes[0].get_xticklabels()]
    assert ticks == (["direct", "#1"] if font is None else ["直接下载", "读取缓存"])
    if font is None:  # no CJK font: every label is ASCII, so nothing renders as boxes
        texts = [t.get_text() for f in figs for ax in f.axes
                 for t in [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.get_xticklabels(), *ax.get_yticklabels()]]
        assert all(t.isascii() for t in texts), texts
    else:
        assert figs[1].axes[0].get_xlabel().startswith("描述长度")


@pytest.mark.filterwarnings("ignore:Glyph")
def test_live_loss_plot_redraws_from_history(font):
    live = plots.LiveLossPlot(every=2)
    history = []
    for step in range(1, 31):
        history.append({"step": step, "loss": 5.0 / step, "lr": 1e-3 * min(1, step / 5)})
        live(history)
    assert live.calls == 30
    lines = live.ax_loss.get_lines()
    assert len(lines) == 2 and list(lines[0].get_xdata()) == list(range(1, 31))  # raw + moving average
    assert "30" in live.ax_loss.get_title()
    live.draw([])  # an empty history draws empty axes, no error


def test_chinese_font_detection_is_cached(monkeypatch):
    plots.chinese_font.cache_clear()
    name = plots.chinese_font()
    assert plots.chinese_font() == name and plots.chinese_font.cache_info().hits == 1
    assert plots.label("中文", "english") == ("中文" if name else "english")


def test_measure_loader_counts_samples_and_skips():
    import torch

    from llava_lib.data import SkippedSample

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            if i == 3:
                return SkippedSample(i, f"u{i}", "http_404", "没有")
            return {"pixel_values": torch.zeros(3, 8, 8), "caption": "c", "url": f"u{i}", "row_id": i}

    r = plots.measure_loader(DS(), batch_size=4)
    assert r["samples"] == 9 and r["skipped"] == 1 and r["per_s"] > 0
    assert plots.measure_loader(DS(), batch_size=4, max_batches=1)["samples"] == 3  # rows 0-3, row 3 skipped
