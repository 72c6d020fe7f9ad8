"""``python -m llava_lib.data`` (also ``llava-data``): build the image cache, export examples. Help in Chinese."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import config
from .cache import CacheError, estimate_download, prepare_cache
from .examples import export_examples
from .reader import DataFormatError, list_shards

# The mini world's image URLs (must equal llava_lib.mini.MINI_URL_BASE; the library does not import mini).
MINI_URL_PREFIX = "http://127.0.0.1:18765/"
# Held-out evaluation samples: the course evaluates on 500 samples of a shard that training never reads.
DEFAULT_EVAL_LIMIT = 500
# The command a student runs for the real data (quoted by hints and errors elsewhere).
PREPARE_FULL_CMD = "python -m llava_lib.data prepare --profile full --limit 100000"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def add_usage(self, usage, actions, groups, prefix=None):
        return super().add_usage(usage, actions, groups, "用法：" if prefix is None else prefix)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        kwargs["add_help"] = False
        super().__init__(*args, **kwargs)
        self._positionals.title = "位置参数"
        self._optionals.title = "选项"
        self.add_argument("-h", "--help", action="help", help="显示本帮助并退出")

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"错误：{message}\n（运行 `{self.prog} --help` 查看用法）\n")


def _rewrite_arg(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError("格式应为 前缀=替换，例如 http://127.0.0.1:18765/=/data/images/")
    prefix, repl = text.split("=", 1)
    return prefix, repl


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m llava_lib.data",
                description="SA1B-Dense-Caption 数据工具：把图片一次性下载成本地缓存，或导出示例图片。")
    sub = p.add_subparsers(dest="command", title="命令", metavar="{prepare,export-examples}", parser_class=_Parser)

    pr = sub.add_parser("prepare", help="下载图片并生成本地缓存（可中断、可续传）",
                        description="并发下载每一行的图片，整张缩放（不裁剪）到 224x224 像素，以 JPEG 存入 parquet 分片。\n"
                                    "中途被杀掉也没关系：再次运行同一命令，只会下载还没完成的行。\n"
                                    "失败的行（及原因）记录在 <输出目录>/failures.jsonl。\n"
                                    "开始下载前，先抽样几个地址，估算下载量和用时（--dry-run 只估算不下载）。\n"
                                    "--profile full 且没有单独的验证集目录时，最后一个数据分片留作验证集\n"
                                    f"（取前 {DEFAULT_EVAL_LIMIT} 行，写入 eval/），训练集不使用这个分片。\n\n"
                                    "例子：\n"
                                    f"  {PREPARE_FULL_CMD}\n"
                                    "  python -m llava_lib.data prepare --src 数据目录 --out 缓存目录 --limit 100000 --workers 32")
    pr.add_argument("--src", type=Path, metavar="目录", help="数据目录（其中有 data/*.parquet）或一个 parquet 文件")
    pr.add_argument("--out", type=Path, metavar="目录",
                    help="缓存输出目录；与 --profile 同用且不给 --src 时是缓存根目录（训练集写入其下 train/，验证集写入 eval/）")
    pr.add_argument("--profile", choices=config.PROFILES,
                    help="按配置档取默认路径：训练集 data_root -> cache_dir/train，验证集 eval_data_root "
                         "（没有时取 data_root 的最后一个分片）-> cache_dir/eval")
    pr.add_argument("--limit", type=int, metavar="N", help="训练集只取前 N 行（课程用前 100000 行）")
    pr.add_argument("--eval-limit", type=int, metavar="N", default=DEFAULT_EVAL_LIMIT,
                    help=f"验证集取前 N 行（默认 {DEFAULT_EVAL_LIMIT}）")
    pr.add_argument("--start", type=int, metavar="N", default=0, help="训练集从第几行开始（默认 0）")
    pr.add_argument("--workers", type=int, metavar="K", default=16, help="同时下载的数量（默认 16）")
    pr.add_argument("--shard-rows", type=int, metavar="N", default=2048, help="每个缓存分片最多多少行（默认 2048）")
    pr.add_argument("--timeout", type=float, metavar="秒", default=20.0, help="单次请求多少秒没有数据就算超时（默认 20）")
    pr.add_argument("--retries", type=int, metavar="次", default=3, help="连接失败、超时、429、5xx 时最多重试几次（默认 3）")
    pr.add_argument("--max-mb", type=float, default=32.0, metavar="MB", help="单张图片最大下载量，超过即放弃（默认 32 MB）")
    pr.add_argument("--url-rewrite", type=_rewrite_arg, metavar="前缀=替换",
                    help="把以“前缀”开头的地址改写，例如把网址映射到本地目录；--profile mini 默认映射到迷你世界的 images/")
    pr.add_argument("--no-url-rewrite", action="store_true", help="不做默认的地址改写（例如迷你世界的图片服务器已在运行）")
    pr.add_argument("--no-progress", action="store_true", help="不显示进度条")
    pr.add_argument("--dry-run", action="store_true", help="只打印行数和估算的下载量、用时，不下载")

    ex = sub.add_parser("export-examples", help="导出前 N 个样本为 NNNN.jpg + NNNN.txt（data_example/ 的格式）",
                        description="从任意 SA1B 格式的数据导出前 N 个能下载的样本：NNNN.jpg 和对应的描述 NNNN.txt。")
    ex.add_argument("--src", type=Path, metavar="目录", help="数据目录（其中有 data/*.parquet）或一个 parquet 文件")
    ex.add_argument("--out", type=Path, metavar="目录", default=Path("data_example"), help="输出目录（默认 ./data_example）")
    ex.add_argument("--profile", choices=config.PROFILES, help="按配置档取默认的数据目录 data_root")
    ex.add_argument("-n", "--n", type=int, metavar="N", default=100, help="导出多少个样本（默认 100）")
    ex.add_argument("--size", type=int, metavar="像素", default=224, help="整张缩放到多少像素见方；0 表示保留原图（默认 224）")
    ex.add_argument("--url-rewrite", type=_rewrite_arg, metavar="前缀=替换", help="同 prepare")
    ex.add_argument("--no-url-rewrite", action="store_true", help="同 prepare")
    return p


def _default_rewrite(args, paths: config.Paths | None):
    if args.url_rewrite is not None or args.no_url_rewrite:
        return args.url_rewrite
    if paths is not None and paths.profile == "mini":
        return MINI_URL_PREFIX, str(Path(paths.data_root).parent / "images") + "/"
    return None


@dataclass(frozen=True)
class _Job:
    name: str                # what the student reads: 训练集 / 验证集
    src: object              # a dataset directory, a parquet file, or a list of parquet files
    out: Path
    limit: int | None
    start: int = 0


def _jobs(args) -> tuple[list[_Job], config.Paths | None, str]:
    """What to prepare, the resolved profile (if any), and a note on where the evaluation samples come from."""
    if args.profile is None:
        if args.src is None or args.out is None:
            raise DataFormatError("请同时给出 --src 和 --out，或者用 --profile mini|full 使用配置中的默认路径。")
        return [_Job("数据", args.src, args.out, args.limit, args.start)], None, ""
    paths = config.resolve(args.profile)
    if args.src is not None:
        return [_Job("训练集", args.src, args.out or Path(paths.cache_dir) / "train", args.limit, args.start)], paths, ""
    root = args.out or Path(paths.cache_dir)  # --out replaces the profile's cache_dir
    data_root = config.check_path(paths, "data_root")
    if paths.eval_data_root is not None:
        return [_Job("训练集", data_root, root / "train", args.limit, args.start),
                _Job("验证集", config.check_path(paths, "eval_data_root"), root / "eval", args.eval_limit)], paths, ""
    shards = list_shards(data_root)
    if len(shards) < 2:
        note = (f"注意：{data_root} 只有 1 个数据分片，无法单独留出验证集；训练时会用训练缓存的最后几行做评估。"
                f"多下载几个分片（python -m llava_lib.download data）就会自动留出最后一个分片。")
        return [_Job("训练集", data_root, root / "train", args.limit, args.start)], paths, note
    note = (f"验证集：最后一个数据分片 {shards[-1].name} 的前 {args.eval_limit} 行（训练集不使用这个分片，"
            f"只用前 {len(shards) - 1} 个）。")
    return [_Job("训练集", shards[:-1], root / "train", args.limit, args.start),
            _Job("验证集", shards[-1:], root / "eval", args.eval_limit)], paths, note


def _describe_src(src) -> str:
    if isinstance(src, (list, tuple)):
        names = [Path(p).name for p in src]
        return f"{Path(src[0]).parent}/ 中的 {len(names)} 个分片（{names[0]}{' … ' + names[-1] if len(names) > 1 else ''}）"
    return str(src)


def _prepare(args) -> int:
    jobs, paths, note = _jobs(args)
    rewrite = _default_rewrite(args, paths)
    if note:
        print(note, flush=True)
    max_bytes = int(args.max_mb * (1 << 20))
    for job in jobs:
        print(f"{job.name}：{_describe_src(job.src)}\n缓存：{job.out}", flush=True)
        estimate = estimate_download(job.src, job.out, limit=job.limit, start=job.start, workers=args.workers,
                                     url_rewrite=rewrite, timeout=args.timeout, max_bytes=max_bytes)
        print(estimate.summary(), flush=True)
        if args.dry_run:
            continue
        report = prepare_cache(job.src, job.out, limit=job.limit, start=job.start, workers=args.workers,
                               shard_rows=args.shard_rows, url_rewrite=rewrite, timeout=args.timeout,
                               retries=args.retries, max_bytes=max_bytes, progress=not args.no_progress)
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
