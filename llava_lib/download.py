"""Download the real models and data from ModelScope (the ``full`` profile).

    python -m llava_lib.download clip   [--dest DIR] [--force]
    python -m llava_lib.download llm    [--dest DIR] [--force]
    python -m llava_lib.download data   [--dest DIR] [--limit-shards N] [--force]

Thin wrappers over ``modelscope.snapshot_download`` / ``modelscope.dataset_snapshot_download`` (which show their
own progress bars and skip files already downloaded). What this module adds:

- default destinations from ``llava_lib.config.resolve("full")``, so the notebooks find what was downloaded;
- a local completeness check first, so a finished download needs no network at all;
- Chinese-CLIP arrives in ModelScope's own layout and is converted once into a transformers directory
  (``llava_lib.model.convert_modelscope``), which is what ``clip_path`` points at;
- a clear Chinese message naming the id, the destination and the fix when the hub cannot be reached.
"""
from __future__ import annotations

import argparse
import errno
import fnmatch
import json
import os
import sys
import time
from pathlib import Path

from llava_lib import config

# SA1B-Dense-Caption has ~700 shards; the course needs far fewer. 0 means "all shards".
DEFAULT_DATA_SHARDS = 10
# Written into a data directory after a finished download: what was asked for and what arrived.
DATA_MARKER = ".llava_download.json"
HUB_URL = "https://modelscope.cn"


class DownloadError(RuntimeError):
    """A download that could not finish; the message (Chinese) says what, where and what to do."""


# ------------------------------------------------------------------------------------- completeness


def llm_is_complete(path: str | Path) -> bool:
    """config.json, a tokenizer and every weight file the index names (or a single ``model.safetensors``)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return False
    if not ((path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()):
        return False
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, OSError):
            return False
        return all((path / s).is_file() for s in shards)
    return (path / "model.safetensors").is_file()


def shard_patterns(limit_shards: int) -> list[str]:
    """Glob patterns (matched against repo paths by modelscope) for the first ``limit_shards`` parquet shards.

    Shards are named like ``data/train-0000-of-0724-<hash>.parquet``; ``*{i:04d}-of-`` also matches a 5-digit
    numbering. ``limit_shards <= 0`` selects every parquet file.
    """
    if limit_shards <= 0:
        return ["data/*.parquet"]
    return [f"data/train-*{i:04d}-of-*.parquet" for i in range(limit_shards)]


def _files_matching(root: Path, patterns: list[str]) -> list[str]:
    if not root.is_dir():
        return []
    rel = (p.relative_to(root).as_posix() for p in root.rglob("*.parquet") if p.is_file())
    return sorted(r for r in rel if any(fnmatch.fnmatch(r, pat) for pat in patterns))


def data_is_complete(path: str | Path, limit_shards: int = DEFAULT_DATA_SHARDS) -> bool:
    """True when ``path`` already holds the requested shards.

    A finished download leaves :data:`DATA_MARKER`; without one, the first ``limit_shards`` shards being present is
    enough (e.g. copied over by hand). "All shards" can only be known from the marker.
    """
    path = Path(path)
    marker = path / DATA_MARKER
    if marker.is_file():
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            info = {}
        got = int(info.get("limit_shards", -1))
        covers = got == 0 or (limit_shards > 0 and got >= limit_shards)
        files = info.get("files") or []
        if covers and files and all((path / f).is_file() for f in files):
            return True
    if limit_shards <= 0:
        return False
    present = _files_matching(path, shard_patterns(limit_shards))
    return all(any(fnmatch.fnmatch(f, pat) for f in present) for pat in shard_patterns(limit_shards))


# ------------------------------------------------------------------------------------------ the hub


def _is_network_error(e: BaseException) -> bool:
    if isinstance(e, (ConnectionError, TimeoutError)):  # includes modelscope_hub's NetworkError
        return True
    try:
        import requests

        return isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout))
    except ImportError:  # pragma: no cover - requests comes with modelscope
        return False


def _is_not_found(e: BaseException) -> bool:
    try:
        import requests

        return isinstance(e, requests.exceptions.HTTPError)
    except ImportError:  # pragma: no cover
        return False


def _explain(e: BaseException, what: str, repo_id: str, dest: Path, env: str, cmd: str) -> str:
    head = f"{what}（{repo_id}）下载失败。\n  目标目录：{dest}\n  原因：{type(e).__name__}: {e}\n"
    keep = "  已经下载完整的文件会保留，重新运行时不会重复下载。\n"
    if _is_network_error(e):
        return (
            f"无法连接 ModelScope（{HUB_URL}），{head}"
            f"  解决办法：\n"
            f"  1. 检查网络能否打开 {HUB_URL}（需要代理时设置 HTTPS_PROXY），然后重新运行 `{cmd}`。\n"
            f"  2. 或在能联网的机器上下载好，把目录拷贝过来，并设置环境变量 {env}=<该目录>。\n"
            f"  3. 暂时没有网络时，可以先用离线的 mini 配置档（LLAVA_PROFILE=mini，先运行 `{config.BUILD_MINI_CMD}`）。\n"
            + keep
        )
    if _is_not_found(e):
        return (
            f"ModelScope 上找不到 {repo_id}，或没有访问权限。{head}"
            f"  解决办法：确认 id 拼写（见 llava_lib/config.py），需要登录的资源请先运行 `modelscope login`；"
            f"或把环境变量 {env} 指向已有的目录。\n"
        )
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"磁盘空间不足，{head}  解决办法：清理磁盘，或用 --dest 换到空间更大的磁盘，并设置环境变量 {env} 指向它。\n" + keep
    return f"{head}  解决办法：检查网络与磁盘后重新运行 `{cmd}`；或把环境变量 {env} 指向已有的目录。\n" + keep


def _hub_download(kind: str, repo_id: str, dest: Path, what: str, env: str, cmd: str, **kwargs) -> Path:
    """Call modelscope's downloader by name at call time (so tests can patch ``modelscope.<name>``)."""
    import modelscope

    dest.mkdir(parents=True, exist_ok=True)
    try:
        if kind == "dataset":
            result = modelscope.dataset_snapshot_download(dataset_id=repo_id, local_dir=str(dest), **kwargs)
        else:
            result = modelscope.snapshot_download(model_id=repo_id, local_dir=str(dest), **kwargs)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        raise DownloadError(_explain(e, what, repo_id, dest, env, cmd)) from e
    return Path(result) if result else dest


def _rerun_cmd(base: str, dest_given: str | Path | None, *extra: str) -> str:
    """The command to repeat, with the options this run used (so the hint in an error is copy-pasteable)."""
    parts = [base, *extra]
    if dest_given is not None:
        parts.append(f"--dest {dest_given}")
    return " ".join(parts)


def _announce(what: str, repo_id: str, dest: Path) -> None:
    print(f"正在从 ModelScope 下载{what}：{repo_id}\n  保存到：{dest}\n  （进度条由 modelscope 显示；中断后重新运行会接着下载）",
          flush=True)


# ------------------------------------------------------------------------------------- the three jobs


def download_clip(dest: str | Path | None = None, *, raw_dir: str | Path | None = None, force: bool = False) -> Path:
    """Download Chinese-CLIP (ModelScope layout) and convert it into a transformers directory at ``dest``.

    ``dest`` defaults to ``config.resolve("full").clip_path``; the ModelScope files stay beside it in
    ``<dest>-modelscope`` (``raw_dir``) so a re-conversion needs no network.
    """
    from llava_lib.model import convert_modelscope as cm

    given, dest = dest, Path(dest or config.resolve("full").clip_path).expanduser()
    raw = Path(raw_dir).expanduser() if raw_dir else dest.with_name(dest.name + "-modelscope")
    env, cmd = config.ENV_VARS["clip_path"], _rerun_cmd(config.DOWNLOAD_CMDS["clip_path"], given)
    if not force and cm.is_converted_dir(dest):
        print(f"Chinese-CLIP 已就绪（transformers 格式）：{dest}，无需下载。")
        return dest
    if cm.is_modelscope_layout(dest) and not raw.exists():
        # Someone ran `modelscope download --local_dir <clip_path>`: keep those files as the raw copy.
        print(f"{dest} 是 ModelScope 原始格式，先移到 {raw}，再转换为 transformers 格式。")
        os.replace(dest, raw)
    raw_ok = cm.is_modelscope_layout(raw) and (raw / cm.MS_VOCAB).is_file() and (raw / cm.MS_TEXT_CONFIG).is_file()
    if force or not raw_ok:
        _announce(" Chinese-CLIP 模型", config.CLIP_MODEL_ID, raw)
        _hub_download("model", config.CLIP_MODEL_ID, raw, f"Chinese-CLIP 模型（转换后保存到 {dest}）", env, cmd)
    else:
        print(f"ModelScope 原始文件已存在：{raw}，跳过下载。")
    return cm.convert_modelscope_dir(raw, dest, overwrite=force)


def download_llm(dest: str | Path | None = None, *, force: bool = False) -> Path:
    """Download Qwen3-0.6B to ``dest`` (default ``config.resolve("full").llm_path``); it loads as is."""
    given, dest = dest, Path(dest or config.resolve("full").llm_path).expanduser()
    env, cmd = config.ENV_VARS["llm_path"], _rerun_cmd(config.DOWNLOAD_CMDS["llm_path"], given)
    if not force and llm_is_complete(dest):
        print(f"Qwen3 模型已完整存在：{dest}，无需下载。")
        return dest
    _announce(" Qwen3 模型", config.LLM_MODEL_ID, dest)
    _hub_download("model", config.LLM_MODEL_ID, dest, "Qwen3 模型", env, cmd)
    if not llm_is_complete(dest):
        raise DownloadError(
            f"下载结束，但 {dest} 仍不完整（缺少 config.json、分词器或权重文件）。\n"
            f"  解决办法：重新运行 `{cmd}`；仍不行就删除该目录后再下载。"
        )
    print(f"Qwen3 模型下载完成：{dest}")
    return dest


def download_data(
    dest: str | Path | None = None, *, limit_shards: int = DEFAULT_DATA_SHARDS, force: bool = False
) -> Path:
    """Download the first ``limit_shards`` parquet shards of SA1B-Dense-Caption (0 = all) into ``dest/data/``.

    ``dest`` defaults to ``config.resolve("full").data_root``. The shards hold image URLs and captions only;
    images are fetched later by ``python -m llava_lib.data prepare --profile full --limit 100000``.
    """
    given, dest = dest, Path(dest or config.resolve("full").data_root).expanduser()
    extra = () if limit_shards == DEFAULT_DATA_SHARDS else (f"--limit-shards {limit_shards}",)
    env, cmd = config.ENV_VARS["data_root"], _rerun_cmd(config.DOWNLOAD_CMDS["data_root"], given, *extra)
    which = "全部分片" if limit_shards <= 0 else f"前 {limit_shards} 个分片"
    if not force and data_is_complete(dest, limit_shards):
        print(f"SA1B-Dense-Caption（{which}）已存在：{dest}，无需下载。")
        return dest
    patterns = shard_patterns(limit_shards)
    _announce(f" SA1B-Dense-Caption 数据（{which}）", config.DATASET_ID, dest)
    _hub_download("dataset", config.DATASET_ID, dest, "SA1B-Dense-Caption 数据集", env, cmd, allow_patterns=patterns)
    files = _files_matching(dest, patterns)
    if not files:
        raise DownloadError(
            f"下载结束，但 {dest} 中没有符合 {patterns[:2]}{' …' if len(patterns) > 2 else ''} 的 parquet 分片。\n"
            f"  数据集的文件命名可能变了；可以试试 `{_rerun_cmd(config.DOWNLOAD_CMDS['data_root'], given, '--limit-shards 0')}`"
            f"（下载全部分片），"
            f"或在 {HUB_URL}/datasets/{config.DATASET_ID} 查看文件列表。"
        )
    if limit_shards > 0 and len(files) < limit_shards:
        print(f"注意：只找到 {len(files)} 个分片（请求 {limit_shards} 个），数据集可能没有这么多分片。")
    (dest / DATA_MARKER).write_text(
        json.dumps({"dataset_id": config.DATASET_ID, "limit_shards": limit_shards, "patterns": patterns,
                    "files": files, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")},
                   ensure_ascii=False, indent=2),
        encoding="utf-8",
    )
    print(f"数据下载完成：{len(files)} 个分片，位于 {dest / 'data'}")
    return dest


# --------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llava_lib.download",
        description="从 ModelScope 下载真实模型与数据（full 配置档）。默认保存位置见 llava_lib.config.resolve('full')。",
    )
    parser.add_argument("what", choices=("clip", "llm", "data"), help="clip: Chinese-CLIP；llm: Qwen3-0.6B；data: SA1B-Dense-Caption")
    parser.add_argument("--dest", type=Path, default=None, help="保存目录（默认取 full 配置档的路径）")
    parser.add_argument("--limit-shards", type=int, default=DEFAULT_DATA_SHARDS,
                        help=f"只下载前 N 个数据分片（默认 {DEFAULT_DATA_SHARDS}；0 表示全部）；仅用于 data")
    parser.add_argument("--force", action="store_true", help="即使本地已完整也重新下载（clip 会重新转换）")
    args = parser.parse_args(argv)

    from llava_lib.model.convert_modelscope import CheckpointMismatchError

    try:
        if args.what == "clip":
            path = download_clip(args.dest, force=args.force)
        elif args.what == "llm":
            path = download_llm(args.dest, force=args.force)
        else:
            path = download_data(args.dest, limit_shards=args.limit_shards, force=args.force)
    except (DownloadError, config.MissingResourceError, CheckpointMismatchError, FileExistsError) as e:
        print(f"错误：{e}", file=sys.stderr)
        return 1
    print(f"完成：{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
