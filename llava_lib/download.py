"""``python -m llava_lib.download clip|llm|data|sft [--dest DIR] [--limit-shards N] [--force]``: the real models and
data from ModelScope, by default where ``config.resolve("full")`` looks. Thin wrappers over modelscope's resumable
snapshot downloaders that add a local completeness check first (a finished download needs no network), the one-time
conversion of Chinese-CLIP to transformers, and a Chinese message naming the id, destination and fix on failure."""
from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

from llava_lib import config

DEFAULT_DATA_SHARDS = 10  # SA1B-Dense-Caption has ~700 shards; the course needs far fewer. 0 means all.
DATA_MARKER = ".llava_download.json"  # written after a finished data download: what was asked for and what arrived
HUB_URL = "https://modelscope.cn"


class DownloadError(RuntimeError):
    """A download that could not finish; the message (Chinese) says what, where and what to do."""


def llm_is_complete(path: str | Path) -> bool:
    """config.json, a tokenizer and every weight file the index names (or a single ``model.safetensors``)."""
    path, index = Path(path), Path(path) / "model.safetensors.index.json"
    try:
        weights = set(json.loads(index.read_text("utf-8"))["weight_map"].values()) if index.is_file() else {
            "model.safetensors"}
    except (ValueError, KeyError, OSError):
        return False
    return ((path / "config.json").is_file() and any((path / t).is_file() for t in ("tokenizer.json", "vocab.json"))
            and all((path / w).is_file() for w in weights))


def shard_patterns(limit_shards: int) -> list[str]:
    """Globs for the first ``limit_shards`` shards (``data/train-0000-of-0724-<hash>.parquet``; ``*0000-of-`` also
    matches a 5-digit numbering); ``limit_shards <= 0``: every parquet file."""
    return [f"data/train-*{i:04d}-of-*.parquet" for i in range(limit_shards)] or ["data/*.parquet"]


def _shards(root: Path, patterns: list[str]) -> list[str]:
    rel = [p.relative_to(root).as_posix() for p in root.rglob("*.parquet")] if root.is_dir() else []
    return sorted(r for r in rel if any(fnmatch(r, pat) for pat in patterns))


def data_is_complete(path: str | Path, limit_shards: int = DEFAULT_DATA_SHARDS) -> bool:
    """The marker of a finished download that covers ``limit_shards``, or (copied by hand) the first
    ``limit_shards`` shards; "all shards" can only be known from the marker."""
    path = Path(path)
    try:
        info = json.loads((path / DATA_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = {}
    got, files = int(info.get("limit_shards", -1)), info.get("files") or []
    if (got == 0 or 0 < limit_shards <= got) and files and all((path / f).is_file() for f in files):
        return True
    return limit_shards > 0 and all(_shards(path, [pat]) for pat in shard_patterns(limit_shards))


def _explain(e: BaseException, what: str, repo_id: str, dest: Path, env: str, cmd: str) -> str:
    import requests
    head = f"{what}（{repo_id}）下载失败。\n  目标目录：{dest}\n  原因：{type(e).__name__}: {e}\n  解决办法："
    keep = "\n  已经下载完整的文件会保留，重新运行时不会重复下载。\n"
    # ConnectionError covers modelscope_hub's NetworkError; requests' own errors are not builtin ones.
    if isinstance(e, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout)):
        return (f"无法连接 ModelScope（{HUB_URL}），{head}\n  1. 检查网络能否打开 {HUB_URL}（需要代理时设置 HTTPS_PROXY），"
                f"然后重新运行 `{cmd}`。\n  2. 或在能联网的机器上下载好，把目录拷贝过来，并设置环境变量 {env}=<该目录>。\n"
                f"  3. 暂时没有网络时，可以先用离线的 mini 配置档（LLAVA_PROFILE=mini，先运行 `{config.BUILD_MINI_CMD}`）。{keep}")
    if isinstance(e, requests.HTTPError):
        return (f"ModelScope 上找不到 {repo_id}，或没有访问权限。{head}确认 id 拼写（见 llava_lib/config.py），需要登录的资源请先"
                f"运行 `modelscope login`；或把环境变量 {env} 指向已有的目录。\n")
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"磁盘空间不足，{head}清理磁盘，或用 --dest 换到空间更大的磁盘，并设置环境变量 {env} 指向它。{keep}"
    return f"{head}检查网络与磁盘后重新运行 `{cmd}`；或把环境变量 {env} 指向已有的目录。{keep}"


def _target(key: str, dest, *extra: str) -> tuple[Path, str, str]:
    """Where to download (``dest`` or the full profile's path), its environment variable, and the command to rerun
    with the options this run used (so the hint in an error is copy-pasteable)."""
    cmd = " ".join([config.DOWNLOAD_CMDS[key], *extra] + ([f"--dest {dest}"] if dest is not None else []))
    return Path(dest or getattr(config.resolve("full"), key)).expanduser(), config.ENV_VARS[key], cmd


def _hub(kind: str, repo_id: str, dest: Path, what: str, env: str, cmd: str, **kwargs) -> None:
    """modelscope's downloader, looked up at call time (so tests can patch ``modelscope.<name>``)."""
    import modelscope
    print(f"正在从 ModelScope 下载 {what}：{repo_id}\n  保存到：{dest}\n  （进度条由 modelscope 显示；中断后重新运行会接着下载）",
          flush=True)
    dest.mkdir(parents=True, exist_ok=True)
    fetch = modelscope.dataset_snapshot_download if kind == "dataset" else modelscope.snapshot_download
    try:
        fetch(**{f"{kind}_id": repo_id}, local_dir=str(dest), **kwargs)
    except Exception as e:
        raise DownloadError(_explain(e, what, repo_id, dest, env, cmd)) from e


def download_clip(dest: str | Path | None = None, *, force: bool = False) -> Path:
    """Chinese-CLIP in ModelScope's layout into ``<dest>-modelscope`` (kept: a re-conversion needs no network),
    converted into a transformers directory at ``dest``."""
    from llava_lib.model import convert_modelscope as cm
    dest, env, cmd = _target("clip_path", dest)
    raw = dest.with_name(dest.name + "-modelscope")
    if not force and cm.is_converted_dir(dest):
        print(f"Chinese-CLIP 已就绪（transformers 格式）：{dest}，无需下载。")
        return dest
    if cm.is_modelscope_layout(dest) and not raw.exists():  # `modelscope download --local_dir <clip_path>` by hand
        print(f"{dest} 是 ModelScope 原始格式，先移到 {raw}，再转换为 transformers 格式。")
        os.replace(dest, raw)
    if force or not (cm.is_modelscope_layout(raw) and (raw / cm.MS_VOCAB).is_file()
                     and (raw / cm.MS_TEXT_CONFIG).is_file()):
        _hub("model", config.CLIP_MODEL_ID, raw, f"Chinese-CLIP 模型（转换后保存到 {dest}）", env, cmd)
    else:
        print(f"ModelScope 原始文件已存在：{raw}，跳过下载。")
    return cm.convert_modelscope_dir(raw, dest, overwrite=force)


def download_llm(dest: str | Path | None = None, *, force: bool = False) -> Path:
    """Qwen3-0.6B into ``dest``; it loads as is."""
    dest, env, cmd = _target("llm_path", dest)
    if not force and llm_is_complete(dest):
        print(f"Qwen3 模型已完整存在：{dest}，无需下载。")
        return dest
    _hub("model", config.LLM_MODEL_ID, dest, "Qwen3 模型", env, cmd)
    if not llm_is_complete(dest):
        raise DownloadError(f"下载结束，但 {dest} 仍不完整（缺少 config.json、分词器或权重文件）。\n"
                            f"  解决办法：重新运行 `{cmd}`；仍不行就删除该目录后再下载。")
    print(f"Qwen3 模型下载完成：{dest}")
    return dest


def download_data(dest: str | Path | None = None, *, limit_shards: int = DEFAULT_DATA_SHARDS,
                  force: bool = False) -> Path:
    """The first ``limit_shards`` parquet shards of SA1B-Dense-Caption (0 = all) into ``dest/data/``: image URLs
    and captions only; ``python -m llava_lib.data prepare`` fetches the images."""
    extra = () if limit_shards == DEFAULT_DATA_SHARDS else (f"--limit-shards {limit_shards}",)
    dest, env, cmd = _target("data_root", dest, *extra)
    which = "全部分片" if limit_shards <= 0 else f"前 {limit_shards} 个分片"
    if not force and data_is_complete(dest, limit_shards):
        print(f"SA1B-Dense-Caption（{which}）已存在：{dest}，无需下载。")
        return dest
    patterns = shard_patterns(limit_shards)
    _hub("dataset", config.DATASET_ID, dest, f"SA1B-Dense-Caption 数据集（{which}）", env, cmd, allow_patterns=patterns)
    files = _shards(dest, patterns)
    if not files:
        raise DownloadError(f"下载结束，但 {dest} 中没有符合 {patterns[0]} 等 {len(patterns)} 个模式的 parquet 分片。\n"
                            f"  数据集的文件命名可能变了；可以试试 `{_target('data_root', None, '--limit-shards 0')[2]}`"
                            f"（下载全部分片），或在 {HUB_URL}/datasets/{config.DATASET_ID} 查看文件列表。")
    if len(files) < limit_shards:
        print(f"注意：只找到 {len(files)} 个分片（请求 {limit_shards} 个），数据集可能没有这么多分片。")
    (dest / DATA_MARKER).write_text(json.dumps({"dataset_id": config.DATASET_ID, "limit_shards": limit_shards,
                                                "files": files, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}))
    print(f"数据下载完成：{len(files)} 个分片，位于 {dest / 'data'}")
    return dest


def _find_sft_root(dest: Path) -> Path | None:
    """The folder that holds both conversation subsets, each with images and labels (an archive may add a level)."""
    from llava_lib.data.conversations import LABELS_DIR, SFT_SUBSETS
    for d in [dest, *sorted(p for p in dest.rglob("*") if p.is_dir())] if dest.exists() else []:
        if all((d / s / "images").is_dir() and any((d / s / LABELS_DIR).glob("*.json")) for s in SFT_SUBSETS):
            return d
    return None


def download_sft(dest: str | Path | None = None, *, force: bool = False) -> Path:
    """CogVLM-SFT-311K (the Stage 2 conversations) into ``dest``; returns the folder that holds
    ``llava_instruction_*_formate/`` (point ``LLAVA_SFT_ROOT`` at it if it is not ``dest`` itself)."""
    dest, env, cmd = _target("sft_root", dest)
    found = None if force else _find_sft_root(dest)
    if found is not None:
        print(f"CogVLM-SFT-311K 已存在：{found}，无需下载。")
        return found
    _hub("dataset", config.SFT_DATASET_ID, dest, "CogVLM-SFT-311K 对话数据", env, cmd)
    for archive in sorted(p for p in dest.rglob("*") if p.is_file() and p.suffix in (".zip", ".tar", ".gz", ".tgz")):
        marker = archive.with_name(f".{archive.name}.unpacked")  # the hub may ship the folders as archives
        if not marker.exists():
            print(f"正在解压 {archive.name} ……", flush=True)
            shutil.unpack_archive(archive, archive.parent)
            marker.touch()
    found = _find_sft_root(dest)
    if found is None:
        raise DownloadError(f"下载结束，但 {dest} 中找不到 llava_instruction_single_conversation_formate/ 和 "
                            f"llava_instruction_multi_conversations_formate/（各含 images/ 与 labels_zh/）。\n"
                            f"  数据集的目录结构可能变了：请在 {HUB_URL}/datasets/{config.SFT_DATASET_ID} 查看，"
                            f"再把环境变量 {env} 指向含这两个子目录的文件夹。")
    if found != dest:
        print(f"注意：数据在 {found}；请设置环境变量 {env}={found}（或在 llava.toml 里写 sft_root）。")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_lib.download",
                                     description="从 ModelScope 下载真实模型与数据（full 配置档）。默认保存位置见 "
                                                 "llava_lib.config.resolve('full')。")
    parser.add_argument("what", choices=("clip", "llm", "data", "sft"),
                        help="clip: Chinese-CLIP；llm: Qwen3-0.6B；data: SA1B-Dense-Caption；sft: CogVLM-SFT-311K（Stage 2）")
    parser.add_argument("--dest", type=Path, default=None, help="保存目录（默认取 full 配置档的路径）")
    parser.add_argument("--limit-shards", type=int, default=DEFAULT_DATA_SHARDS,
                        help=f"只下载前 N 个数据分片（默认 {DEFAULT_DATA_SHARDS}；0 表示全部）；仅用于 data")
    parser.add_argument("--force", action="store_true", help="即使本地已完整也重新下载（clip 会重新转换）")
    args = parser.parse_args(argv)
    from llava_lib.model.convert_modelscope import CheckpointMismatchError
    job = {"clip": download_clip, "llm": download_llm, "data": download_data, "sft": download_sft}[args.what]
    try:
        path = job(args.dest, force=args.force, **({"limit_shards": args.limit_shards} if args.what == "data" else {}))
    except (DownloadError, config.MissingResourceError, CheckpointMismatchError, FileExistsError) as e:
        print(f"错误：{e}", file=sys.stderr)
        return 1
    print(f"完成：{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
