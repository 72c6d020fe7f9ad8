"""Regenerate the course's ``data_example/`` folder: the first N good samples as ``NNNN.jpg`` + ``NNNN.txt``."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from ..process import IMAGE_SIZE, resize_square
from .cache import atomic_write_bytes, encode_jpeg
from .fetch import FetchError, fetch_image
from .reader import read_sa1b


@dataclass
class ExportReport:
    written: int = 0
    skipped: list = field(default_factory=list)  # (row_id, reason) of rows that could not be fetched
    bad_rows: int = 0


def export_examples(src, out_dir, n: int = 100, *, size: int | None = IMAGE_SIZE, workers: int = 8,
                    url_rewrite: tuple[str, str] | None = None, timeout: float = 20.0, retries: int = 2,
                    quality: int = 90) -> ExportReport:
    """Write the first ``n`` samples that can be fetched; bad rows and failed fetches are skipped and listed.

    ``size`` squashes each image to the model's square input (``process.resize_square``, which keeps the folder
    small); ``None`` keeps the original image.
    """
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    rows = read_sa1b(src)
    it = iter(rows)
    report = ExportReport()

    def load(row):
        try:
            img = fetch_image(row.url, timeout=timeout, retries=retries, url_rewrite=url_rewrite)
            return row, (resize_square(img, size) if size else img)
        except FetchError as e:
            return row, e

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        while report.written < n:
            chunk = list(islice(it, n - report.written))
            if not chunk:
                break
            for row, result in pool.map(load, chunk):  # map keeps the source order
                if isinstance(result, FetchError):
                    report.skipped.append((row.row_id, result.reason))
                    continue
                stem = out / f"{report.written:04d}"
                atomic_write_bytes(stem.with_suffix(".jpg"), encode_jpeg(result, quality))
                atomic_write_bytes(stem.with_suffix(".txt"), (row.caption + "\n").encode("utf-8"))
                report.written += 1
    report.bad_rows = rows.stats.bad_rows
    return report
