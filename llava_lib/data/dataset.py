"""Datasets that yield ``{"pixel_values", "caption", "url", "row_id"}``, the collates that batch them, and a
length-grouped, resumable, DDP-aware batch sampler.

:class:`CachedImageDataset` reads the local cache (training's fast path); :class:`DirectDataset` fetches each
sample from its URL (the textbook way). A sample that cannot be loaded comes back as :class:`SkippedSample`; the
collates drop it and list it under ``batch["skipped"]``, so a bad URL is counted, never replaced by another sample.
"""
from __future__ import annotations

import io
import logging
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, default_collate

from .. import process
from .cache import CacheError, shard_paths
from .fetch import FetchError, fetch_image
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
    """The image cache as a map-style dataset, ordered by ``row_id``. Only the small ``row_id``/``caption``
    columns are read up front; JPEG bytes are read lazily, a row group at a time, by each DataLoader worker."""

    def __init__(self, cache_dir, transform: Transform | None = process.clip_transform):
        self.cache_dir, self.transform = Path(cache_dir).expanduser(), transform
        self.files = [str(p) for p in shard_paths(self.cache_dir)]
        if not self.files:
            raise CacheError(f"缓存目录 {self.cache_dir} 中没有缓存分片（part-*.parquet）。请先运行 `python -m llava_lib.data "
                             f"prepare --profile full --limit 100000`（或用 `--src <数据目录> --out {self.cache_dir}` 指定目录）"
                             f"生成缓存；已经运行过的话，请看 {self.cache_dir / 'failures.jsonl'} 中的失败原因。")
        ids, where, captions = [], [], []
        for s, path in enumerate(self.files):
            meta = pq.ParquetFile(path).metadata
            t = pq.read_table(path, columns=["row_id", "caption"])
            ids.append(t.column("row_id").to_numpy())
            captions += t.column("caption").to_pylist()
            where += [(s, g, k) for g in range(meta.num_row_groups) for k in range(meta.row_group(g).num_rows)]
        order = np.argsort(np.concatenate(ids), kind="stable")
        self.row_ids = np.concatenate(ids)[order]
        self._where = np.asarray(where, np.int32)[order]  # (shard, row group, offset) of each sample
        self.captions = [captions[i] for i in order]
        self.lengths = np.fromiter(map(len, self.captions), np.int64, len(self.captions))

    def __len__(self) -> int:
        return len(self.row_ids)

    def __getstate__(self):  # each worker opens its own files and read buffers
        return {k: v for k, v in self.__dict__.items() if k != "_row_group"}

    def _columns(self, i: int):
        """JPEG bytes and url of sample ``i``, from a small per-process LRU of decoded row groups."""
        if "_row_group" not in self.__dict__:
            files = [pq.ParquetFile(f, memory_map=True) for f in self.files]
            self._row_group = lru_cache(8)(lambda s, g: files[s].read_row_group(g, columns=["jpeg", "url"]))
        s, g, k = (int(x) for x in self._where[i])
        t = self._row_group(s, g)
        return t.column("jpeg")[k].as_py(), t.column("url")[k].as_py()

    def image(self, i: int) -> Image.Image:
        """The cached 224 px image of sample ``i`` (no transform)."""
        return Image.open(io.BytesIO(self._columns(int(i))[0])).convert("RGB")

    def __getitem__(self, i: int) -> dict:
        i = range(len(self))[int(i)]  # negative i counts from the end; past the end is an IndexError
        image = self.image(i)
        return {"pixel_values": self.transform(image) if self.transform else image, "caption": self.captions[i],
                "url": self._columns(i)[1], "row_id": int(self.row_ids[i])}


class DirectDataset(Dataset):
    """Rows of an SA1B source, each image fetched when asked for (no cache); same output as the cache. Failed
    fetches come back as :class:`SkippedSample` and are counted in ``failures`` (in this process)."""

    def __init__(self, src, transform: Transform | None = process.clip_transform, *, limit: int | None = None,
                 **fetch_opts):
        reader = read_sa1b(src, limit=limit)
        self.rows = list(reader)
        if reader.stats.bad_rows:
            log.warning(reader.stats.summary())
        self.transform, self.fetch_opts, self.failures = transform, fetch_opts, Counter()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[int(i)]
        try:
            image = fetch_image(row.url, **self.fetch_opts)
        except FetchError as e:
            self.failures[e.reason] += 1
            log.warning("跳过第 %d 行（%s）：%s", row.row_id, e.reason, e.message)
            return SkippedSample(row.row_id, row.url, e.reason, e.message)
        return {"pixel_values": self.transform(image) if self.transform else image, "caption": row.caption,
                "url": row.url, "row_id": row.row_id}


def _split(samples: Sequence) -> tuple[list[dict], list[SkippedSample]]:
    return ([s for s in samples if isinstance(s, dict)], [s for s in samples if isinstance(s, SkippedSample)])


def collate_images(samples: Sequence) -> dict:
    """Tokenizer-free batch: stacked ``pixel_values`` plus lists of captions, urls, row ids, skipped samples."""
    good, skipped = _split(samples)
    # default_collate stacks straight into shared memory inside a DataLoader worker: one copy less per batch.
    pixels = default_collate([s["pixel_values"] for s in good]) if good else torch.empty(0, 3, 0, 0)
    return {"pixel_values": pixels, "captions": [s["caption"] for s in good], "urls": [s["url"] for s in good],
            "row_ids": [s["row_id"] for s in good], "skipped": skipped}


def make_collate(tokenizer, n_image_tokens: int = process.num_image_tokens(), max_text_tokens: int | None = 128,
                 prompts: Sequence[str] | None = None):
    """A DataLoader ``collate_fn``: :func:`llava_lib.process.collate` on the good samples, plus ``row_ids``,
    ``captions`` and ``skipped``; with no good sample, empty tensors and ``pixel_values`` None (the loop skips it).
    ``prompts``: instructions for caption samples, each picked by ``row_id`` (the same after a resume)."""
    def collate_fn(samples: Sequence) -> dict:
        good, skipped = _split(samples)
        good = [s if s.get("messages") or not prompts else
                {**s, "messages": process.caption_conversation(s["caption"], prompts[s["row_id"] % len(prompts)])}
                for s in good]
        if good:
            batch = process.collate(tokenizer, good, n_image_tokens, max_text_tokens)
        else:
            empty = torch.zeros((0, 0), dtype=torch.long)
            batch = {"input_ids": empty, "attention_mask": empty, "labels": empty, "pixel_values": None}
        batch.update(row_ids=[s["row_id"] for s in good], captions=[s.get("caption") for s in good], skipped=skipped)
        return batch

    return collate_fn


class LengthGroupedSampler(Sampler[list[int]]):
    """Yields lists of dataset indices (``DataLoader(ds, batch_sampler=...)``), a pure function of ``(seed, epoch)``,
    so a resumed run that passes ``start_batch`` (batches of this epoch already trained) continues exactly.

    Per epoch: shuffle, cut into mega-batches of ``batch_size * mega_batch``, sort each by length (longest first),
    cut into batches, shuffle the batch order. For DDP, batch ``b`` goes to rank ``b % world_size``; every rank gets
    the same number of batches (at most ``world_size - 1`` trailing batches are dropped).
    """

    mega_batch = 50

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, group_by_length: bool = True,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1, epoch: int = 0, start_batch: int = 0):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"需要 batch_size ≥ 1 且 0 ≤ rank < world_size，实际是 batch_size={batch_size}, "
                             f"rank={rank}, world_size={world_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.seed, self.group_by_length, self.drop_last = batch_size, seed, group_by_length, drop_last
        self.rank, self.world_size = rank, world_size
        self.set_epoch(epoch, start_batch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Call at the start of each epoch; ``start_batch`` skips batches already trained (resume)."""
        self.epoch, self.start_batch = epoch, max(0, int(start_batch))

    def batches(self) -> list[list[int]]:
        """All of this rank's batches of the current epoch, ``start_batch`` not applied."""
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n)
        if self.group_by_length and n:
            size = self.batch_size * self.mega_batch  # a stable sort keeps ties in the shuffled order
            order = np.concatenate([g[np.argsort(-self.lengths[g], kind="stable")]
                                    for g in np.split(order, range(size, n, size))])
        batches = [order[i:i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.group_by_length:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches[self.rank::self.world_size][:len(batches) // self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()[self.start_batch:]

    def __len__(self) -> int:
        return len(self.batches()[self.start_batch:])
