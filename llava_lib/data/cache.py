"""Fetch every image once, concurrently, into local parquet shards of 224 px JPEGs: training then reads local files
only, and a dead link costs one failed request once, not one per epoch.

``out`` holds ``part-NNNNN.parquet`` (row_id, url, caption, jpeg; complete shards only, written to a temp name and
renamed), ``failures.jsonl`` (row_id, url, reason, message, transient), ``cache.json`` (the source, checked on
resume) and ``summary.json``. Resuming is keyed on ``row_id``: cached rows and permanent failures are not fetched
again, transient ones (timeouts, 5xx, expired links) are. A kill loses at most the rows buffered for the next shard.
"""
from __future__ import annotations

import io
import json
import random
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from ..files import TEMP_GLOB, atomic_write_bytes, atomic_write_json
from ..process import IMAGE_SIZE, resize_square
from .fetch import EXPIRED_HINT, FetchError, fetch_bytes, fetch_image, reason_label
from .reader import Row, list_shards, read_sa1b

MANIFEST = "failures.jsonl"
JPEG_QUALITY = 90
SCHEMA = pa.schema([("row_id", pa.int64()), ("url", pa.string()), ("caption", pa.string()), ("jpeg", pa.binary())])


class CacheError(RuntimeError):
    """A cache directory that cannot be used as it is (other source, damaged shard, another writer)."""


def shard_paths(cache_dir) -> list[Path]:
    """Complete shards, in name order (temp files never match)."""
    return sorted(Path(cache_dir).glob("part-*.parquet"))


def encode_jpeg(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def cached_row_ids(cache_dir) -> set[int]:
    """Row ids held by the complete shards; a damaged shard is an error that names it."""
    ids: set[int] = set()
    for path in shard_paths(cache_dir):
        try:
            ids.update(pq.read_table(path, columns=["row_id"]).column("row_id").to_pylist())
        except (pa.ArrowException, OSError) as e:
            raise CacheError(f"缓存分片 {path} 无法读取（{e}）。请删除这个文件后重新运行 prepare，其中的图片会重新下载。") from None
    return ids


def load_failures(cache_dir) -> dict[int, dict]:
    """The failure manifest, last record per row; a torn last line (killed mid-write) is ignored."""
    path, out = Path(cache_dir) / MANIFEST, {}
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            rec = json.loads(line)
            out[int(rec["row_id"])] = rec
        except (ValueError, KeyError, TypeError):
            continue
    return out


def _done(out: Path) -> tuple[set[int], set[int]]:
    """Cached rows, and the rows not to fetch again (cached, or failed for good)."""
    done = cached_row_ids(out) if out.exists() else set()
    return done, done | {rid for rid, r in load_failures(out).items() if not r.get("transient")}


def _lock(cache_dir: Path):
    """Held while building (``with``): two builders writing one cache would duplicate rows. Not waited for: a second
    ``prepare`` is a mistake to report. The OS drops the lock when its process dies, on SIGKILL too."""
    try:
        return FileLock(cache_dir / ".lock", timeout=0).acquire()
    except Timeout:
        raise CacheError(f"另一个进程正在写入缓存目录 {cache_dir}。请等它结束，或换一个 --out 目录。") from None


_size = partial(tqdm.format_sizeof, suffix="B", divisor=1024)


@dataclass
class DownloadEstimate:
    """What ``prepare`` is about to download, estimated from a few sampled URLs fetched now."""

    rows_in_range: int
    todo: int                                       # rows not yet cached and not failed for good
    workers: int
    sampled: int = 0
    sizes: list = field(default_factory=list)       # bytes of each sampled download that arrived
    seconds: list = field(default_factory=list)     # wall time of each of those downloads
    wall_s: float = 0.0                             # the whole sample, fetched concurrently
    failed: dict = field(default_factory=dict)      # reason -> count among the sample

    @property
    def mean_bytes(self) -> float | None:
        return sum(self.sizes) / len(self.sizes) if self.sizes else None

    @property
    def total_bytes(self) -> float | None:
        return None if self.mean_bytes is None else self.mean_bytes * self.todo

    @property
    def eta_s(self) -> float | None:
        """``todo`` downloads, ``workers`` at a time, each taking the sample's mean time (bandwidth may cap it)."""
        return self.todo * sum(self.seconds) / len(self.seconds) / max(1, self.workers) if self.seconds else None

    def summary(self) -> str:
        lines = [f"下载前估算（抽样 {self.sampled} 个地址，只是估计值）：",
                 f"  范围内 {self.rows_in_range} 行，其中 {self.todo} 行还需要下载"]
        if self.todo == 0:
            return "\n".join(lines + ["  全部已完成或已判定失败，无需下载。"])
        if self.sizes:
            lines += [f"  抽样：{len(self.sizes)}/{self.sampled} 个成功，平均每张 {_size(self.mean_bytes)}，单张约 "
                      f"{sum(self.seconds) / len(self.seconds):.2f} 秒（{self.sampled} 个并发，合计 "
                      f"{_size(sum(self.sizes) / max(self.wall_s, 1e-9))}/秒）",
                      f"  预计下载约 {_size(self.total_bytes)}，按 {self.workers} 个并发约需 "
                      f"{tqdm.format_interval(self.eta_s)}（时:分:秒；实际取决于网络和图片服务器）"]
        lines += [f"  抽样中失败 {n} 个：{reason_label(r)} [{r}]" for r, n in Counter(self.failed).most_common()]
        if self.sampled and not self.sizes:
            lines.append("  抽样的地址全部失败，无法估计大小和用时；请先看上面的原因。")
        return "\n".join(lines + (["  " + EXPIRED_HINT] if self.failed.get("http_403") else []))


def _in_pool(fn, items, workers: int):
    """``(item, fn(item) or its FetchError)`` as each completes, at most ``4 * workers`` in flight (memory stays flat
    for 100k rows); what is still queued is cancelled when the caller stops early (Ctrl-C)."""
    pool, pending = ThreadPoolExecutor(max_workers=max(1, workers)), {}
    try:
        while True:
            while len(pending) < 4 * max(1, workers) and (item := next(items, None)) is not None:
                pending[pool.submit(fn, item)] = item
            if not pending:
                return
            for fut in wait(pending, return_when=FIRST_COMPLETED)[0]:
                try:
                    result = fut.result()
                except FetchError as e:
                    result = e
                yield pending.pop(fut), result
    finally:
        pool.shutdown(wait=not pending, cancel_futures=True)


def estimate_download(src, out, *, limit: int | None = None, start: int = 0, workers: int = 16, sample: int = 8,
                      **fetch_opts) -> DownloadEstimate:
    """Count the rows still to fetch into ``out`` (read, never written) and fetch ``sample`` of their URLs at once,
    without retries: mean size x rows is the download size, mean time the duration at ``workers`` at a time."""
    out, src_files = Path(out).expanduser(), list_shards(src)
    n = read_sa1b(src_files, start, limit).num_rows()
    skip = _done(out)[1]
    est = DownloadEstimate(rows_in_range=n, todo=n - sum(start <= rid < start + n for rid in skip), workers=workers)
    if est.todo == 0 or sample <= 0:
        return est
    # Up to `sample` rows still to do, spread over the range; only their urls are read.
    picked = [rid for rid in random.Random(0).sample(range(start, start + n), min(n, 4 * sample)) if rid not in skip]
    urls = pds.dataset(src_files, format="parquet").take(sorted(picked[:sample]), columns=["url"]).column("url")
    urls = [u for u in urls.to_pylist() if isinstance(u, str) and u.strip()]
    est.sampled = len(urls)

    def one(url: str) -> tuple[int, float]:
        t = time.monotonic()
        return len(fetch_bytes(url, **{**fetch_opts, "retries": 0})), time.monotonic() - t

    t0 = time.monotonic()
    for _, result in _in_pool(one, iter(urls), len(urls)):
        if isinstance(result, FetchError):
            est.failed[result.reason] = est.failed.get(result.reason, 0) + 1
        else:
            est.sizes.append(result[0])
            est.seconds.append(result[1])
    est.wall_s = time.monotonic() - t0
    return est


@dataclass
class CacheReport:
    out: str
    rows_in_range: int = 0          # source rows in [start, start + limit), bad ones included
    cached_total: int = 0           # rows in the cache now
    cached_new: int = 0             # fetched in this run
    already_done: int = 0           # skipped: cached or failed permanently before this run
    failed_new: dict = field(default_factory=dict)  # reason -> count, this run (bad rows included)
    failed_total: int = 0           # rows in the manifest now
    elapsed_s: float = 0.0
    images_per_s: float = 0.0
    complete: bool = False          # False after an interrupt

    def summary(self) -> str:
        lines = [f"缓存目录：{self.out}",
                 f"  范围内的行：{self.rows_in_range}；缓存中共有 {self.cached_total} 张图片"
                 f"（本次新增 {self.cached_new}，此前已完成/已判定失败 {self.already_done}）",
                 f"  本次失败 {sum(self.failed_new.values())} 行；失败清单共 {self.failed_total} 行（{MANIFEST}）"]
        lines += [f"    {reason_label(r)} [{r}]：{n}" for r, n in Counter(self.failed_new).most_common()]
        if self.failed_new.get("http_403"):
            lines.append("  " + EXPIRED_HINT)
        return "\n".join(lines + [f"  用时 {self.elapsed_s:.1f} 秒，{self.images_per_s:.1f} 张/秒"
                                  + ("" if self.complete else "；未完成：再次运行同一命令即可继续")])


def prepare_cache(src, out, *, limit: int | None = None, start: int = 0, workers: int = 16, shard_rows: int = 2048,
                  progress: bool = True, **fetch_opts) -> CacheReport:
    """Build (or resume) the image cache of rows ``[start, start + limit)`` of ``src`` in ``out``; ``fetch_opts``
    go to :func:`~llava_lib.data.fetch.fetch_bytes` (timeout, retries, backoff, max_bytes, url_rewrite)."""
    t0, out = time.monotonic(), Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    with _lock(out):
        for stale in out.glob(TEMP_GLOB):  # torn writes of a killed run
            stale.unlink(missing_ok=True)
        src_files = list_shards(src)
        meta = dict(format=1, source=[p.name for p in src_files], image_size=IMAGE_SIZE, quality=JPEG_QUALITY)
        old = json.loads((out / "cache.json").read_text(encoding="utf-8")) if (out / "cache.json").exists() else meta
        for key in ("format", "source", "image_size"):
            if old.get(key) != meta[key]:
                raise CacheError(f"缓存目录 {out} 是用不同的设置生成的（{key}：原来是 {old.get(key)}，现在是 {meta[key]}）。"
                                 f"请换一个 --out 目录，或删除该目录后重新生成。")
        atomic_write_json(out / "cache.json", old)
        done, skip = _done(out)
        records = load_failures(out)
        manifest = open(out / MANIFEST, "a", encoding="utf-8")  # one flushed line per failure, compacted at the end
        report, failed = CacheReport(out=str(out)), Counter()
        rows = read_sa1b(src_files, start, limit)
        report.rows_in_range = rows.num_rows()
        report.already_done = sum(start <= rid < start + report.rows_in_range for rid in skip)
        bar = tqdm(total=report.rows_in_range - report.already_done, desc="缓存图片", unit="张", disable=not progress,
                   dynamic_ncols=True)

        def fail(row_id: int, url: str, reason: str, message: str, transient: bool = False) -> None:
            if row_id in skip:  # a bad row found again on resume
                return
            records[row_id] = dict(row_id=row_id, url=url, reason=reason, message=message, transient=transient)
            manifest.write(json.dumps(records[row_id], ensure_ascii=False) + "\n")
            manifest.flush()
            failed[reason] += 1
            bar.update(1)

        def fetch_encode(row: Row) -> bytes:
            image = fetch_image(row.url, **fetch_opts)
            try:
                return encode_jpeg(resize_square(image))
            except Exception as e:  # decodes but cannot be resized: still one bad sample
                raise FetchError("decode_error", f"{row.url} 无法缩放或编码：{type(e).__name__}: {e}", row.url) from None

        rows.on_bad = lambda row_id, url, message: fail(row_id, url, "bad_row", message)
        names = [p.stem[5:] for p in shard_paths(out)]
        index = max((int(n) for n in names if n.isdigit()), default=-1) + 1
        buffered, nbytes = [], 0

        def flush() -> None:
            """Sorted rows in small row groups (random access reads ~1 MB, not a whole shard); JPEG bytes are
            incompressible, so no dictionary, compression or statistics for them."""
            nonlocal buffered, nbytes, index
            if not buffered:
                return
            table = pa.table([pa.array(c, t.type) for c, t in zip(zip(*sorted(buffered)), SCHEMA)], schema=SCHEMA)
            buf = pa.BufferOutputStream()
            pq.write_table(table, buf, row_group_size=64, use_dictionary=False, write_statistics=["row_id"],
                           compression={"row_id": "zstd", "url": "zstd", "caption": "zstd", "jpeg": "none"})
            try:
                atomic_write_bytes(out / f"part-{index:05d}.parquet", buf.getvalue().to_pybytes())
            except OSError as e:
                raise CacheError(f"写入缓存分片 part-{index:05d}.parquet 失败（{e}）。请检查磁盘空间和写权限；"
                                 f"已写完的分片不受影响，重新运行同一命令即可继续。") from None
            done.update(r[0] for r in buffered)
            buffered, nbytes, index = [], 0, index + 1

        try:
            for row, result in _in_pool(fetch_encode, (r for r in rows if r.row_id not in skip), workers):
                if isinstance(result, FetchError):
                    fail(row.row_id, row.url, result.reason, result.message, result.transient)
                else:
                    buffered.append((row.row_id, row.url, row.caption, result))
                    nbytes += len(result)
                    report.cached_new += 1
                    bar.update(1)
                if len(buffered) >= shard_rows or nbytes >= 64 << 20:  # a large --shard-rows must not fill the memory
                    flush()
                bar.set_postfix_str(f"失败 {sum(failed.values())}", refresh=False)
            report.complete = True
        finally:
            flush()  # on Ctrl-C too: what was fetched is kept
            bar.close()
            manifest.close()
            if report.complete:  # drop rows that are cached now (a transient failure that later succeeded)
                records = {rid: r for rid, r in sorted(records.items()) if rid not in done}
                atomic_write_bytes(out / MANIFEST, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                           for r in records.values()).encode())
            report.cached_total, report.failed_new = len(done), dict(failed)
            report.failed_total = sum(rid not in done for rid in records)
            report.elapsed_s = time.monotonic() - t0
            report.images_per_s = report.cached_new / max(report.elapsed_s, 1e-9)
            atomic_write_json(out / "summary.json", asdict(report))
        return report
