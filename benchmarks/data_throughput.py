"""Direct per-sample fetching (the textbook way) vs. reading the image cache, same rows, same DataLoader.

Serves N synthetic photos over loopback (127.0.0.1), then in one run measures samples/s of
``DataLoader(DirectDataset)`` (fetch + decode + CLIP transform per sample, every epoch) and of
``DataLoader(CachedImageDataset)`` (decode a 224 px JPEG + transform), and prints the ratio. Loopback has no
network latency, so the direct figure is an upper bound for a real host (``--latency-ms`` adds some).

    python benchmarks/data_throughput.py [--rows 512] [--workers 2] [--batch-size 32] [--source-size 1024]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # fakes: the loopback image server

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from llava_lib.data import CachedImageDataset, DirectDataset, collate_images, prepare_cache  # noqa: E402
from fakes import ImageServer, scene_captions, scene_jpegs, write_sa1b  # noqa: E402


def measure(dataset, workers: int, batch_size: int, seed: int = 0) -> dict:
    """Samples/s over one shuffled epoch: overall (worker start included) and after the first batch."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        collate_fn=collate_images, generator=torch.Generator().manual_seed(seed),
                        persistent_workers=False)
    n = skipped = 0
    t0 = time.perf_counter()
    t_first = n_first = None
    for batch in loader:
        n += len(batch["row_ids"])
        skipped += len(batch["skipped"])
        if t_first is None:
            t_first, n_first = time.perf_counter(), n
    total = time.perf_counter() - t0
    steady = (n - n_first) / max(time.perf_counter() - t_first, 1e-9) if n > n_first else float("nan")
    return dict(samples=n, skipped=skipped, seconds=total, per_s=n / total, steady_per_s=steady)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="直接逐张下载 vs 读取本地缓存：数据加载吞吐量对比")
    ap.add_argument("--rows", type=int, default=512, help="行数（默认 512）")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader 的 num_workers，两种方式相同（默认 2）")
    ap.add_argument("--batch-size", type=int, default=32, help="批大小（默认 32）")
    ap.add_argument("--source-size", type=int, default=1024, help="服务端图片边长，模拟原图（默认 1024；SA-1B 约 1500x2250）")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="服务端每个请求额外延迟（毫秒，默认 0）")
    ap.add_argument("--fetch-workers", type=int, default=16, help="生成缓存时的并发下载数（默认 16）")
    ap.add_argument("--cache-epochs", type=int, default=1, help="缓存读取测几轮，取最快（默认 1）")
    args = ap.parse_args(argv)

    unique = min(args.rows, 64)  # distinct pictures; rows beyond reuse their bytes under their own URL
    jpegs, caps = scene_jpegs(unique, seed=0, size=args.source_size), scene_captions(args.rows, seed=0)
    files = {f"/img/{i:06d}.jpg": jpegs[i % unique] for i in range(args.rows)}
    with tempfile.TemporaryDirectory() as tmp, ImageServer(files, delay=args.latency_ms / 1000) as server:
        src = write_sa1b(Path(tmp) / "src.parquet", [server.url(p) for p in files], caps)
        print(f"CPU 核数 {os.cpu_count()}，{platform.python_implementation()} {platform.python_version()}，"
              f"torch {torch.__version__}；{args.rows} 行，源图 {args.source_size}px "
              f"（平均 {sum(map(len, jpegs)) / unique / 1024:.0f} KiB），workers={args.workers}，batch={args.batch_size}")

        direct = measure(DirectDataset(src, timeout=30), args.workers, args.batch_size)
        print(f"直接逐张下载（课本做法）：{direct['per_s']:8.1f} 样本/秒  "
              f"（去掉首批 {direct['steady_per_s']:.1f}；{direct['samples']} 个样本，{direct['seconds']:.2f} 秒）")

        t0 = time.perf_counter()
        report = prepare_cache(src, Path(tmp) / "cache", workers=args.fetch_workers, progress=False, timeout=30)
        build = time.perf_counter() - t0
        print(f"一次性生成缓存：{build:.2f} 秒，{report.cached_total / build:.1f} 张/秒"
              f"（并发 {args.fetch_workers}，失败 {report.failed_total}）")

        ds = CachedImageDataset(Path(tmp) / "cache")
        runs = [measure(ds, args.workers, args.batch_size, seed=e) for e in range(max(1, args.cache_epochs))]
        cached = max(runs, key=lambda r: r["per_s"])
        print(f"读取本地缓存：          {cached['per_s']:8.1f} 样本/秒  "
              f"（去掉首批 {cached['steady_per_s']:.1f}；{cached['samples']} 个样本，{cached['seconds']:.2f} 秒）")
        assert direct["samples"] == cached["samples"] == args.rows, (direct, cached)
        print(f"比值（缓存 / 直接）：{cached['per_s'] / direct['per_s']:.1f}x"
              f"（去掉首批：{cached['steady_per_s'] / direct['steady_per_s']:.1f}x）")


if __name__ == "__main__":
    main()
