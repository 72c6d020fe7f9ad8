"""``python -m llava_lib.data`` (also ``llava-data``): build the image cache, or regenerate the course's
``data_example/`` folder (the first N good samples as ``NNNN.jpg`` + ``NNNN.txt``). Help in Chinese."""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

from .. import config
from ..files import atomic_write_bytes
from ..process import IMAGE_SIZE, resize_square
from .cache import CacheError, encode_jpeg, estimate_download, prepare_cache
from .fetch import FetchError, fetch_image
from .reader import DataFormatError, list_shards, read_sa1b

# The mini world's image URLs (must equal llava_lib.mini.MINI_URL_BASE; the library does not import mini).
MINI_URL_PREFIX = "http://127.0.0.1:18765/"
EVAL_LIMIT = 500  # the course evaluates on 500 samples of a shard that training never reads


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def add_usage(self, usage, actions, groups, prefix=None):
        return super().add_usage(usage, actions, groups, "用法：" if prefix is None else prefix)


class Parser(argparse.ArgumentParser):
    """argparse with Chinese headings, help and errors."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=_Formatter, add_help=False, **kwargs)
        self._positionals.title, self._optionals.title = "位置参数", "选项"
        self.add_argument("-h", "--help", action="help", help="显示本帮助并退出")

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"错误：{message}\n（运行 `{self.prog} --help` 查看用法）\n")


def export_examples(src, out_dir, n: int = 100, *, size: int | None = IMAGE_SIZE, retries: int = 2,
                    **fetch_opts) -> SimpleNamespace:
    """Write the first ``n`` samples that can be fetched, squashed to ``size`` px (None: the original image). The
    report: ``written``, ``skipped`` (row_id, reason) of failed fetches, and ``bad_rows`` that could not be parsed."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    rows, report = read_sa1b(src), SimpleNamespace(written=0, skipped=[], bad_rows=0)
    it = iter(rows)

    def load(row):
        try:
            img = fetch_image(row.url, retries=retries, **fetch_opts)
            return row, (resize_square(img, size) if size else img)
        except FetchError as e:
            return row, e

    with ThreadPoolExecutor(max_workers=8) as pool:
        while report.written < n and (chunk := list(islice(it, n - report.written))):
            for row, result in pool.map(load, chunk):  # map keeps the source order
                if isinstance(result, FetchError):
                    report.skipped.append((row.row_id, result.reason))
                    continue
                stem = out / f"{report.written:04d}"
                atomic_write_bytes(stem.with_suffix(".jpg"), encode_jpeg(result))
                atomic_write_bytes(stem.with_suffix(".txt"), (row.caption + "\n").encode("utf-8"))
                report.written += 1
    report.bad_rows = rows.stats.bad_rows
    return report


def _rewrite_arg(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError("格式应为 前缀=替换，例如 http://127.0.0.1:18765/=/data/images/")
    return tuple(text.split("=", 1))


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m llava_lib.data",
               description="SA1B-Dense-Caption 数据工具：把图片一次性下载成本地缓存，或导出示例图片。")
    sub = p.add_subparsers(dest="command", title="命令", metavar="{prepare,export-examples}", parser_class=Parser)
    pr = sub.add_parser("prepare", help="下载图片并生成本地缓存（可中断、可续传）",
                        description="并发下载每一行的图片，整张缩放（不裁剪）到 224x224 像素，以 JPEG 存入 parquet 分片。\n"
                                    "中途被杀掉也没关系：再次运行同一命令，只会下载还没完成的行。\n"
                                    "失败的行（及原因）记录在 <输出目录>/failures.jsonl。\n"
                                    "开始下载前，先抽样几个地址，估算下载量和用时（--dry-run 只估算不下载）。\n"
                                    "--profile full 且没有单独的验证集目录时，最后一个数据分片留作验证集\n"
                                    f"（取前 {EVAL_LIMIT} 行，写入 eval/），训练集不使用这个分片。\n\n例子：\n"
                                    f"  {config.DOWNLOAD_CMDS['cache_dir']}\n"
                                    "  python -m llava_lib.data prepare --src 数据目录 --out 缓存目录 --limit 100000 --workers 32")
    ex = sub.add_parser("export-examples", help="导出前 N 个样本为 NNNN.jpg + NNNN.txt（data_example/ 的格式）",
                        description="从任意 SA1B 格式的数据导出前 N 个能下载的样本：NNNN.jpg 和对应的描述 NNNN.txt。")
    for sp in (pr, ex):
        sp.add_argument("--src", type=Path, metavar="目录", help="数据目录（其中有 data/*.parquet）或一个 parquet 文件")
    pr.add_argument("--out", type=Path, metavar="目录",
                    help="缓存输出目录；与 --profile 同用且不给 --src 时是缓存根目录（训练集写入其下 train/，验证集写入 eval/）")
    pr.add_argument("--profile", choices=config.PROFILES,
                    help="按配置档取默认路径：训练集 data_root -> cache_dir/train，验证集 eval_data_root "
                         "（没有时取 data_root 的最后一个分片）-> cache_dir/eval")
    pr.add_argument("--limit", type=int, metavar="N", help="训练集只取前 N 行（课程用前 100000 行）")
    pr.add_argument("--eval-limit", type=int, metavar="N", default=EVAL_LIMIT, help=f"验证集取前 N 行（默认 {EVAL_LIMIT}）")
    pr.add_argument("--start", type=int, metavar="N", default=0, help="训练集从第几行开始（默认 0）")
    pr.add_argument("--workers", type=int, metavar="K", default=16, help="同时下载的数量（默认 16）")
    pr.add_argument("--shard-rows", type=int, metavar="N", default=2048, help="每个缓存分片最多多少行（默认 2048）")
    pr.add_argument("--timeout", type=float, metavar="秒", default=20.0, help="单次请求多少秒没有数据就算超时（默认 20）")
    pr.add_argument("--retries", type=int, metavar="次", default=3, help="连接失败、超时、429、5xx 时最多重试几次（默认 3）")
    pr.add_argument("--max-mb", type=float, default=32.0, metavar="MB", help="单张图片最大下载量，超过即放弃（默认 32 MB）")
    ex.add_argument("--out", type=Path, metavar="目录", default=Path("data_example"), help="输出目录（默认 ./data_example）")
    ex.add_argument("--profile", choices=config.PROFILES, help="按配置档取默认的数据目录 data_root")
    ex.add_argument("-n", "--n", type=int, metavar="N", default=100, help="导出多少个样本（默认 100）")
    ex.add_argument("--size", type=int, metavar="像素", default=224, help="整张缩放到多少像素见方；0 表示保留原图（默认 224）")
    for sp in (pr, ex):
        sp.add_argument("--url-rewrite", type=_rewrite_arg, metavar="前缀=替换",
                        help="把以“前缀”开头的地址改写，例如把网址映射到本地目录；--profile mini 默认映射到迷你世界的 images/")
        sp.add_argument("--no-url-rewrite", action="store_true", help="不做默认的地址改写（例如迷你世界的图片服务器已在运行）")
    pr.add_argument("--no-progress", action="store_true", help="不显示进度条")
    pr.add_argument("--dry-run", action="store_true", help="只打印行数和估算的下载量、用时，不下载")
    return p


def _default_rewrite(args, paths):
    if args.url_rewrite is not None or args.no_url_rewrite or paths is None or paths.profile != "mini":
        return args.url_rewrite
    return MINI_URL_PREFIX, str(Path(paths.data_root).parent / "images") + "/"


def _jobs(args):
    """``(name, src, out, limit, start)`` of each cache to prepare, the resolved profile, and a note on where the
    evaluation samples come from."""
    if args.profile is None:
        if args.src is None or args.out is None:
            raise DataFormatError("请同时给出 --src 和 --out，或者用 --profile mini|full 使用配置中的默认路径。")
        return [("数据", args.src, args.out, args.limit, args.start)], None, ""
    paths = config.resolve(args.profile)
    root = args.out or Path(paths.cache_dir)  # --out replaces the profile's cache_dir
    if args.src is not None:
        return [("训练集", args.src, args.out or root / "train", args.limit, args.start)], paths, ""
    data_root = config.check_path(paths, "data_root")
    train = ("训练集", data_root, root / "train", args.limit, args.start)
    if paths.eval_data_root is not None:
        eval_root = config.check_path(paths, "eval_data_root")
        return [train, ("验证集", eval_root, root / "eval", args.eval_limit, 0)], paths, ""
    shards = list_shards(data_root)
    if len(shards) < 2:
        return [train], paths, (f"注意：{data_root} 只有 1 个数据分片，无法单独留出验证集；训练时会用训练缓存的最后几行做评估。"
                                f"多下载几个分片（python -m llava_lib.download data）就会自动留出最后一个分片。")
    note = f"验证集：最后一个数据分片 {shards[-1].name} 的前 {args.eval_limit} 行（训练集不使用这个分片，只用前 {len(shards) - 1} 个）。"
    return [("训练集", shards[:-1], *train[2:]), ("验证集", shards[-1:], root / "eval", args.eval_limit, 0)], paths, note


def _prepare(args) -> int:
    jobs, paths, note = _jobs(args)
    if note:
        print(note, flush=True)
    opts = dict(url_rewrite=_default_rewrite(args, paths), timeout=args.timeout, max_bytes=int(args.max_mb * (1 << 20)))
    for name, src, out, limit, start in jobs:
        shown = src if isinstance(src, Path) else (f"{src[0].parent}/ 中的 {len(src)} 个分片（{src[0].name}"
                                                   + (f" … {src[-1].name}）" if len(src) > 1 else "）"))
        print(f"{name}：{shown}\n缓存：{out}", flush=True)
        print(estimate_download(src, out, limit=limit, start=start, workers=args.workers, **opts).summary(), flush=True)
        if not args.dry_run:
            report = prepare_cache(src, out, limit=limit, start=start, workers=args.workers, shard_rows=args.shard_rows,
                                   retries=args.retries, progress=not args.no_progress, **opts)
            print(report.summary(), flush=True)
    if args.dry_run:
        print("（--dry-run：只做了估算，没有下载。去掉 --dry-run 即开始下载。）")
    return 0


def _export(args) -> int:
    paths = config.resolve(args.profile) if args.profile else None
    src = args.src or (config.check_path(paths, "data_root") if paths else None)
    if src is None:
        raise DataFormatError("请给出 --src，或者用 --profile mini|full 使用配置中的数据目录。")
    report = export_examples(src, args.out, args.n, size=args.size or None, url_rewrite=_default_rewrite(args, paths))
    print(f"已导出 {report.written} 个样本到 {args.out}；跳过 {len(report.skipped)} 个下载失败的样本，"
          f"{report.bad_rows} 个无法解析的行。")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _prepare(args) if args.command == "prepare" else _export(args)
    except (DataFormatError, CacheError, config.MissingResourceError, config.ConfigError) as e:
        print(f"错误：{e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n已中断。已写入的分片都完好；再次运行同一命令即可继续。", file=sys.stderr)
        return 130
