"""Read SA1B-Dense-Caption parquet shards as ``Row(row_id, url, caption)``.

Only the ``url`` and ``cap_seg`` columns are read (column projection), one record batch at a time, so a worker
never holds a whole dataframe. ``row_id`` is the global row index across the shards in sorted order; it is the
key that the cache, the failure manifest and the datasets share, so it counts bad rows too.
"""
from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

COLUMNS = ("url", "cap_seg")
BATCH_ROWS = 1024
MAX_PROBLEMS_KEPT = 50  # messages kept in ReadStats.problems; the count is always complete


class DataFormatError(ValueError):
    """A source that cannot be read at all: no shards, or a shard without a required column."""


@dataclass(frozen=True)
class Row:
    row_id: int
    url: str
    caption: str


@dataclass
class ReadStats:
    rows: int = 0          # good rows yielded
    bad_rows: int = 0      # rows skipped because their url / cap_seg could not be used
    problems: list[str] = field(default_factory=list)  # the first MAX_PROBLEMS_KEPT messages

    def summary(self) -> str:
        text = f"读取 {self.rows} 行，跳过坏行 {self.bad_rows} 行"
        return text + (f"（例如：{self.problems[0]}）" if self.problems else "")


def list_shards(src) -> list[Path]:
    """``src`` is a dataset root (``{root}/data/*.parquet``), a directory of parquet files, one file, or a list."""
    if isinstance(src, (str, Path)):
        p = Path(src).expanduser()
        if p.is_dir():
            files = sorted((p / "data").glob("*.parquet")) or sorted(p.glob("*.parquet"))
        else:
            files = [p]
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
        text = value.strip()
        try:
            value = json.loads(text)
        except ValueError:
            try:  # literal_eval only builds literals: no code runs, unlike eval
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                raise ValueError("cap_seg 既不是 JSON 也不是 Python 字面量，无法解析") from None
    if not isinstance(value, dict):
        raise ValueError(f"cap_seg 应为字典，实际是 {type(value).__name__}")
    caption = value.get("global_caption")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError("cap_seg 中没有非空的 global_caption")
    return caption.strip()


def _check_columns(path: Path, schema: pa.Schema) -> None:
    missing = [c for c in COLUMNS if c not in schema.names]
    if missing:
        raise DataFormatError(
            f"{path} 缺少列 {', '.join(missing)}（现有列：{', '.join(schema.names)}）。"
            f"SA1B-Dense-Caption 的 parquet 应包含 url 和 cap_seg 两列；请确认数据来源是否正确。")


def _captions(column: pa.Array) -> list:
    """A struct column gives just its ``global_caption`` field (no nested lists copied); others as Python objects."""
    if pa.types.is_struct(column.type) and column.type.get_field_index("global_caption") >= 0:
        return [None if c is None else {"global_caption": c}
                for c in column.field("global_caption").to_pylist()]
    return column.to_pylist()


OnBad = Callable[[int, str, str], None]  # (row_id, url, message)


class SA1BRows:
    """Iterable of :class:`Row` over ``[start, start + limit)`` global rows; ``stats`` fills while iterating."""

    def __init__(self, src, start: int = 0, limit: int | None = None, on_bad: OnBad | None = None):
        self.files = list_shards(src)
        self.start = max(0, int(start))
        self.stop = None if limit is None else self.start + max(0, int(limit))
        self.on_bad = on_bad
        self.stats = ReadStats()

    def num_rows(self) -> int:
        """Rows in range (bad ones included), from parquet metadata only."""
        total = sum(pq.ParquetFile(f).metadata.num_rows for f in self.files)
        end = total if self.stop is None else min(total, self.stop)
        return max(0, end - self.start)

    def _bad(self, path: Path, local: int, row_id: int, url, problem: str) -> None:
        msg = f"{path.name} 第 {local} 行（全局行号 {row_id}）：{problem}，已跳过"
        self.stats.bad_rows += 1
        if len(self.stats.problems) < MAX_PROBLEMS_KEPT:
            self.stats.problems.append(msg)
        if self.on_bad is not None:
            self.on_bad(row_id, url if isinstance(url, str) else "", msg)

    def __iter__(self) -> Iterator[Row]:
        offset = 0  # global row_id of the current file's first row
        for path in self.files:
            pf = pq.ParquetFile(path)
            _check_columns(path, pf.schema_arrow)
            n = pf.metadata.num_rows
            if offset + n <= self.start:
                offset += n
                continue
            if self.stop is not None and offset >= self.stop:
                return
            # Skip whole row groups before `start` without reading them.
            groups, first = [], offset
            for g in range(pf.metadata.num_row_groups):
                g_rows = pf.metadata.row_group(g).num_rows
                if first + g_rows <= self.start and not groups:
                    first += g_rows
                    continue
                groups.append(g)
            row_id = first
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=groups, columns=list(COLUMNS)):
                urls = batch.column("url").to_pylist()
                caps = _captions(batch.column("cap_seg"))
                for url, cap in zip(urls, caps):
                    rid, row_id = row_id, row_id + 1
                    if rid < self.start:
                        continue
                    if self.stop is not None and rid >= self.stop:
                        return
                    if not isinstance(url, str) or not url.strip():
                        self._bad(path, rid - offset, rid, url, "url 为空")
                        continue
                    try:
                        caption = parse_cap_seg(cap)
                    except ValueError as e:
                        self._bad(path, rid - offset, rid, url, str(e))
                        continue
                    self.stats.rows += 1
                    yield Row(rid, url.strip(), caption)
            offset += n


def read_sa1b(src, start: int = 0, limit: int | None = None, on_bad: OnBad | None = None) -> SA1BRows:
    """Rows ``start <= row_id < start + limit`` of an SA1B-Dense-Caption source; bad rows skipped and counted.

    ``limit`` counts source rows (bad ones too), so "the first N rows" means the same rows for the cache, the
    direct dataset and a resumed run.
    """
    return SA1BRows(src, start, limit, on_bad)


def read_rows(src: Sequence | str | Path, start: int = 0, limit: int | None = None) -> tuple[list[Row], ReadStats]:
    """All rows of the range as a list, with the stats (for small sources and tests)."""
    rows = read_sa1b(src, start, limit)
    return list(rows), rows.stats
