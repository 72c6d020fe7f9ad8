"""The environment report of ``00_environment``: Python, PyTorch, CUDA, GPUs, flash-attention, disk space. It only
reads the machine; nothing is downloaded or installed."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

FLASH_ATTN_VERSION = "2.8.3"
# The release's wheels as (CUDA major, torch major.minor, CPython tags, C++11 ABI values), Linux x86_64 only: its
# workflow builds CUDA 12 for torch 2.4-2.8 (no torch 2.4 + Python 3.13); the torch 2.9/2.10 wheels added later are
# known for Python 3.12 and the C++11 ABI only. A combination missing here gets no URL rather than one that 404s.
_PY = ("cp39", "cp310", "cp311", "cp312", "cp313")
FLASH_ATTN_RELEASE_MATRIX = (("12", ("2.4",), _PY[:-1], (True, False)),
                             ("12", ("2.5", "2.6", "2.7", "2.8"), _PY, (True, False)),
                             ("12", ("2.9",), ("cp312",), (True,)), ("13", ("2.9", "2.10"), ("cp312",), (True,)))
GIB = 1024 ** 3
PACKAGES = ("transformers", "modelscope", "safetensors", "ipywidgets", "tensorboard")


class FlashAttnWheel(NamedTuple):
    name: str
    url: str


def _combo(torch_version: str, cuda_version: str, python_version, cxx11_abi: bool) -> tuple[str, str, str, str]:
    """``(cu12, 2.8, cp311, TRUE)``: one wheel per CUDA major version; torch's patch version does not matter."""
    py = python_version if isinstance(python_version, str) else f"cp{python_version[0]}{python_version[1]}"
    torch_mm = ".".join(torch_version.split("+")[0].split(".")[:2])
    return str(cuda_version).split(".")[0], torch_mm, py, "TRUE" if cxx11_abi else "FALSE"


def flash_attn_wheel(torch_version: str, cuda_version: str | None, python_version: tuple[int, int] | str,
                     cxx11_abi: bool, platform_tag: str = "linux_x86_64") -> FlashAttnWheel | None:
    """The prebuilt flash-attn wheel for this machine (``python_version``: ``(3, 11)`` or ``"cp311"``), or None when
    the release has none for it, a CPU-only torch included."""
    if not cuda_version:
        return None
    cuda, torch_mm, py, abi = _combo(torch_version, cuda_version, python_version, cxx11_abi)
    if platform_tag != "linux_x86_64" or not any(cuda == c and torch_mm in t and py in p and cxx11_abi in a
                                                 for c, t, p, a in FLASH_ATTN_RELEASE_MATRIX):
        return None
    name = f"flash_attn-{FLASH_ATTN_VERSION}+cu{cuda}torch{torch_mm}cxx11abi{abi}-{py}-{py}-{platform_tag}.whl"
    release = f"https://github.com/Dao-AILab/flash-attention/releases/download/v{FLASH_ATTN_VERSION}"
    return FlashAttnWheel(name, f"{release}/{name}")


def flash_attn_advice(torch_version: str, cuda_version: str | None, python_version: tuple[int, int] | str,
                      cxx11_abi: bool, platform_tag: str = "linux_x86_64") -> str:
    """What a student reads about flash-attention on this machine (Chinese): the wheel to install, or why not."""
    if not cuda_version:
        return "这是 CPU 版的 PyTorch：flash-attention 需要 CUDA 和 NVIDIA GPU。llava_lib 使用 PyTorch 自带的 SDPA 注意力，这没有问题。"
    wheel = flash_attn_wheel(torch_version, cuda_version, python_version, cxx11_abi, platform_tag)
    if wheel is not None:
        return f"匹配的预编译包：{wheel.name}\n  安装：pip install {wheel.url}"
    cuda, torch_mm, py, abi = _combo(torch_version, cuda_version, python_version, cxx11_abi)
    return (f"flash-attn {FLASH_ATTN_VERSION} 没有与这台机器（PyTorch {torch_mm} + CUDA {cuda} + Python {py} + "
            f"C++11 ABI {abi} + {platform_tag}）对应的预编译包。不用装：llava_lib 会使用 PyTorch 自带的 SDPA 注意力，"
            f"对 Qwen3-0.6B 来说完全够用。（一定要装的话只能从源码编译：pip install flash-attn=={FLASH_ATTN_VERSION} "
            f"--no-build-isolation，需要 nvcc，要编译很久。）")


class GPUInfo(NamedTuple):
    index: int
    name: str
    memory_gib: float
    capability: tuple[int, int]
    bf16: bool


class DiskInfo(NamedTuple):
    path: str  # the first of the asked-for folders on this file system
    free_gib: float
    total_gib: float


@dataclass
class EnvReport:
    python: str
    platform: str
    torch: str
    cuda_version: str | None            # the CUDA torch was built with (torch.version.cuda)
    cudnn: int | None
    cxx11_abi: bool
    gpus: list[GPUInfo] = field(default_factory=list)
    flash_attn: str | None = None       # installed version, or None
    wheel: FlashAttnWheel | None = None  # the prebuilt wheel for this machine, when the release has one
    flash_attn_advice: str = ""          # Chinese: that wheel, or why there is none
    attention: str = "sdpa"             # what llava_lib will use on this machine
    disks: list[DiskInfo] = field(default_factory=list)
    packages: dict[str, str | None] = field(default_factory=dict)

    def format(self) -> str:
        """The report as Chinese text, one fact per line."""
        lines = [f"Python        {self.python}（{self.platform}）",
                 f"PyTorch       {self.torch}（C++11 ABI：{'是' if self.cxx11_abi else '否'}）",
                 f"CUDA（编译）   {self.cuda_version}；cuDNN {self.cudnn}" if self.cuda_version else
                 "CUDA          这是 CPU 版的 PyTorch（torch.version.cuda 为空）"]
        lines += [f"GPU {g.index}         {g.name}，显存 {g.memory_gib:.1f} GiB，计算能力 {g.capability[0]}.{g.capability[1]}，"
                  f"bf16：{'支持' if g.bf16 else '不支持'}" for g in self.gpus] or [
                  "GPU           没有可用的 GPU：训练和聊天会在 CPU 上运行（迷你世界足够，真实模型会很慢）"]
        lines.append(f"flash-attn    {'已安装 ' + self.flash_attn if self.flash_attn else '未安装'}；"
                     f"llava_lib 将使用的注意力实现：{self.attention}")
        if not self.flash_attn and self.flash_attn_advice:
            lines.append(f"  {self.flash_attn_advice}")
        lines += [f"{name:13s} {version or '未安装'}" for name, version in self.packages.items()]
        lines += [f"磁盘          {d.path} 所在分区：可用 {d.free_gib:.1f} GiB / 共 {d.total_gib:.1f} GiB" for d in self.disks]
        return "\n".join(lines)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect(disk_paths=()) -> EnvReport:
    """Read this machine. ``disk_paths``: folders whose free space matters (models, data, cache, checkpoints)."""
    import torch

    from .model.loading import pick_attention
    cuda = torch.cuda.is_available()
    abi = bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    platform_tag = sysconfig.get_platform().replace("-", "_").replace(".", "_")  # linux_x86_64, win_amd64 ...
    versions = (torch.__version__, torch.version.cuda, sys.version_info[:2], abi, platform_tag)
    gpus = []
    for i in range(torch.cuda.device_count() if cuda else 0):
        props = torch.cuda.get_device_properties(i)
        with torch.cuda.device(i):
            bf16 = bool(torch.cuda.is_bf16_supported())
        gpus.append(GPUInfo(i, props.name, props.total_memory / GIB, (props.major, props.minor), bf16))
    disks = {}
    for p in (Path(p).expanduser().resolve() for p in disk_paths):
        while not p.exists() and p != p.parent:  # the nearest existing parent
            p = p.parent
        usage = shutil.disk_usage(p)
        disks.setdefault(p.stat().st_dev, DiskInfo(str(p), usage.free / GIB, usage.total / GIB))  # one per file system
    return EnvReport(
        python=platform.python_version(), platform=f"{platform.system()} {platform.machine()}",
        torch=torch.__version__, cuda_version=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if cuda else None, cxx11_abi=abi, gpus=gpus,
        flash_attn=_version("flash-attn") or _version("flash_attn") if importlib.util.find_spec("flash_attn") else None,
        wheel=flash_attn_wheel(*versions), flash_attn_advice=flash_attn_advice(*versions),
        attention=pick_attention(torch.device("cuda" if cuda else "cpu")), disks=list(disks.values()),
        packages={name: _version(name) for name in PACKAGES})


# The commands a student runs on the GPU machine to get the real models and data (README, "切换到真实模型").
DOWNLOAD_STEPS = (
    ("python -m llava_lib.download clip", "Chinese-CLIP ViT-B/16（iic/multi-modal_clip-vit-base-patch16_zh），并转换成 transformers 格式"),
    ("python -m llava_lib.download llm", "Qwen3-0.6B（Qwen/Qwen3-0.6B）"),
    ("python -m llava_lib.download data", "SA1B-Dense-Caption（Tongyi-DataEngine/SA1B-Dense-Caption）的前若干个 parquet 分片"),
    ("python -m llava_lib.data prepare --profile full --limit 100000", "一次性抓取图片，缩放到 224 px，存入本地缓存"),
)


def download_instructions() -> str:
    """The ModelScope download commands, in order, each with what it fetches."""
    return "\n".join(["在 GPU 机器的终端里（项目根目录下）依次运行："] + [f"  {cmd:62s} # {what}" for cmd, what in DOWNLOAD_STEPS]
                     + ["然后 export LLAVA_PROFILE=full（或在项目根目录写 llava.toml：profile = \"full\"），再启动 JupyterLab，"
                        "所有笔记本和命令都会切换。"])
