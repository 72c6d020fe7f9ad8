"""Fetch every image once, concurrently, into local parquet shards of 224 px JPEGs.

Training then reads local files only: no network in the training loop, and a dead link costs one failed request
once, not one per epoch.

On disk (``out``)::

    part-00000.parquet ...   row_id, url, caption, jpeg   (complete shards only; written to a temp name, renamed)
    failures.jsonl           one JSON line per failed row: row_id, url, reason, message, transient
    cache.json               what the cache was built from (checked on resume)
    summary.json             the last run's summary

Resuming is keyed on ``row_id``: rows in a complete shard, and rows that failed permanently (404, not an image
...), are not fetched again; rows that failed transiently (timeouts, 5xx) are retried. A kill at any moment
loses at most the rows buffered for the next shard, never a written one, and never duplicates a row.
"""
from __future__ import annotations

import io
import json
import os
import random
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from ..process import IMAGE_SIZE, resize_square
from .fetch import (DEFAULT_MAX_BYTES, DEFAULT_RETRIES, REFRESH_LINKS_CMD, FetchError, fetch_bytes, fetch_image,
                    reason_label)
from .reader import Row, list_shards, read_sa1b

FORMAT_VERSION = 1
SHARD_PREFIX = "part-"
MANIFEST = "failures.jsonl"
META = "cache.json"
SUMMARY = "summary.json"
SCHEMA = pa.schema([("row_id", pa.int64()), ("url", pa.string()), ("caption", pa.string()), ("jpeg", pa.binary())])
ROW_GROUP_ROWS = 64  # small row groups: random access in the dataset reads ~1 MB, not a whole shard


class CacheError(RuntimeError):
    """A cache directory that cannot be used as it is (other source, damaged shard, another writer)."""


def shard_paths(cache_dir) -> list[Path]:
    """Complete shards, in name order (temp files never match)."""
    return sorted(Path(cache_dir).glob(f"{SHARD_PREFIX}*.parquet"))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every OS; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def encode_jpeg(image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ on-disk state
def cached_row_ids(cache_dir) -> set[int]:
    """Row ids held by the complete shards; a damaged shard is an error that names it."""
    ids: set[int] = set()
    for path in shard_paths(cache_dir):
        try:
            ids.update(pq.read_table(path, columns=["row_id"]).column("row_id").to_pylist())
        except (pa.ArrowException, OSError) as e:
            raise CacheError(f"缓存分片 {path} 无法读取（{e}）。请删除这个文件后重新运行 prepare，"
                             f"其中的图片会重新下载。") from None
    return ids


def load_failures(cache_dir) -> dict[int, dict]:
    """The failure manifest, last record per row; a torn last line (killed mid-write) is ignored."""
    path = Path(cache_dir) / MANIFEST
    out: dict[int, dict] = {}
    if not path.exists():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                out[int(rec["row_id"])] = rec
            except (ValueError, KeyError, TypeError):
                continue
    return out


class _Manifest:
    """Append-only while running (one flushed line per failure), compacted at the end."""

    def __init__(self, cache_dir: Path):
        self.path = cache_dir / MANIFEST
        self.records = load_failures(cache_dir)
        self._f = open(self.path, "a", encoding="utf-8")

    def record(self, row_id: int, url: str, reason: str, message: str, transient: bool) -> None:
        rec = dict(row_id=row_id, url=url, reason=reason, message=message, transient=transient)
        self.records[row_id] = rec
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()

    def compact(self, cached: set[int]) -> None:
        """Rewrite without rows that are cached now (a transient failure that later succeeded)."""
        self._f.close()
        keep = [r for rid, r in sorted(self.records.items()) if rid not in cached]
        self.records = {r["row_id"]: r for r in keep}
        atomic_write_bytes(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep).encode())

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


class _ShardWriter:
    """Buffers fetched rows; writes a shard (temp name, fsync, rename) when rows or bytes reach the bound."""

    def __init__(self, cache_dir: Path, shard_rows: int, shard_bytes: int):
        self.dir, self.shard_rows, self.shard_bytes = cache_dir, shard_rows, shard_bytes
        names = [p.stem[len(SHARD_PREFIX):] for p in shard_paths(cache_dir)]
        self.next_index = max((int(n) for n in names if n.isdigit()), default=-1) + 1
        self.rows: list[tuple[int, str, str, bytes]] = []
        self.nbytes = 0
        self.written: set[int] = set()

    def add(self, row: Row, jpeg: bytes) -> None:
        self.rows.append((row.row_id, row.url, row.caption, jpeg))
        self.nbytes += len(jpeg)
        if len(self.rows) >= self.shard_rows or self.nbytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        self.rows.sort()
        cols = list(zip(*self.rows))
        table = pa.table([pa.array(c, t.type) for c, t in zip(cols, SCHEMA)], schema=SCHEMA)
        final = self.dir / f"{SHARD_PREFIX}{self.next_index:05d}.parquet"
        tmp = self.dir / f".{final.name}.tmp-{os.getpid()}"
        try:
            # JPEG bytes are unique and incompressible: no dictionary, no compression, no min/max statistics.
            pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS, use_dictionary=False,
                           write_statistics=["row_id"],
                           compression={"row_id": "zstd", "url": "zstd", "caption": "zstd", "jpeg": "none"})
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise CacheError(f"写入缓存分片 {final} 失败（{e}）。请检查磁盘空间和写权限；"
                             f"已写完的分片不受影响，重新运行同一命令即可继续。") from None
        _fsync_dir(self.dir)
        self.written.update(cols[0])
        self.next_index += 1
        self.rows, self.nbytes = [], 0


def _lock(cache_dir: Path) -> FileLock:
    """An exclusive lock on the cache dir: two builders writing one cache would duplicate rows.

    Not waited for: a second ``prepare`` on the same directory is a mistake to report, not to queue. The operating
    system drops the lock when its process dies, also on SIGKILL, so a killed run never leaves the directory locked.
    """
    lock = FileLock(cache_dir / ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise CacheError(f"另一个进程正在写入缓存目录 {cache_dir}。请等它结束，或换一个 --out 目录。") from None
    return lock


def _check_meta(cache_dir: Path, src_files: list[Path], image_size: int, quality: int) -> None:
    meta = dict(format=FORMAT_VERSION, source=[p.name for p in src_files], image_size=image_size, quality=quality)
    path = cache_dir / META
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        for key in ("format", "source", "image_size"):
            if old.get(key) != meta[key]:
                raise CacheError(
                    f"缓存目录 {cache_dir} 是用不同的设置生成的（{key}：原来是 {old.get(key)}，现在是 {meta[key]}）。"
                    f"请换一个 --out 目录，或删除该目录后重新生成。")
        return
    atomic_write_bytes(path, json.dumps(meta, ensure_ascii=False, indent=1).encode())


# ------------------------------------------------------------------------------------------ the estimate
def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _human_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} 秒"
    if s < 90 * 60:
        return f"{s / 60:.0f} 分钟"
    return f"{s / 3600:.1f} 小时"


@dataclass
class DownloadEstimate:
    """What ``prepare`` is about to download, estimated from a few sampled URLs fetched now."""

    rows_in_range: int
    todo: int                       # rows not yet cached and not failed for good
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
        if not self.seconds:
            return None
        return self.todo * (sum(self.seconds) / len(self.seconds)) / max(1, self.workers)

    def summary(self) -> str:
        lines = [f"下载前估算（抽样 {self.sampled} 个地址，只是估计值）：",
                 f"  范围内 {self.rows_in_range} 行，其中 {self.todo} 行还需要下载"]
        if self.todo == 0:
            lines.append("  全部已完成或已判定失败，无需下载。")
            return "\n".join(lines)
        if self.sizes:
            rate = sum(self.sizes) / max(self.wall_s, 1e-9)
            lines.append(f"  抽样：{len(self.sizes)}/{self.sampled} 个成功，平均每张 {_human_bytes(self.mean_bytes)}，"
                         f"单张约 {sum(self.seconds) / len(self.seconds):.2f} 秒（抽样时 {self.sampled} 个并发，"
                         f"合计 {_human_bytes(rate)}/秒）")
            lines.append(f"  预计下载约 {_human_bytes(self.total_bytes)}，按 {self.workers} 个并发约需 "
                         f"{_human_seconds(self.eta_s)}（实际取决于网络和图片服务器）")
        for reason, n in sorted(self.failed.items(), key=lambda kv: -kv[1]):
            lines.append(f"  抽样中失败 {n} 个：{reason_label(reason)} [{reason}]")
        if self.sampled and not self.sizes:
            lines.append("  抽样的地址全部失败，无法估计大小和用时；请先看上面的原因。")
        if self.failed.get("http_403"):
            lines.append(f"  HTTP 403 多半表示链接已过期（SA-1B 的图片地址是带签名的临时链接）：运行 "
                         f"`{REFRESH_LINKS_CMD}` 重新下载数据分片可以得到新链接。")
        return "\n".join(lines)


def _sample_urls(src_files: list[Path], start: int, stop: int, skip: set[int], k: int, seed: int) -> list[str]:
    """Up to ``k`` URLs of rows in ``[start, stop)`` not in ``skip``, spread over the range; only the ``url``
    column of the shards that hold them is read."""
    rng = random.Random(seed)
    n = stop - start
    candidates = rng.sample(range(start, stop), min(n, 4 * k)) if n > 0 else []
    picked = sorted([rid for rid in candidates if rid not in skip][:k])  # candidates come in random order
    urls, offset = [], 0
    for path in src_files:
        rows = pq.ParquetFile(path).metadata.num_rows
        mine = [rid - offset for rid in picked if offset <= rid < offset + rows]
        if mine:
            column = pq.read_table(path, columns=["url"]).column("url")
            urls.extend(u for u in (column[i].as_py() for i in mine) if isinstance(u, str) and u.strip())
        offset += rows
        if offset >= stop:
            break
    return urls


def estimate_download(src, out, *, limit: int | None = None, start: int = 0, workers: int = 16, sample: int = 8,
                      url_rewrite: tuple[str, str] | None = None, timeout: float = 20.0,
                      max_bytes: int = DEFAULT_MAX_BYTES, seed: int = 0) -> DownloadEstimate:
    """Count the rows still to fetch into ``out`` and fetch ``sample`` of their URLs (all at once, no retries):
    their mean size times the rows gives the download size, their mean time the duration at ``workers`` at a time.
    Reads ``out`` without writing to it."""
    out = Path(out).expanduser()
    src_files = list_shards(src)
    rows = read_sa1b(src_files, start, limit)
    n = rows.num_rows()
    skip: set[int] = set()
    if out.exists():
        skip = cached_row_ids(out) | {rid for rid, r in load_failures(out).items() if not r.get("transient")}
    stop = start + n
    est = DownloadEstimate(rows_in_range=n, todo=n - sum(1 for rid in skip if start <= rid < stop), workers=workers)
    if est.todo == 0 or sample <= 0:
        return est
    urls = _sample_urls(src_files, start, stop, skip, sample, seed)
    est.sampled = len(urls)

    def one(url: str) -> tuple[int, float]:
        t = time.monotonic()
        data = fetch_bytes(url, timeout=timeout, max_bytes=max_bytes, retries=0, url_rewrite=url_rewrite)
        return len(data), time.monotonic() - t

    failed = Counter()
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, len(urls)), thread_name_prefix="estimate") as pool:
        for fut in [pool.submit(one, u) for u in urls]:
            try:
                size, seconds = fut.result()
                est.sizes.append(size)
                est.seconds.append(seconds)
            except FetchError as e:
                failed[e.reason] += 1
    est.wall_s = time.monotonic() - t0
    est.failed = dict(failed)
    return est


# ------------------------------------------------------------------------------------------ the builder
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
        for reason, n in sorted(self.failed_new.items(), key=lambda kv: -kv[1]):
            lines.append(f"    {reason_label(reason)} [{reason}]：{n}")
        if self.failed_new.get("http_403"):
            lines.append(f"  HTTP 403 多半表示图片链接已过期：SA-1B 的图片地址是带签名的临时链接。请运行 "
                         f"`{REFRESH_LINKS_CMD}` 重新下载数据分片得到新链接，再运行同一个 prepare 命令（这些行会重试）。")
        lines.append(f"  用时 {self.elapsed_s:.1f} 秒，{self.images_per_s:.1f} 张/秒" +
                     ("" if self.complete else "；未完成：再次运行同一命令即可继续"))
        return "\n".join(lines)


def _fetch_encode(row: Row, opts: dict, image_size: int, quality: int) -> bytes:
    image = fetch_image(row.url, **opts)
    try:
        return encode_jpeg(resize_square(image, image_size), quality)
    except Exception as e:  # an image that decodes but cannot be resized is still one bad sample
        raise FetchError("decode_error", f"{row.url} 无法缩放或编码：{type(e).__name__}: {e}", row.url) from None


def prepare_cache(src, out, *, limit: int | None = None, start: int = 0, workers: int = 16,
                  shard_rows: int = 2048, shard_bytes: int = 64 << 20, url_rewrite: tuple[str, str] | None = None,
                  timeout: float = 20.0, retries: int = DEFAULT_RETRIES, backoff: float = 0.5,
                  max_bytes: int = DEFAULT_MAX_BYTES, image_size: int = IMAGE_SIZE, quality: int = 90,
                  progress: bool = True) -> CacheReport:
    """Build (or resume) the image cache of rows ``[start, start + limit)`` of ``src`` in ``out``."""
    t0 = time.monotonic()
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        for stale in out.glob(".*.tmp-*"):  # torn writes of a killed run (shards, manifest, summary)
            stale.unlink(missing_ok=True)
        src_files = list_shards(src)
        _check_meta(out, src_files, image_size, quality)
        done = cached_row_ids(out)
        manifest = _Manifest(out)
        skip = done | {rid for rid, r in manifest.records.items() if not r.get("transient")}
        report = CacheReport(out=str(out))
        failed = Counter()

        rows = read_sa1b(src_files, start, limit)
        report.rows_in_range = rows.num_rows()
        stop = start + report.rows_in_range
        report.already_done = sum(1 for rid in skip if start <= rid < stop)
        bar = tqdm(total=report.rows_in_range - report.already_done, desc="缓存图片", unit="张",
                   disable=not progress, dynamic_ncols=True)

        def on_bad(row_id: int, url: str, message: str) -> None:
            if row_id in skip:
                return
            manifest.record(row_id, url, "bad_row", message, False)
            failed["bad_row"] += 1
            bar.update(1)

        rows.on_bad = on_bad
        writer = _ShardWriter(out, shard_rows, shard_bytes)
        opts = dict(timeout=timeout, max_bytes=max_bytes, retries=retries, backoff=backoff, url_rewrite=url_rewrite)
        todo = (r for r in rows if r.row_id not in skip)
        window = max(1, workers) * 4  # bounded in-flight work: memory stays flat for 100k rows
        pending: dict = {}
        pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="fetch")
        try:
            def refill() -> None:
                while len(pending) < window:
                    row = next(todo, None)
                    if row is None:
                        return
                    pending[pool.submit(_fetch_encode, row, opts, image_size, quality)] = row

            refill()
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    row = pending.pop(fut)
                    try:
                        writer.add(row, fut.result())
                        report.cached_new += 1
                    except FetchError as e:
                        manifest.record(row.row_id, row.url, e.reason, e.message, e.transient)
                        failed[e.reason] += 1
                    bar.update(1)
                bar.set_postfix_str(f"失败 {sum(failed.values())}", refresh=False)
                refill()
            report.complete = True
        finally:
            pool.shutdown(wait=report.complete, cancel_futures=True)
            writer.flush()  # on Ctrl-C too: what was fetched is kept
            bar.close()
            done |= writer.written
            if report.complete:
                manifest.compact(done)
            manifest.close()
            report.cached_total = len(done)
            report.failed_new = dict(failed)
            report.failed_total = len({rid for rid in manifest.records if rid not in done})
            report.elapsed_s = time.monotonic() - t0
            report.images_per_s = report.cached_new / max(report.elapsed_s, 1e-9)
            atomic_write_bytes(out / SUMMARY, json.dumps(asdict(report), ensure_ascii=False, indent=1).encode())
        return report
    finally:
        lock.release()
