"""The environment report of ``00_environment``: Python, PyTorch, CUDA, GPUs, flash-attention, disk space.

Everything here only reads the machine (nothing is downloaded or installed). :func:`flash_attn_wheel` computes
the name of the prebuilt flash-attn wheel that matches this torch / CUDA / Python / C++ ABI, following the
release naming of flash-attn 2.8.3 (its ``setup.py``, ``get_wheel_url``)::

    flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp311-cp311-linux_x86_64.whl
    https://github.com/Dao-AILab/flash-attention/releases/download/v2.8.3/<that name>

The official v2.8.3 release builds for CUDA 12 and PyTorch 2.4 - 2.8 on Linux; for another torch the name is
still computed (community builds use the same naming) but flagged as not official.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

FLASH_ATTN_VERSION = "2.8.3"
FLASH_ATTN_RELEASE_URL = "https://github.com/Dao-AILab/flash-attention/releases/download/v{version}/{name}"
# What the official v2.8.3 release page ships (CUDA major version, torch major.minor, CPython tags, platforms).
OFFICIAL_CUDA = ("12",)
OFFICIAL_TORCH = ("2.4", "2.5", "2.6", "2.7", "2.8")
OFFICIAL_PYTHON = ("cp39", "cp310", "cp311", "cp312", "cp313")
OFFICIAL_PLATFORMS = ("linux_x86_64",)
GIB = 1024 ** 3


@dataclass(frozen=True)
class FlashAttnWheel:
    name: str
    url: str
    official: bool      # in the official release's build matrix
    note: str = ""      # why not, in Chinese


def _major_minor(version: str) -> str:
    """'2.8.0+cu128' -> '2.8'."""
    parts = version.split("+")[0].split(".")
    return ".".join(parts[:2])


def wheel_platform(system: str | None = None, machine: str | None = None) -> str:
    """The platform tag flash-attn's release uses: ``linux_x86_64``, ``linux_aarch64``, ``win_amd64`` ..."""
    system = (system or platform.system()).lower()
    machine = machine or platform.machine()
    if system == "windows":
        return "win_amd64"
    return f"{system}_{machine}"


def flash_attn_wheel(torch_version: str, cuda_version: str | None, python_version: tuple[int, int] | str,
                     cxx11_abi: bool, platform_tag: str = "linux_x86_64",
                     flash_version: str = FLASH_ATTN_VERSION) -> FlashAttnWheel | None:
    """The prebuilt wheel for this combination, or None for a CPU-only torch (no ``torch.version.cuda``).

    ``python_version``: ``(3, 11)`` or ``"cp311"``. The CUDA part is the major version only (``cu12``): the
    release builds one wheel per CUDA major version, compatible across its minor versions.
    """
    if not cuda_version:
        return None
    py = python_version if isinstance(python_version, str) else f"cp{python_version[0]}{python_version[1]}"
    cuda_major = str(cuda_version).split(".")[0]
    torch_mm = _major_minor(torch_version)
    abi = "TRUE" if cxx11_abi else "FALSE"
    name = f"flash_attn-{flash_version}+cu{cuda_major}torch{torch_mm}cxx11abi{abi}-{py}-{py}-{platform_tag}.whl"
    url = FLASH_ATTN_RELEASE_URL.format(version=flash_version, name=name)
    reasons = []
    if cuda_major not in OFFICIAL_CUDA:
        reasons.append(f"CUDA {cuda_major}")
    if torch_mm not in OFFICIAL_TORCH:
        reasons.append(f"PyTorch {torch_mm}")
    if py not in OFFICIAL_PYTHON:
        reasons.append(f"Python {py}")
    if platform_tag not in OFFICIAL_PLATFORMS:
        reasons.append(f"平台 {platform_tag}")
    note = ""
    if reasons:
        note = (f"官方 v{flash_version} 发布页没有 {'、'.join(reasons)} 的预编译包（官方只有 CUDA 12 + PyTorch "
                f"{OFFICIAL_TORCH[0]}–{OFFICIAL_TORCH[-1]} + Linux x86_64）。可以找同名的社区预编译包，"
                f"或从源码编译：pip install flash-attn=={flash_version} --no-build-isolation（需要 nvcc，耗时较长）。"
                f"不装也没关系：会自动使用 PyTorch 自带的 SDPA 注意力。")
    return FlashAttnWheel(name, url, not reasons, note)


@dataclass
class GPUInfo:
    index: int
    name: str
    memory_gib: float
    capability: tuple[int, int]
    bf16: bool


@dataclass
class DiskInfo:
    path: str           # the mount point of the file system
    free_gib: float
    total_gib: float
    device: int = 0     # st_dev: one line per file system


@dataclass
class EnvReport:
    python: str
    platform: str
    torch: str
    cuda_available: bool
    cuda_version: str | None            # the CUDA torch was built with (torch.version.cuda)
    cudnn: int | None
    cxx11_abi: bool
    gpus: list[GPUInfo] = field(default_factory=list)
    flash_attn: str | None = None       # installed version, or None
    wheel: FlashAttnWheel | None = None
    attention: str = "sdpa"             # what llava_lib will use on this machine
    disks: list[DiskInfo] = field(default_factory=list)
    packages: dict[str, str | None] = field(default_factory=dict)

    def format(self) -> str:
        """The report as Chinese text, one fact per line."""
        lines = [f"Python        {self.python}（{self.platform}）",
                 f"PyTorch       {self.torch}（C++11 ABI：{'是' if self.cxx11_abi else '否'}）"]
        if self.cuda_version:
            lines.append(f"CUDA（编译）   {self.cuda_version}；cuDNN {self.cudnn}")
        else:
            lines.append("CUDA          这是 CPU 版的 PyTorch（torch.version.cuda 为空）")
        if self.gpus:
            for g in self.gpus:
                lines.append(f"GPU {g.index}         {g.name}，显存 {g.memory_gib:.1f} GiB，计算能力 "
                             f"{g.capability[0]}.{g.capability[1]}，bf16：{'支持' if g.bf16 else '不支持'}")
        else:
            lines.append("GPU           没有可用的 GPU：训练和聊天会在 CPU 上运行（迷你世界足够，真实模型会很慢）")
        lines.append(f"flash-attn    {'已安装 ' + self.flash_attn if self.flash_attn else '未安装'}；"
                     f"llava_lib 将使用的注意力实现：{self.attention}")
        if self.wheel is not None:
            lines.append(f"  匹配的预编译包：{self.wheel.name}")
            lines.append(f"  下载地址：{self.wheel.url}")
            if self.wheel.note:
                lines.append(f"  注意：{self.wheel.note}")
        else:
            lines.append("  flash-attention 需要 CUDA 版的 PyTorch 和 NVIDIA GPU；CPU 上使用 SDPA 即可。")
        for name, version in self.packages.items():
            lines.append(f"{name:13s} {version or '未安装'}")
        for d in self.disks:
            lines.append(f"磁盘          {d.path} 所在分区：可用 {d.free_gib:.1f} GiB / 共 {d.total_gib:.1f} GiB")
        return "\n".join(lines)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def disk_info(path) -> DiskInfo:
    """Free space of the file system that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).expanduser().resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    usage = shutil.disk_usage(p)
    mount = p
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return DiskInfo(str(mount), usage.free / GIB, usage.total / GIB, os.stat(p).st_dev)


def gpu_infos() -> list[GPUInfo]:
    import torch
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        cap = (props.major, props.minor)
        with torch.cuda.device(i):
            bf16 = bool(torch.cuda.is_bf16_supported())
        out.append(GPUInfo(i, props.name, props.total_memory / GIB, cap, bf16))
    return out


PACKAGES = ("transformers", "modelscope", "safetensors", "ipywidgets", "tensorboard")


def collect(disk_paths=()) -> EnvReport:
    """Read this machine. ``disk_paths``: folders whose free space matters (models, data, cache, checkpoints)."""
    import torch

    from .model.loading import pick_attention
    cuda = torch.cuda.is_available()
    abi = bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    wheel = flash_attn_wheel(torch.__version__, torch.version.cuda, sys.version_info[:2], abi, wheel_platform())
    seen, disks = set(), []
    for p in disk_paths:
        d = disk_info(p)
        if d.device not in seen:  # one line per file system
            seen.add(d.device)
            disks.append(d)
    return EnvReport(
        python=platform.python_version(), platform=f"{platform.system()} {platform.machine()}",
        torch=torch.__version__, cuda_available=cuda, cuda_version=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if cuda else None, cxx11_abi=abi, gpus=gpu_infos(),
        flash_attn=_version("flash-attn") or _version("flash_attn") if importlib.util.find_spec("flash_attn") else None,
        wheel=wheel, attention=pick_attention(torch.device("cuda" if cuda else "cpu")), disks=disks,
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
    lines = ["在 GPU 机器的终端里（项目根目录下）依次运行："]
    for cmd, what in DOWNLOAD_STEPS:
        lines.append(f"  {cmd:62s} # {what}")
    lines.append("然后把每个笔记本第一个代码单元格里的 PROFILE = \"mini\" 改成 PROFILE = \"full\"。")
    return "\n".join(lines)
