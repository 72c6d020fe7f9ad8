"""The loader throughput test of 03_dataset: a pass cut into intervals, mean speed and time per sample."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from llava_lib import plots  # noqa: E402


def test_speed_intervals_cut_a_pass_into_equal_batches():
    marks = [(32, 0.5), (64, 0.6), (96, 0.7), (128, 0.8), (144, 0.9)]
    parts = plots.speed_intervals(marks, every=2)
    assert [p["end"] for p in parts] == [64, 128, 144]
    assert parts[0]["per_s"] == pytest.approx(64 / 0.6) and parts[1]["per_s"] == pytest.approx(64 / 0.2)
    assert parts[2]["ms_per_sample"] == pytest.approx(1000 * 0.1 / 16)
    fig = plots.loader_speed({"samples": 144, "seconds": 0.9, "per_s": 160.0, "marks": marks}, every=2)
    assert len(fig.axes) == 2 and len(fig.axes[1].patches) == 3


def test_measure_loader_marks_every_batch(monkeypatch):
    import llava_lib.data as data_pkg
    monkeypatch.setattr(data_pkg, "collate_images", lambda items: {"row_ids": items, "skipped": []})
    result = plots.measure_loader(list(range(10)), batch_size=4)
    assert [n for n, _ in result["marks"]] == [4, 8, 10] and result["samples"] == 10
    assert all(a[1] <= b[1] for a, b in zip(result["marks"], result["marks"][1:]))
