"""Datasets that yield ``{"pixel_values", "caption", "url", "row_id"}``, and the collates that batch them.

:class:`CachedImageDataset` reads the local cache (the fast path for training); :class:`DirectDataset` fetches
each sample from its URL (the textbook way, fine for a quick look). A sample that cannot be fetched is
returned as :class:`SkippedSample`; the collates drop it and report it under ``batch["skipped"]``, so a bad
URL is counted, never silently replaced by another sample.
"""
from __future__ import annotations

import io
import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from .. import process
from .cache import CacheError, shard_paths
from .fetch import DEFAULT_MAX_BYTES, DEFAULT_RETRIES, FetchError, fetch_image
from .reader import read_sa1b

log = logging.getLogger(__name__)
Transform = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class SkippedSample:
    """Stands in for a sample that could not be loaded; collates drop it and list it in ``batch["skipped"]``."""

    row_id: int
    url: str
    reason: str
    message: str


class CachedImageDataset(Dataset):
    """The image cache as a map-style dataset, ordered by ``row_id``.

    ``__init__`` reads only the small ``row_id``/``caption`` columns to build the index; JPEG bytes are read
    lazily, one row group at a time, through file handles that each DataLoader worker opens for itself.
    """

    def __init__(self, cache_dir, transform: Transform | None = process.clip_transform, row_groups_cached: int = 8):
        self.cache_dir = Path(cache_dir).expanduser()
        self.files = [str(p) for p in shard_paths(self.cache_dir)]
        if not self.files:
            raise CacheError(f"缓存目录 {self.cache_dir} 中没有缓存分片（part-*.parquet）。"
                             f"请先运行 `python -m llava_lib.data prepare --profile full --limit 100000` 生成缓存"
                             f"（或者用 `--src <数据目录> --out {self.cache_dir} --limit 100000` 指定目录）；"
                             f"如果已经运行过，请查看 {self.cache_dir / 'failures.jsonl'} 中的失败原因。")
        self.transform = transform
        self.row_groups_cached = row_groups_cached
        ids, shard, group, offset, captions = [], [], [], [], []
        for s, path in enumerate(self.files):
            pf = pq.ParquetFile(path)
            t = pf.read(columns=["row_id", "caption"])
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            ids.append(t.column("row_id").to_numpy())
            captions.extend(t.column("caption").to_pylist())
            shard.append(np.full(t.num_rows, s, np.int32))
            group.append(np.repeat(np.arange(len(sizes), dtype=np.int32), sizes))
            offset.append(np.concatenate([np.arange(n, dtype=np.int32) for n in sizes]))
        ids = np.concatenate(ids)
        order = np.argsort(ids, kind="stable")
        self.row_ids = ids[order]
        self._shard = np.concatenate(shard)[order]
        self._group = np.concatenate(group)[order]
        self._offset = np.concatenate(offset)[order]
        self.captions = [captions[i] for i in order]
        self.lengths = np.fromiter((len(c) for c in self.captions), np.int64, len(self.captions))
        self._handles: dict[int, pq.ParquetFile] = {}
        self._groups: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self.row_ids)

    def __getstate__(self):  # open files and read buffers stay in the process that opened them
        state = dict(self.__dict__)
        state["_handles"], state["_groups"] = {}, OrderedDict()
        return state

    def _row_group(self, shard: int, group: int):
        key = (shard, group)
        hit = self._groups.get(key)
        if hit is not None:
            self._groups.move_to_end(key)
            return hit
        pf = self._handles.get(shard)
        if pf is None:
            pf = self._handles[shard] = pq.ParquetFile(self.files[shard], memory_map=True)
        t = pf.read_row_group(group, columns=["jpeg", "url"])
        hit = (t.column("jpeg"), t.column("url"))
        self._groups[key] = hit
        if len(self._groups) > self.row_groups_cached:
            self._groups.popitem(last=False)
        return hit

    def image(self, i: int) -> Image.Image:
        """The cached 224 px image of sample ``i`` (no transform)."""
        jpeg, _ = self._row_group(int(self._shard[i]), int(self._group[i]))
        return Image.open(io.BytesIO(jpeg[int(self._offset[i])].as_py())).convert("RGB")

    def __getitem__(self, i: int) -> dict:
        i = int(i) + (len(self) if int(i) < 0 else 0)
        image = self.image(i)
        _, urls = self._row_group(int(self._shard[i]), int(self._group[i]))
        return {"pixel_values": self.transform(image) if self.transform else image,
                "caption": self.captions[i], "url": urls[int(self._offset[i])].as_py(), "row_id": int(self.row_ids[i])}


class DirectDataset(Dataset):
    """Rows of an SA1B source, each image fetched when asked for (no cache). Same output as the cache.

    Failed fetches come back as :class:`SkippedSample` and are counted in ``failures`` (in this process).
    """

    def __init__(self, src, transform: Transform | None = process.clip_transform, *, start: int = 0,
                 limit: int | None = None, url_rewrite: tuple[str, str] | None = None, timeout: float = 20.0,
                 retries: int = DEFAULT_RETRIES, backoff: float = 0.5, max_bytes: int = DEFAULT_MAX_BYTES):
        reader = read_sa1b(src, start, limit)
        self.rows = list(reader)
        self.read_stats = reader.stats
        if reader.stats.bad_rows:
            log.warning(reader.stats.summary())
        self.transform = transform
        self.fetch_opts = dict(timeout=timeout, retries=retries, backoff=backoff, max_bytes=max_bytes,
                               url_rewrite=url_rewrite)
        self.captions = [r.caption for r in self.rows]
        self.row_ids = np.asarray([r.row_id for r in self.rows], np.int64)
        self.lengths = np.fromiter((len(c) for c in self.captions), np.int64, len(self.captions))
        self.failures: Counter = Counter()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[int(i)]
        try:
            image = fetch_image(row.url, **self.fetch_opts)
            pixels = self.transform(image) if self.transform else image
        except FetchError as e:
            self.failures[e.reason] += 1
            log.warning("跳过第 %d 行（%s）：%s", row.row_id, e.reason, e.message)
            return SkippedSample(row.row_id, row.url, e.reason, e.message)
        return {"pixel_values": pixels, "caption": row.caption, "url": row.url, "row_id": row.row_id}


# ------------------------------------------------------------------------------------------ collates
def _split(samples: Sequence) -> tuple[list[dict], list[SkippedSample]]:
    good = [s for s in samples if not isinstance(s, SkippedSample) and s is not None]
    return good, [s for s in samples if isinstance(s, SkippedSample)]


def collate_images(samples: Sequence) -> dict:
    """Tokenizer-free batch: stacked ``pixel_values`` plus lists of captions, urls, row ids, skipped samples."""
    good, skipped = _split(samples)
    # default_collate stacks straight into shared memory inside a DataLoader worker: one copy less per batch.
    pixels = default_collate([s["pixel_values"] for s in good]) if good else torch.empty(0, 3, 0, 0)
    return {"pixel_values": pixels,
            "captions": [s["caption"] for s in good], "urls": [s["url"] for s in good],
            "row_ids": [s["row_id"] for s in good], "skipped": skipped}


def make_collate(tokenizer, n_image_tokens: int = process.num_image_tokens(), max_text_tokens: int | None = 128,
                 prompt: str = process.DEFAULT_PROMPT):
    """A DataLoader ``collate_fn``: :func:`llava_lib.process.collate` on the good samples, plus bookkeeping.

    The batch has ``input_ids``, ``attention_mask``, ``labels``, ``pixel_values`` (from ``process.collate``),
    ``row_ids``, ``captions`` and ``skipped``. If every sample of a batch was skipped, the tensors are empty
    (``input_ids.shape == (0, 0)``) and ``pixel_values`` is None: a training loop skips such a batch.
    """
    def collate_fn(samples: Sequence) -> dict:
        good, skipped = _split(samples)
        if good:
            batch = process.collate(tokenizer, good, n_image_tokens, max_text_tokens, prompt)
        else:
            empty = torch.zeros((0, 0), dtype=torch.long)
            batch = {"input_ids": empty, "attention_mask": empty.clone(), "labels": empty.clone(),
                     "pixel_values": None}
        batch.update(row_ids=[s["row_id"] for s in good], captions=[s["caption"] for s in good], skipped=skipped)
        return batch

    return collate_fn
