"""Which models, which data, which settings, per profile: ``mini`` (the offline mini world, default) or ``full``
(the real Chinese-CLIP ViT-B/16, Qwen3-0.6B and SA1B-Dense-Caption from ModelScope).

:class:`TrainConfig` holds a run's paths and hyperparameters; :func:`resolve` turns its path fields into
:class:`Paths`. Precedence: keyword arguments > environment (profile and paths only) > config file (see
:func:`find_config_file`; ``TrainConfig`` fields at the top level or in a ``[mini]`` / ``[full]`` table) > defaults.
"""
from __future__ import annotations

import argparse
import os
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

PROFILES = ("mini", "full")

# ModelScope ids of the real run.
CLIP_MODEL_ID = "iic/multi-modal_clip-vit-base-patch16_zh"
LLM_MODEL_ID = "Qwen/Qwen3-0.6B"
DATASET_ID = "Tongyi-DataEngine/SA1B-Dense-Caption"
# Stage 2: CogVLM-SFT-311K (ModelScope), whose Chinese part is ~133k single- and multi-turn conversations.
SFT_DATASET_ID = "ZhipuAI/CogVLM-SFT-311K"

# Commands a student runs to produce each resource; error messages quote them verbatim.
BUILD_MINI_CMD = "python -m llava_lib.mini build"
DOWNLOAD_CMDS = {
    "clip_path": "python -m llava_lib.download clip",
    "llm_path": "python -m llava_lib.download llm",
    "data_root": "python -m llava_lib.download data",
    "eval_data_root": "python -m llava_lib.download data",
    "cache_dir": "python -m llava_lib.data prepare --profile full --limit 100000",
    "sft_root": "python -m llava_lib.download sft",
}

PATH_FIELDS = ("clip_path", "llm_path", "data_root", "eval_data_root", "cache_dir", "checkpoints_dir", "sft_root")
ENV_VARS = {name: f"LLAVA_{name.upper()}" for name in ("profile", *PATH_FIELDS)}


class MissingResourceError(FileNotFoundError):
    """A model or data path that does not exist or is incomplete; the message says how to get it."""


class ConfigError(ValueError):
    """A malformed config file or an unknown profile / key."""


def repo_root() -> Path | None:
    """The checkout this package lives in (``pyproject.toml`` beside ``llava_lib``), if any."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").exists() and (here / "llava_lib").is_dir() else None


def llava_home() -> Path:
    """Where downloads and the mini world live: ``$LLAVA_HOME``, else ``<repo>/.cache`` (when writable), else
    ``~/.cache/llava_course``."""
    if os.environ.get("LLAVA_HOME"):
        return Path(os.environ["LLAVA_HOME"]).expanduser()
    root = repo_root()
    return root / ".cache" if root is not None and os.access(root, os.W_OK) else Path.home() / ".cache" / "llava_course"


def mini_root() -> Path:
    return llava_home() / "mini"


# ------------------------------------------------------------------------------------------------- paths
@dataclass(frozen=True)
class Paths:
    """Resolved locations. ``eval_data_root=None``: ``data prepare`` holds out the last shard of ``data_root`` as
    ``cache_dir/eval``."""

    profile: str
    clip_path: Path
    llm_path: Path
    data_root: Path
    eval_data_root: Path | None
    cache_dir: Path
    checkpoints_dir: Path
    sft_root: Path

    def describe(self) -> str:
        values = {f.name: getattr(self, f.name) for f in fields(self)[1:]}
        return "\n".join([f"配置档（profile）: {self.profile}"] + [
            f"  {'✓' if v is not None and Path(v).exists() else '✗'} {k:16s} {v}" for k, v in values.items()])

    def require(self, *names: str) -> "Paths":
        """Raise :class:`MissingResourceError` for the first named path that is missing."""
        for name in names:
            check_path(self, name)
        return self


def _default_paths(profile: str) -> dict:
    home = llava_home()
    root_ckpt = (repo_root() or home) / "checkpoints"
    if profile == "mini":
        m = home / "mini"
        return dict(clip_path=m / "clip", llm_path=m / "llm", data_root=m / "sa1b", eval_data_root=m / "sa1b_eval",
                    cache_dir=m / "cache", checkpoints_dir=root_ckpt, sft_root=m / "sft")
    return dict(clip_path=home / "models" / "chinese-clip-vit-base-patch16", llm_path=home / "models" / LLM_MODEL_ID,
                data_root=home / "datasets" / "SA1B-Dense-Caption", eval_data_root=None,
                cache_dir=home / "image_cache" / "sa1b", checkpoints_dir=root_ckpt,
                sft_root=home / "datasets" / "CogVLM-SFT-311K")


# ---------------------------------------------------------------------------------------- run settings
def _h(text: str, default=None):
    """A dataclass field whose help text is also the command-line help (and names the path in errors)."""
    return field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    """Everything one training run needs. ``for_profile`` fills it in; every field is also a ``llava-train`` flag."""

    profile: str = _h("配置档：mini（迷你世界）或 full（真实模型）", "mini")
    out_dir: str | None = _h("输出目录（默认 <checkpoints_dir>/stage1-<profile>）")
    # paths: None = the profile's default (or its environment variable / llava.toml)
    clip_path: str | None = _h("Chinese-CLIP 模型目录（transformers 或 ModelScope 格式）")
    llm_path: str | None = _h("Qwen3 模型目录")
    data_root: str | None = _h("SA1B-Dense-Caption 数据目录（其中应有 data/*.parquet）")
    eval_data_root: str | None = _h("验证集数据目录（其中应有 data/*.parquet）")
    cache_dir: str | None = _h("图片缓存目录")
    checkpoints_dir: str | None = _h("检查点的根目录")
    sft_root: str | None = _h("Stage 2 对话数据目录（CogVLM-SFT-311K 的格式）")
    stage: int = _h("训练阶段：1（只训练投影层）或 2（投影层 + LLM，视觉指令微调）", 1)
    stage1: str | None = _h("Stage 2 的起点：Stage 1 运行的目录或其 final/（迷你世界不写时先自动训练 Stage 1）")
    # data
    limit: int | None = _h("只用前 N 个训练样本（不写则全部）", 100_000)
    eval_limit: int = _h("验证样本数", 500)
    max_text_tokens: int = _h("文本最大词元数（不含图片的 197 个词元）", 128)
    instructions: str | None = _h("Stage 1 训练时随机抽取的指令池 '模块:名字'（评估总用固定指令）",
                                  "llava_lib.process:CAPTION_INSTRUCTIONS")
    eval_fraction: float = _h("Stage 2 留作验证的对话比例", 0.02)
    group_by_length: bool = _h("把长度相近的样本放进同一批（减少填充）", True)
    num_workers: int = _h("DataLoader 的进程数", 2)
    # optimisation (the original course's defaults)
    batch_size: int = _h("每步（每个进程）的批量大小", 16)
    grad_accum: int = _h("梯度累积步数", 1)
    epochs: int = _h("训练轮数", 1)
    max_steps: int | None = _h("最多训练多少步（不写则跑完全部轮数）")
    lr: float = _h("学习率（峰值）", 2e-3)
    weight_decay: float = _h("权重衰减", 0.0)
    warmup_ratio: float = _h("预热步数占总步数的比例", 0.03)
    min_lr_ratio: float = _h("余弦退火的最低学习率（占峰值的比例）", 0.0)
    max_grad_norm: float | None = _h("梯度裁剪的范数上限（不写则不裁剪）")
    train_embeddings: bool = _h("Stage 2 是否也训练 LLM 的词向量表（与之绑定的 LM 头一起）", True)
    lora: bool = _h("Stage 2 用 LoRA（peft）微调 LLM 的 q/k/v/o，而不是全部参数", False)
    lora_r: int = _h("LoRA 的秩", 8)
    lora_alpha: int = _h("LoRA 的缩放系数 alpha", 16)
    # model
    projector_type: str = _h("投影层类型：linear 或 mlp2x_gelu", "linear")
    feature_layer: int = _h("取视觉塔第几层的特征（-1 为最后一层）", -1)
    gradient_checkpointing: bool = _h("梯度检查点（省显存，慢一些）", False)
    accelerate: bool | None = _h("torch.compile 冻结的两个塔（不写：GPU 上开，CPU 上关）")
    head_loss: str = _h("LM 头的损失：auto、lean、fused，或 '模块:工厂函数'", "auto")
    caption_metric: str | None = _h("描述是否正确的判定函数 '模块:函数'（迷你世界自带；不写则不计算准确率）")
    answer_metric: str | None = _h("Stage 2 回答是否正确的判定函数 '模块:函数'（迷你世界自带）")
    # bookkeeping
    eval_every: int = _h("每隔多少步评估一次（0 为不评估）", 500)
    save_every: int = _h("每隔多少步保存检查点（0 为只在结束时保存）", 500)
    keep_last: int = _h("保留最近几个检查点", 3)
    log_every: int = _h("每隔多少步记录一次", 10)
    caption_eval_n: int = _h("用多少张验证图片计算描述准确率", 0)
    caption_show_n: int = _h("每次评估展示几条生成的描述", 4)
    answer_eval_n: int = _h("Stage 2 用多少段验证对话计算回答准确率", 0)
    seed: int = _h("随机种子", 42)
    device: str | None = _h("cpu / cuda（不写则自动选择）")
    resume: bool = _h("从输出目录中最后一个检查点继续", False)
    tensorboard: bool = _h("写 TensorBoard 日志", True)
    progress: bool = _h("显示进度条", True)

    @classmethod
    def for_profile(cls, profile: str | None = None, **overrides) -> "TrainConfig":
        """The profile's settings: defaults < profile defaults < config file < environment < ``overrides``."""
        file_cfg = _config_file_values()
        profile = profile or os.environ.get(ENV_VARS["profile"]) or file_cfg.get("profile") or "mini"
        if profile not in PROFILES:
            raise ConfigError(f"未知的配置档 {profile!r}；可选：{', '.join(PROFILES)}")
        names = {f.name for f in fields(cls)}
        bad = set(overrides) - names
        if bad:
            raise ConfigError(f"TrainConfig 没有这些设置：{sorted(bad)}")
        given = {k: v for source in (file_cfg, file_cfg.get(profile, {})) for k, v in source.items()
                 if k in names and k != "profile"}  # the profile's table wins over the top level
        given.update({k: os.environ[ENV_VARS[k]] for k in PATH_FIELDS if os.environ.get(ENV_VARS[k])})
        given.update(overrides)
        values = dict(PROFILE_DEFAULTS[profile])
        if int(given.get("stage", 1)) == 2:
            values.update(STAGE2_DEFAULTS[profile])
            if given.get("lora"):
                values.update(lr=STAGE2_LORA_LR)
        return cls(**{**values, **given, "profile": profile})

    @property
    def paths(self) -> Paths:
        return resolve(self.profile, **{k: getattr(self, k) for k in PATH_FIELDS})


PROFILE_DEFAULTS = {
    # The course's real run: first 100,000 samples, batch 16, lr 2e-3, cosine with 3% warmup.
    "full": dict(),
    # The mini world: small enough for two CPU cores, long enough to really learn. lr 1e-2, not 2e-3: a small
    # projection and a short run (1,000 steps: caption accuracy about 0.96; 500 steps at lr 3e-3: 0.77).
    # The mini world's two plug-ins: a cheaper exact head loss for its mostly-zero LM head, and its caption check.
    "mini": dict(limit=None, epochs=10, max_steps=1000, batch_size=16, lr=1e-2, eval_every=250, save_every=250,
                 caption_eval_n=100, eval_limit=200, num_workers=0,
                 head_loss="llava_lib.mini.loss:zero_rows_head_loss",
                 caption_metric="llava_lib.mini.scenes:caption_is_correct",
                 instructions="llava_lib.mini.corpus:CAPTION_PROMPTS"),
}

# Stage 2 on top of a profile's settings. full: the original course's train_stage2.py (AdamW 2e-5, batch 4, cosine
# with 3% warmup, gradient checkpointing, clipping 1.0, 512 text tokens, 2% held out). mini: see docs/ARCHITECTURE.md.
STAGE2_DEFAULTS = {
    "full": dict(lr=2e-5, batch_size=4, max_text_tokens=512, gradient_checkpointing=True, max_grad_norm=1.0,
                 eval_fraction=0.02, limit=None, eval_limit=500, caption_eval_n=0),
    # mini: the LM's 151,936 x 64 embedding table is 97% of its weights and all but ~130 rows are unused (zero);
    # training it took most of a step on a CPU and can only add noise to those rows, so it stays frozen here.
    "mini": dict(lr=2e-3, batch_size=16, max_steps=800, epochs=10, max_grad_norm=1.0, eval_fraction=0.1,
                 train_embeddings=False,
                 eval_every=400, save_every=400, caption_eval_n=0, answer_eval_n=100, eval_limit=300,
                 answer_metric="llava_lib.mini.qa:answer_is_correct"),
}
STAGE2_LORA_LR = 2e-4  # the original course's LoRA stage (r=8 on q/k/v/o)


# -------------------------------------------------------------------------------------------- the file
def find_config_file() -> Path | None:
    """``$LLAVA_CONFIG``, else ``llava.toml`` in the working directory, else at the repository root (which a kernel
    started in ``notebooks/`` also finds)."""
    env = os.environ.get("LLAVA_CONFIG")
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise ConfigError(f"LLAVA_CONFIG 指向的配置文件不存在：{p}。请检查路径，或取消该环境变量。")
        return p
    for folder in (Path.cwd(), repo_root()):
        if folder is not None and (folder / "llava.toml").is_file():
            return folder / "llava.toml"
    return None


def _config_file_values() -> dict:
    path = find_config_file()
    if path is None:
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"配置文件 {path} 不是合法的 TOML：{e}") from e
    known = {f.name for f in fields(TrainConfig)}
    for table in [data] + [data[p] for p in PROFILES if isinstance(data.get(p), dict)]:
        unknown = set(table) - known - set(PROFILES)
        if unknown:
            raise ConfigError(f"配置文件 {path} 中有未知的键：{sorted(unknown)}；可用的键：{sorted(known)}")
    return data


def resolve(profile: str | None = None, **overrides) -> Paths:
    """Resolve every path once. Nothing is checked for existence here; call :meth:`Paths.require`."""
    bad = set(overrides) - set(PATH_FIELDS)
    if bad:
        raise ConfigError(f"resolve() 不认识这些参数：{sorted(bad)}")
    cfg = TrainConfig.for_profile(profile, **{k: v for k, v in overrides.items() if v is not None})
    defaults = _default_paths(cfg.profile)
    values = {k: Path(getattr(cfg, k)).expanduser() if getattr(cfg, k) is not None else defaults[k]
              for k in PATH_FIELDS}
    return Paths(profile=cfg.profile, **values)


def how_to_get(paths: Paths, name: str) -> str:
    """The command that produces the resource ``name`` for this profile."""
    return BUILD_MINI_CMD if paths.profile == "mini" else DOWNLOAD_CMDS.get(name, "")


def check_path(paths: Paths, name: str) -> Path:
    """Return the path ``name`` if it exists and looks complete, else raise with the fix."""
    value, env = getattr(paths, name), ENV_VARS[name]
    what = next(f.metadata["help"] for f in fields(TrainConfig) if f.name == name)
    if value is None:
        raise MissingResourceError(f"{what} 未配置（profile={paths.profile}）。请设置环境变量 {env}。")
    value, problem = Path(value), None
    if not value.exists():
        problem = "不存在"
    elif name in ("clip_path", "llm_path") and not (value / "config.json").exists():
        from .model.convert_modelscope import is_modelscope_layout  # a ModelScope CLIP is converted on load
        if name == "llm_path":
            problem = "不完整（缺少 config.json）"
        elif not is_modelscope_layout(value):
            problem = "不完整（缺少 config.json（transformers 格式），也不是 ModelScope 格式）"
    elif name in ("data_root", "eval_data_root") and not any((value / "data").glob("*.parquet")):
        problem = "中没有 data/*.parquet"
    if problem:
        raise MissingResourceError(
            f"{what} {problem}：{value}\n"
            f"  解决办法：运行 `{how_to_get(paths, name)}` 生成/下载它，或把环境变量 {env} 指向已有的目录。")
    return value


# ------------------------------------------------------------------------------------------ the command line
def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per field of :class:`TrainConfig` (type from the annotation, help from the field); unset flags
    are None, so the profile's value applies."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        kind = (typing.get_args(hints[f.name]) or (hints[f.name],))[0]  # ``int | None`` -> int
        flag, help_text = f"--{f.name.replace('_', '-')}", f"{f.metadata['help']}（默认 {f.default}）"
        how = ({"action": argparse.BooleanOptionalAction} if kind is bool else
               {"type": kind, "choices": PROFILES if f.name == "profile" else None})
        parser.add_argument(flag, dest=f.name, default=None, help=help_text, **how)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
             if getattr(args, f.name, None) is not None and f.name != "profile"}
    return TrainConfig.for_profile(getattr(args, "profile", None), **given)
