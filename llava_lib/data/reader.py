"""Read SA1B-Dense-Caption parquet shards as ``Row(row_id, url, caption)``, one record batch at a time.

``row_id`` is the global row index across the shards in sorted order, bad rows included: it is the key that the
cache, the failure manifest and the datasets share, so "the first N rows" means the same rows everywhere.
"""
from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import pyarrow.parquet as pq

COLUMNS = ["url", "cap_seg"]


class DataFormatError(ValueError):
    """A source that cannot be read at all: no shards, or a shard without a required column."""


class Row(NamedTuple):
    row_id: int
    url: str
    caption: str


@dataclass
class ReadStats:
    rows: int = 0          # good rows yielded
    bad_rows: int = 0      # rows skipped because their url / cap_seg could not be used
    first_problem: str = ""

    def summary(self) -> str:
        return f"读取 {self.rows} 行，跳过坏行 {self.bad_rows} 行" + (f"（例如：{self.first_problem}）" if self.bad_rows else "")


def list_shards(src) -> list[Path]:
    """``src``: a dataset root (``{root}/data/*.parquet``), a directory of parquet files, one file, or a list."""
    if isinstance(src, (str, Path)):
        p = Path(src).expanduser()
        files = (sorted((p / "data").glob("*.parquet")) or sorted(p.glob("*.parquet"))) if p.is_dir() else [p]
    else:
        files = [Path(f).expanduser() for f in src]
    if not files:
        raise DataFormatError(f"在 {src} 中找不到 parquet 文件（应为 <目录>/data/*.parquet）。"
                              f"请检查路径，或运行 `python -m llava_lib.download data` 下载数据。")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataFormatError(f"parquet 文件不存在：{missing[0]}" + (f" 等 {len(missing)} 个" if len(missing) > 1 else ""))
    return files


def parse_cap_seg(value) -> str:
    """``global_caption`` from a dict, a JSON string or a Python-literal string; ValueError (Chinese) otherwise."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            try:  # literal_eval only builds literals: no code runs, unlike eval
                value = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                raise ValueError("cap_seg 既不是 JSON 也不是 Python 字面量，无法解析") from None
    if not isinstance(value, dict):
        raise ValueError(f"cap_seg 应为字典，实际是 {type(value).__name__}")
    caption = value.get("global_caption")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError("cap_seg 中没有非空的 global_caption")
    return caption.strip()


class SA1BRows:
    """Rows ``start <= row_id < start + limit`` (``limit`` counts bad rows too); bad rows are skipped, counted in
    ``stats`` and passed to ``on_bad(row_id, url, message)``."""

    def __init__(self, src, start: int = 0, limit: int | None = None,
                 on_bad: Callable[[int, str, str], None] | None = None):
        self.files = list_shards(src)
        self.start = max(0, int(start))
        self.stop = math.inf if limit is None else self.start + max(0, int(limit))
        self.on_bad, self.stats = on_bad, ReadStats()

    def num_rows(self) -> int:
        """Rows in range (bad ones included), from parquet metadata only."""
        return max(0, min(sum(pq.ParquetFile(f).metadata.num_rows for f in self.files), self.stop) - self.start)

    def __iter__(self) -> Iterator[Row]:
        row_id = 0
        for path in self.files:
            pf, first = pq.ParquetFile(path), row_id
            missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
            if missing:
                raise DataFormatError(f"{path} 缺少列 {', '.join(missing)}（现有列：{', '.join(pf.schema_arrow.names)}）。"
                                      f"SA1B-Dense-Caption 的 parquet 应包含 url 和 cap_seg 两列；请确认数据来源是否正确。")
            if row_id + pf.metadata.num_rows <= self.start:  # a whole file before `start` is not read
                row_id += pf.metadata.num_rows
                continue
            for batch in pf.iter_batches(batch_size=1024, columns=COLUMNS):
                for url, cap in zip(batch.column("url").to_pylist(), batch.column("cap_seg").to_pylist()):
                    rid, row_id = row_id, row_id + 1
                    if rid < self.start:
                        continue
                    if rid >= self.stop:
                        return
                    try:
                        if not isinstance(url, str) or not url.strip():
                            raise ValueError("url 为空")
                        caption = parse_cap_seg(cap)
                    except ValueError as e:
                        msg = f"{path.name} 第 {rid - first} 行（全局行号 {rid}）：{e}，已跳过"
                        self.stats.bad_rows += 1
                        self.stats.first_problem = self.stats.first_problem or msg
                        if self.on_bad is not None:
                            self.on_bad(rid, url if isinstance(url, str) else "", msg)
                        continue
                    self.stats.rows += 1
                    yield Row(rid, url.strip(), caption)


read_sa1b = SA1BRows
