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


@pytest.mark.parametrize("torch_version, cuda, py, abi, expected", [
    ("2.6.0+cu124", "12.4", (3, 10), False, "flash_attn-2.8.3+cu12torch2.6cxx11abiFALSE-cp310-cp310-linux_x86_64.whl"),
    ("2.7.1", "12.6", "cp312", True, "flash_attn-2.8.3+cu12torch2.7cxx11abiTRUE-cp312-cp312-linux_x86_64.whl"),
    ("2.4.1+cu121", "12.1", (3, 9), False, "flash_attn-2.8.3+cu12torch2.4cxx11abiFALSE-cp39-cp39-linux_x86_64.whl"),
    ("2.10.0+cu130", "13.0", (3, 12), True, "flash_attn-2.8.3+cu13torch2.10cxx11abiTRUE-cp312-cp312-linux_x86_64.whl"),
])
def test_cuda_minor_and_torch_patch_do_not_matter(torch_version, cuda, py, abi, expected):
    w = flash_attn_wheel(torch_version, cuda, py, abi)
    assert w.name == expected and w.url == RELEASE + expected
    advice = env_report.flash_attn_advice(torch_version, cuda, py, abi)
    assert w.url in advice and "pip install" in advice


@pytest.mark.parametrize("torch_version, cuda, py, abi, platform_tag", [
    ("2.13.0+cu130", "13.0", (3, 11), True, "linux_x86_64"),   # the course's torch: newer than any wheel
    ("2.8.0+cu128", "12.8", (3, 11), True, "linux_aarch64"),   # no ARM wheels in the release
    ("2.4.1+cu124", "12.4", (3, 13), True, "linux_x86_64"),    # torch 2.4 was never built for Python 3.13
    ("2.6.0+cu118", "11.8", (3, 11), True, "linux_x86_64"),    # CUDA 11: the release is CUDA 12 (and 13)
    ("2.9.0+cu130", "13.0", (3, 11), True, "linux_x86_64"),    # torch 2.9 wheels are known for Python 3.12 only
    ("2.8.0+cu128", "12.8", (3, 11), True, "win_amd64"),
])
def test_no_url_where_the_release_has_no_wheel(torch_version, cuda, py, abi, platform_tag):
    assert flash_attn_wheel(torch_version, cuda, py, abi, platform_tag) is None
    advice = env_report.flash_attn_advice(torch_version, cuda, py, abi, platform_tag)
    assert "没有" in advice and "预编译包" in advice and "SDPA" in advice and "https://" not in advice
    assert platform_tag in advice and f"PyTorch {torch_version[:4].rstrip('.+')}" in advice


def test_cpu_torch_has_no_wheel():
    assert flash_attn_wheel("2.13.0+cpu", None, (3, 11), True) is None
    advice = env_report.flash_attn_advice("2.13.0+cpu", None, (3, 11), True)
    assert "CPU" in advice and "SDPA" in advice


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


def _report(torch_version, cuda_version, **kw):
    args = (torch_version, cuda_version, (3, 11), True)
    return env_report.EnvReport(
        python="3.11.7", platform="Linux x86_64", torch=torch_version, cuda_version=cuda_version,
        cudnn=91002, cxx11_abi=True, gpus=[env_report.GPUInfo(0, "NVIDIA H100 80GB HBM3", 79.2, (9, 0), True)],
        wheel=flash_attn_wheel(*args), flash_attn_advice=env_report.flash_attn_advice(*args), attention="sdpa", **kw)


def test_gpu_lines_and_wheel_in_the_text():
    text = _report("2.8.0+cu128", "12.8").format()
    assert "NVIDIA H100 80GB HBM3" in text and "79.2 GiB" in text and "bf16：支持" in text
    assert "未安装" in text and RELEASE + "flash_attn-2.8.3+cu12torch2.8" in text


def test_report_without_a_wheel_says_sdpa_and_gives_no_url():
    text = _report("2.13.0+cu130", "13.0").format()
    assert "没有" in text and "SDPA" in text and RELEASE not in text
    assert "flash-attn 2.8.3" in _report("2.13.0+cu130", "13.0", flash_attn=None).format()
    installed = _report("2.8.0+cu128", "12.8", flash_attn="2.8.3").format()
    assert "已安装 2.8.3" in installed and RELEASE not in installed  # installed: no advice to install it


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
