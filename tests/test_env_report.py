"""The environment report of 00_environment: flash-attn wheel naming, the report text, download commands."""
from __future__ import annotations

import re

import pytest

from llava_lib import env_report
from llava_lib.env_report import flash_attn_wheel

RELEASE = "https://github.com/Dao-AILab/flash-attention/releases/download/v2.8.3/"


def test_wheel_name_follows_the_2_8_3_release_naming():
    w = flash_attn_wheel("2.8.0+cu128", "12.8", (3, 11), cxx11_abi=True)
    assert w.name == "flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp311-cp311-linux_x86_64.whl"
    assert w.url == RELEASE + w.name
    assert w.official and w.note == ""


@pytest.mark.parametrize("torch_version, cuda, py, abi, expected", [
    ("2.6.0+cu124", "12.4", (3, 10), False, "flash_attn-2.8.3+cu12torch2.6cxx11abiFALSE-cp310-cp310-linux_x86_64.whl"),
    ("2.7.1", "12.6", "cp312", True, "flash_attn-2.8.3+cu12torch2.7cxx11abiTRUE-cp312-cp312-linux_x86_64.whl"),
    ("2.4.1+cu121", "12.1", (3, 9), False, "flash_attn-2.8.3+cu12torch2.4cxx11abiFALSE-cp39-cp39-linux_x86_64.whl"),
])
def test_cuda_minor_and_torch_patch_do_not_matter(torch_version, cuda, py, abi, expected):
    w = flash_attn_wheel(torch_version, cuda, py, abi)
    assert w.name == expected and w.official


def test_combinations_outside_the_official_release_are_named_but_flagged():
    w = flash_attn_wheel("2.11.0+cu130", "13.0", (3, 11), True)
    assert w.name == "flash_attn-2.8.3+cu13torch2.11cxx11abiTRUE-cp311-cp311-linux_x86_64.whl"
    assert not w.official
    assert "CUDA 13" in w.note and "PyTorch 2.11" in w.note and "SDPA" in w.note
    arm = flash_attn_wheel("2.8.0", "12.8", (3, 11), True, platform_tag="linux_aarch64")
    assert arm.name.endswith("-cp311-cp311-linux_aarch64.whl") and not arm.official


def test_cpu_torch_has_no_wheel():
    assert flash_attn_wheel("2.13.0+cpu", None, (3, 11), True) is None


def test_wheel_platform_tags():
    assert env_report.wheel_platform("Linux", "x86_64") == "linux_x86_64"
    assert env_report.wheel_platform("Windows", "AMD64") == "win_amd64"


def test_collect_reads_this_machine(tmp_path):
    import torch
    report = env_report.collect(disk_paths=[tmp_path / "not" / "there", tmp_path])
    assert report.torch == torch.__version__
    assert report.cuda_version == torch.version.cuda
    assert len(report.disks) == 1  # both paths are on one file system: one line
    assert report.disks[0].free_gib > 0
    text = report.format()
    for needle in ("Python", "PyTorch", "flash-attn", "磁盘", "transformers"):
        assert needle in text
    if not torch.cuda.is_available():
        assert report.gpus == [] and "没有可用的 GPU" in text and report.attention == "sdpa"
    if report.wheel is not None:
        assert report.wheel.name in text


def test_gpu_lines_and_wheel_in_the_text():
    report = env_report.EnvReport(
        python="3.11.7", platform="Linux x86_64", torch="2.8.0+cu128", cuda_available=True, cuda_version="12.8",
        cudnn=91002, cxx11_abi=True,
        gpus=[env_report.GPUInfo(0, "NVIDIA H100 80GB HBM3", 79.2, (9, 0), True)],
        flash_attn=None, wheel=flash_attn_wheel("2.8.0+cu128", "12.8", (3, 11), True), attention="sdpa")
    text = report.format()
    assert "NVIDIA H100 80GB HBM3" in text and "79.2 GiB" in text and "bf16：支持" in text
    assert "未安装" in text and RELEASE in text


def test_download_instructions_are_the_readme_commands():
    text = env_report.download_instructions()
    cmds = re.findall(r"python -m llava_lib\.\S+ \S+", text)
    assert cmds[:3] == ["python -m llava_lib.download clip", "python -m llava_lib.download llm",
                        "python -m llava_lib.download data"]
    assert "python -m llava_lib.data prepare --profile full --limit 100000" in text
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for cmd, _ in env_report.DOWNLOAD_STEPS:
        assert cmd in readme
