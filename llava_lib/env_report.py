"""The environment report of ``00_environment``: Python, PyTorch, CUDA, GPUs, flash-attention, disk space.

Everything here only reads the machine (nothing is downloaded or installed). :func:`flash_attn_wheel` names the
prebuilt flash-attn 2.8.3 wheel for this Python / torch / CUDA / C++ ABI / platform, and only when the release
really has one; otherwise :func:`flash_attn_advice` says so and that PyTorch's SDPA attention is used, which is
fine for this course. The release's wheels are named (``get_wheel_url`` in flash-attn's ``setup.py``)::

    flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp311-cp311-linux_x86_64.whl
    https://github.com/Dao-AILab/flash-attention/releases/download/v2.8.3/<that name>
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

# The wheels of the v2.8.3 release, as (CUDA major, torch major.minor, CPython tags, C++11 ABI values); Linux x86_64
# only. Where this comes from:
# - the release workflow (.github/workflows/publish.yml of the 2.8 series) builds with CUDA 12.9 for torch 2.4.0,
#   2.5.1, 2.6.0, 2.7.1 and 2.8.0, Python 3.9-3.13, both ABIs, without torch 2.4 + Python 3.13 (torch 2.4 has no
#   Python 3.13 build);
# - wheels for torch 2.9 (CUDA 12 and 13) and torch 2.10 (CUDA 13) were added to the same release later; public
#   install instructions that use them name only Python 3.12 and the C++11 ABI, so only those are listed here.
# A combination missing here gets no URL: better "no prebuilt wheel, SDPA is used" than a link that answers 404.
_PY_39_313 = ("cp39", "cp310", "cp311", "cp312", "cp313")
FLASH_ATTN_RELEASE_MATRIX = (
    ("12", ("2.4",), _PY_39_313[:-1], (True, False)),
    ("12", ("2.5", "2.6", "2.7", "2.8"), _PY_39_313, (True, False)),
    ("12", ("2.9",), ("cp312",), (True,)),
    ("13", ("2.9", "2.10"), ("cp312",), (True,)),
)
FLASH_ATTN_PLATFORMS = ("linux_x86_64",)
GIB = 1024 ** 3


@dataclass(frozen=True)
class FlashAttnWheel:
    name: str
    url: str


def _major_minor(version: str) -> str:
    """'2.8.0+cu128' -> '2.8'."""
    parts = version.split("+")[0].split(".")
    return ".".join(parts[:2])


def _python_tag(python_version: tuple[int, int] | str) -> str:
    return python_version if isinstance(python_version, str) else f"cp{python_version[0]}{python_version[1]}"


def wheel_platform(system: str | None = None, machine: str | None = None) -> str:
    """The platform tag flash-attn's release uses: ``linux_x86_64``, ``linux_aarch64``, ``win_amd64`` ..."""
    system = (system or platform.system()).lower()
    machine = machine or platform.machine()
    if system == "windows":
        return "win_amd64"
    return f"{system}_{machine}"


def has_prebuilt_wheel(cuda_major: str, torch_mm: str, python_tag: str, cxx11_abi: bool, platform_tag: str) -> bool:
    """Whether :data:`FLASH_ATTN_RELEASE_MATRIX` lists this combination."""
    if platform_tag not in FLASH_ATTN_PLATFORMS:
        return False
    return any(cuda_major == cuda and torch_mm in torches and python_tag in pythons and cxx11_abi in abis
               for cuda, torches, pythons, abis in FLASH_ATTN_RELEASE_MATRIX)


def flash_attn_wheel(torch_version: str, cuda_version: str | None, python_version: tuple[int, int] | str,
                     cxx11_abi: bool, platform_tag: str = "linux_x86_64") -> FlashAttnWheel | None:
    """The prebuilt flash-attn wheel for this machine, or None when the release has none for it (a CPU-only torch
    included: no ``torch.version.cuda``).

    ``python_version``: ``(3, 11)`` or ``"cp311"``. The CUDA part is the major version only (``cu12``): the release
    builds one wheel per CUDA major version, compatible across its minor versions.
    """
    if not cuda_version:
        return None
    py = _python_tag(python_version)
    cuda_major = str(cuda_version).split(".")[0]
    torch_mm = _major_minor(torch_version)
    if not has_prebuilt_wheel(cuda_major, torch_mm, py, cxx11_abi, platform_tag):
        return None
    abi = "TRUE" if cxx11_abi else "FALSE"
    name = f"flash_attn-{FLASH_ATTN_VERSION}+cu{cuda_major}torch{torch_mm}cxx11abi{abi}-{py}-{py}-{platform_tag}.whl"
    return FlashAttnWheel(name, FLASH_ATTN_RELEASE_URL.format(version=FLASH_ATTN_VERSION, name=name))


def flash_attn_advice(torch_version: str, cuda_version: str | None, python_version: tuple[int, int] | str,
                      cxx11_abi: bool, platform_tag: str = "linux_x86_64") -> str:
    """What a student reads about flash-attention on this machine (Chinese): the wheel to install, or why not."""
    if not cuda_version:
        return ("这是 CPU 版的 PyTorch：flash-attention 需要 CUDA 和 NVIDIA GPU。"
                "llava_lib 使用 PyTorch 自带的 SDPA 注意力，这没有问题。")
    wheel = flash_attn_wheel(torch_version, cuda_version, python_version, cxx11_abi, platform_tag)
    if wheel is not None:
        return f"匹配的预编译包：{wheel.name}\n  安装：pip install {wheel.url}"
    combo = (f"PyTorch {_major_minor(torch_version)} + CUDA {str(cuda_version).split('.')[0]} + "
             f"Python {_python_tag(python_version)} + C++11 ABI {'TRUE' if cxx11_abi else 'FALSE'} + {platform_tag}")
    return (f"flash-attn {FLASH_ATTN_VERSION} 没有与这台机器（{combo}）对应的预编译包。"
            f"不用装：llava_lib 会使用 PyTorch 自带的 SDPA 注意力，对 Qwen3-0.6B 来说完全够用。"
            f"（一定要装的话只能从源码编译：pip install flash-attn=={FLASH_ATTN_VERSION} --no-build-isolation，"
            f"需要 nvcc，要编译很久。）")


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
    wheel: FlashAttnWheel | None = None  # the prebuilt wheel for this machine, when the release has one
    flash_attn_advice: str = ""          # Chinese: that wheel, or why there is none
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
        if not self.flash_attn and self.flash_attn_advice:
            lines.append(f"  {self.flash_attn_advice}")
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
    versions = (torch.__version__, torch.version.cuda, sys.version_info[:2], abi, wheel_platform())
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
        wheel=flash_attn_wheel(*versions), flash_attn_advice=flash_attn_advice(*versions),
        attention=pick_attention(torch.device("cuda" if cuda else "cpu")), disks=disks,
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
    lines.append("然后 export LLAVA_PROFILE=full（或在项目根目录写 llava.toml：profile = \"full\"），再启动 JupyterLab，所有笔记本和命令都会切换。")
    return "\n".join(lines)
