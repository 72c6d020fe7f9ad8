"""Committed notebooks carry no outputs or execution counts, except the reference outputs nbval checks."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from llava_lib import nbtools

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
EXPECTED = ["00_environment", "01_qwen3_chat", "02_clip_matching", "03_dataset", "04_stage1_training",
            "05_llava_chat", "06_stage2_instruction"]


def test_the_seven_notebooks_are_there():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nbtools.dirty_cells(nb) == [], f"{path.name}：请运行 python -m llava_lib.nbtools strip {path}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_layout(path):
    """First code cell is the config cell; at least one checked cell, and each has its reference output."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    first = [line for line in code[0].source.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert "PROFILE = None" in first, "第一个代码单元格应是配置单元格：PROFILE = None（由 LLAVA_PROFILE / llava.toml 决定）"
    assert any("config.resolve(PROFILE)" in line for line in first)
    assert not any('PROFILE = "' in c.source for c in code), "笔记本不能写死配置档"
    checked = [c for c in code if nbtools.is_checked(c)]
    assert checked, "每个笔记本至少有一个带 nbval-check-output 标签的单元格"
    for c in checked:
        assert c.outputs, f"检查单元格没有参考输出：{c.source[:60]!r}"
        for out in c.outputs:
            assert out.get("name") != "stderr", f"检查单元格的参考输出里有 stderr（警告会让比较不稳定）：{c.source[:60]!r}"
    md = "".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in md) > 100, "说明文字应是中文"


def _cell(source, outputs=(), count=None, tags=()):
    c = nbformat.v4.new_code_cell(source)
    c.outputs = [nbformat.v4.new_output("stream", name="stdout", text=t) for t in outputs]
    c.execution_count = count
    if tags:
        c.metadata["tags"] = list(tags)
    return c


def test_is_checked_follows_nbval():
    assert nbtools.is_checked(_cell("# NBVAL_CHECK_OUTPUT\nprint(1)"))
    assert nbtools.is_checked(_cell("x = 1\n  #  NBVAL_CHECK_OUTPUT\nprint(x)"))
    assert nbtools.is_checked(_cell("print(1)", tags=["nbval-check-output"]))
    assert not nbtools.is_checked(_cell("print('# NBVAL_CHECK_OUTPUT')"))
    assert not nbtools.is_checked(_cell("# NBVAL_CHECK_OUTPUT_X\nprint(1)"))
    assert not nbtools.is_checked(nbformat.v4.new_markdown_cell("# NBVAL_CHECK_OUTPUT"))


def test_strip_keeps_only_checked_outputs(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# 标题"),
                _cell("print(1)", ["1\n"], 1),
                _cell("# NBVAL_CHECK_OUTPUT\nprint(2)", ["2\n"], 2),
                _cell("1 + 1", (), 3)]
    nb.cells[3].outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "2"}, execution_count=7)]
    nb.cells[3].source = "# NBVAL_CHECK_OUTPUT\n1 + 1"
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {}}
    assert len(nbtools.dirty_cells(nb)) >= 3
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, path)
    assert nbtools.main(["check", str(path)]) == 1
    assert nbtools.main(["strip", str(path)]) == 0
    out = nbformat.read(path, as_version=4)
    assert out.cells[1].outputs == [] and out.cells[1].execution_count is None
    # Checked cells keep their outputs and get a stable count (their position among code cells): nbval refuses
    # a reference cell with outputs and no count.
    assert out.cells[2].outputs[0].text == "2\n" and out.cells[2].execution_count == 2
    assert out.cells[3].execution_count == 3
    assert out.cells[3].outputs[0].execution_count == 3 and out.cells[3].outputs[0].data["text/plain"] == "2"
    assert "widgets" not in out.metadata
    assert nbtools.dirty_cells(out) == []
    assert nbtools.main(["check", str(path)]) == 0
    before = path.read_bytes()
    nbtools.strip_file(path)
    assert path.read_bytes() == before  # idempotent


def test_refresh_executes_and_keeps_new_reference_outputs(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [_cell("x = 6 * 7\nprint('忽略')"), _cell("# NBVAL_CHECK_OUTPUT\nprint(x)", ["旧的\n"]),
                _cell("# NBVAL_SKIP\nraise SystemExit('nbval 跳过的单元格不应执行')"),
                _cell("raise SystemExit('也不应执行')", tags=["nbval-skip"]),
                _cell("# NBVAL_CHECK_OUTPUT\nprint(x + 1)")]
    path = tmp_path / "r.ipynb"
    nbformat.write(nb, path)
    nbtools.main(["refresh", str(path)])
    out = nbformat.read(path, as_version=4)
    assert out.cells[0].outputs == []
    assert out.cells[1].outputs[0].text == "42\n" and out.cells[1].execution_count == 2
    assert out.cells[4].outputs[0].text == "43\n"
    assert out.cells[3].metadata["tags"] == ["nbval-skip"]  # metadata left as it was
    assert nbtools.dirty_cells(out) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_switch_moves_every_notebook(path, tmp_path):
    """With LLAVA_PROFILE=full in the environment, the config cell resolves the full profile (started, as a kernel
    is, in notebooks/); without it, mini."""
    import os
    import subprocess
    import sys
    cell = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code").source
    for env_profile, expected in (("full", "full"), (None, "mini")):
        env = {k: v for k, v in os.environ.items() if k not in ("LLAVA_PROFILE", "LLAVA_CONFIG")}
        if env_profile:
            env["LLAVA_PROFILE"] = env_profile
        out = subprocess.run([sys.executable, "-c", cell + "\nprint('RESOLVED', PROFILE, paths.profile)"],
                             cwd=path.parent, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"RESOLVED {expected} {expected}" in out.stdout
