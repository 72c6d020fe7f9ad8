"""One place that answers "where are the models and the data?".

Profiles:
- ``mini`` (default): the offline mini world built by ``python -m llava_lib.mini build``.
- ``full``: the real Chinese-CLIP ViT-B/16, Qwen3-0.6B and SA1B-Dense-Caption, downloaded from ModelScope.

Precedence, highest first: keyword arguments > environment variables (``LLAVA_*``) > config file > profile
defaults. The config file is TOML, found at ``$LLAVA_CONFIG`` or ``./llava.toml``; keys are the field names of
:class:`Paths` (``profile``, ``clip_path``, ``llm_path``, ``data_root`` ...) at the top level, or inside a
``[mini]`` / ``[full]`` table that applies to that profile only.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

PROFILES = ("mini", "full")

# ModelScope ids of the real run (DESIGN.md, decision 2 and 7).
CLIP_MODEL_ID = "iic/multi-modal_clip-vit-base-patch16_zh"
LLM_MODEL_ID = "Qwen/Qwen3-0.6B"
DATASET_ID = "Tongyi-DataEngine/SA1B-Dense-Caption"

# Commands a student runs to produce each resource; error messages quote them verbatim.
BUILD_MINI_CMD = "python -m llava_lib.mini build"
DOWNLOAD_CMDS = {
    "clip_path": "python -m llava_lib.download clip",
    "llm_path": "python -m llava_lib.download llm",
    "data_root": "python -m llava_lib.download data",
    "eval_data_root": "python -m llava_lib.download data",
    "cache_dir": "python -m llava_lib.data prepare --profile full",
}

ENV_VARS = {
    "profile": "LLAVA_PROFILE",
    "clip_path": "LLAVA_CLIP_PATH",
    "llm_path": "LLAVA_LLM_PATH",
    "data_root": "LLAVA_DATA_ROOT",
    "eval_data_root": "LLAVA_EVAL_DATA_ROOT",
    "cache_dir": "LLAVA_CACHE_DIR",
    "checkpoints_dir": "LLAVA_CHECKPOINTS_DIR",
}

_WHAT = {
    "clip_path": "Chinese-CLIP 模型目录",
    "llm_path": "Qwen3 模型目录",
    "data_root": "SA1B-Dense-Caption 数据目录（其中应有 data/*.parquet）",
    "eval_data_root": "验证集数据目录（其中应有 data/*.parquet）",
    "cache_dir": "图片缓存目录",
    "checkpoints_dir": "检查点目录",
}


class MissingResourceError(FileNotFoundError):
    """A model or data path that does not exist or is incomplete; the message says how to get it."""


class ConfigError(ValueError):
    """A malformed config file or an unknown profile / key."""


def repo_root() -> Path | None:
    """The checkout this package lives in (``pyproject.toml`` beside ``llava_lib``), if any."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").exists() and (here / "llava_lib").is_dir() else None


def llava_home() -> Path:
    """Where downloads and the mini world live: ``$LLAVA_HOME``, else ``<repo>/.cache``, else ``~/.cache/llava_course``."""
    env = os.environ.get("LLAVA_HOME")
    if env:
        return Path(env).expanduser()
    root = repo_root()
    if root is not None and os.access(root, os.W_OK):
        return root / ".cache"
    return Path.home() / ".cache" / "llava_course"


def mini_root() -> Path:
    return llava_home() / "mini"


@dataclass(frozen=True)
class Paths:
    """Resolved locations. ``eval_data_root=None`` means: hold out rows of ``data_root`` for eval."""

    profile: str
    clip_path: Path
    llm_path: Path
    data_root: Path
    eval_data_root: Path | None
    cache_dir: Path
    checkpoints_dir: Path

    def describe(self) -> str:
        lines = [f"配置档（profile）: {self.profile}"]
        for f in fields(self)[1:]:
            value = getattr(self, f.name)
            mark = "✓" if value is not None and Path(value).exists() else "✗"
            lines.append(f"  {mark} {f.name:16s} {value}")
        return "\n".join(lines)

    def require(self, *names: str) -> "Paths":
        """Raise :class:`MissingResourceError` for the first named path that is missing."""
        for name in names:
            check_path(self, name)
        return self


def _defaults(profile: str) -> dict:
    home = llava_home()
    root_ckpt = (repo_root() or home) / "checkpoints"
    if profile == "mini":
        m = home / "mini"
        return dict(
            clip_path=m / "clip",
            llm_path=m / "llm",
            data_root=m / "sa1b",
            eval_data_root=m / "sa1b_eval",
            cache_dir=m / "cache",
            checkpoints_dir=root_ckpt,
        )
    return dict(
        clip_path=home / "models" / "chinese-clip-vit-base-patch16",
        llm_path=home / "models" / LLM_MODEL_ID,
        data_root=home / "datasets" / "SA1B-Dense-Caption",
        eval_data_root=None,
        cache_dir=home / "image_cache" / "sa1b",
        checkpoints_dir=root_ckpt,
    )


def _config_file() -> Path | None:
    env = os.environ.get("LLAVA_CONFIG")
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise ConfigError(f"LLAVA_CONFIG 指向的配置文件不存在：{p}。请检查路径，或取消该环境变量。")
        return p
    p = Path.cwd() / "llava.toml"
    return p if p.is_file() else None


def _read_config_file(path: Path) -> dict:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"配置文件 {path} 不是合法的 TOML：{e}") from e
    known = {f.name for f in fields(Paths)} | set(PROFILES)
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"配置文件 {path} 中有未知的键：{sorted(unknown)}；可用的键：{sorted(known)}")
    return data


def resolve(profile: str | None = None, **overrides) -> Paths:
    """Resolve every path once. Nothing is checked for existence here; call :meth:`Paths.require`."""
    file_path = _config_file()
    file_cfg = _read_config_file(file_path) if file_path else {}
    profile = profile or os.environ.get(ENV_VARS["profile"]) or file_cfg.get("profile") or "mini"
    if profile not in PROFILES:
        raise ConfigError(f"未知的配置档 {profile!r}；可选：{', '.join(PROFILES)}")
    values = _defaults(profile)
    section = file_cfg.get(profile, {})
    for name in values:
        for source in (file_cfg, section):
            if name in source:
                values[name] = source[name]
        env = os.environ.get(ENV_VARS[name])
        if env:
            values[name] = env
        if overrides.get(name) is not None:
            values[name] = overrides[name]
    bad = set(overrides) - set(values)
    if bad:
        raise ConfigError(f"resolve() 不认识这些参数：{sorted(bad)}")
    for name, value in values.items():
        if value is not None:
            values[name] = Path(value).expanduser()
    return Paths(profile=profile, **values)


def how_to_get(paths: Paths, name: str) -> str:
    """The command that produces the resource ``name`` for this profile."""
    if paths.profile == "mini":
        return BUILD_MINI_CMD
    return DOWNLOAD_CMDS.get(name, "")


_MARKERS = {
    # A directory is complete when these files are there (transformers' from_pretrained needs them).
    "clip_path": ("config.json",),
    "llm_path": ("config.json",),
}


def check_path(paths: Paths, name: str) -> Path:
    """Return the path ``name`` if it exists and looks complete, else raise with the fix."""
    value = getattr(paths, name)
    what = _WHAT.get(name, name)
    env = ENV_VARS.get(name, "")
    fix = how_to_get(paths, name)
    if value is None:
        raise MissingResourceError(f"{what} 未配置（profile={paths.profile}）。请设置环境变量 {env}。")
    value = Path(value)
    problem = None
    if not value.exists():
        problem = "不存在"
    else:
        missing = [m for m in _MARKERS.get(name, ()) if not (value / m).exists()]
        if missing:
            problem = f"不完整（缺少 {', '.join(missing)}）"
        elif name in ("data_root", "eval_data_root") and not any((value / "data").glob("*.parquet")):
            problem = "中没有 data/*.parquet"
    if problem:
        raise MissingResourceError(
            f"{what} {problem}：{value}\n"
            f"  解决办法：运行 `{fix}` 生成/下载它，或把环境变量 {env} 指向已有的目录。"
        )
    return value


def with_profile(paths: Paths, **changes) -> Paths:
    """A copy with some fields changed (paths stay immutable)."""
    return replace(paths, **{k: Path(v) if v is not None and k != "profile" else v for k, v in changes.items()})
