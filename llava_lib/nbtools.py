"""Keep the course notebooks clean in git: no outputs or execution counts, except in the cells nbval checks.

A *checked* cell (a line ``# NBVAL_CHECK_OUTPUT`` or the tag ``nbval-check-output``: nbval's own rule) keeps its
outputs, the reference ``pytest --nbval-lax`` compares against, with a stable execution count (its position among
the code cells): nbval refuses a reference cell with outputs and no count, and a stable one leaves no diff.
``python -m llava_lib.nbtools strip|check|refresh notebooks/*.ipynb`` (``check`` exits 1 on a dirty notebook)."""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import nbformat
import nbstripout

# nbstripout's command-line defaults (its Python API takes none): volatile notebook and cell metadata.
_EXTRA_KEYS = ["metadata.signature", "metadata.widgets", "cell.metadata.collapsed", "cell.metadata.ExecuteTime",
               "cell.metadata.execution", "cell.metadata.heading_collapsed", "cell.metadata.hidden",
               "cell.metadata.scrolled"]


def _marked(cell, comment: str, tag: str) -> bool:
    """nbval's rule: a code cell with the tag, or with a line that is the comment ``# <comment>``."""
    return cell.get("cell_type") == "code" and (
        tag in cell.get("metadata", {}).get("tags", [])
        or any(s.startswith("#") and s.lstrip("#").strip() == comment
               for s in (line.strip() for line in cell.source.splitlines())))


def is_checked(cell) -> bool:
    return _marked(cell, "NBVAL_CHECK_OUTPUT", "nbval-check-output")


def strip_notebook(nb) -> None:
    """Strip in place with nbstripout, checked cells marked ``keep_output`` (its per-cell switch) for the call."""
    marked = [c for c in nb.cells if is_checked(c) and "keep_output" not in c.metadata]
    for cell in marked:
        cell.metadata["keep_output"] = True
    try:
        nbstripout.strip_output(nb, keep_output=False, keep_count=False, keep_id=True, extra_keys=_EXTRA_KEYS)
    finally:
        for cell in marked:
            del cell.metadata["keep_output"]
    for n, cell in enumerate((c for c in nb.cells if c.cell_type == "code"), 1):
        if is_checked(cell) and cell.outputs:
            cell.execution_count = n
            for out in cell.outputs:
                if "execution_count" in out:
                    out.execution_count = n


def dirty_cells(nb) -> list[str]:
    """What ``strip`` would change, one line per cell (empty: clean)."""
    clean = copy.deepcopy(nb)
    strip_notebook(clean)
    problems = [f"第 {i} 个单元格（{cell.source.strip()[:40]!r}）"
                + (f"是检查单元格，执行计数应为 {want.execution_count}" if is_checked(cell)
                   else "带有输出、执行计数或多余的元数据（没有 # NBVAL_CHECK_OUTPUT 标记）")
                for i, (cell, want) in enumerate(zip(nb.cells, clean.cells)) if cell != want]
    if nb.metadata != clean.metadata:
        problems.append("notebook 元数据里保存了控件状态（metadata.widgets）等不该提交的内容")
    return problems


def strip_file(path) -> int:
    """Strip one notebook file in place (rewritten only if needed); returns how many problems it fixed."""
    nb = nbformat.read(path, as_version=4)
    problems = dirty_cells(nb)
    if problems:
        strip_notebook(nb)
        nbformat.write(nb, path)
    return len(problems)


def execute_file(path, timeout: int = 1200) -> None:
    """Run a notebook top to bottom in a fresh kernel in its folder, as nbval does (skipping the cells nbval skips),
    and keep the checked cells' new outputs."""
    from nbclient import execute
    path = Path(path).resolve()
    nb = nbformat.read(path, as_version=4)
    run = copy.deepcopy(nb)
    for cell in run.cells:
        if _marked(cell, "NBVAL_SKIP", "nbval-skip"):
            cell.metadata.setdefault("tags", []).append("nbval-skip")
    execute(run, cwd=str(path.parent), timeout=timeout, kernel_name="python3", skip_cells_with_tag="nbval-skip")
    for cell, done in zip(nb.cells, run.cells):
        if is_checked(cell):
            cell.outputs = done.get("outputs", [])
    strip_notebook(nb)
    nbformat.write(nb, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_lib.nbtools",
                                description="笔记本清理工具：去掉输出和执行计数，只保留 nbval 检查的参考输出。")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("strip", "就地清理笔记本（保留 # NBVAL_CHECK_OUTPUT 单元格的输出）"),
                        ("check", "只检查，不修改：有不该提交的输出时返回 1"),
                        ("refresh", "执行笔记本后再清理：重新生成参考输出")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("notebooks", nargs="+", type=Path)
        if name == "refresh":
            s.add_argument("--timeout", type=int, default=1200, help="每个单元格的超时（秒）")
    args = p.parse_args(argv)
    status = 0
    for path in sorted(args.notebooks):
        if args.cmd == "strip":
            n = strip_file(path)
            print(f"{path}: 清理了 {n} 处" if n else f"{path}: 已经是干净的")
        elif args.cmd == "check":
            problems = dirty_cells(nbformat.read(path, as_version=4))
            for prob in problems:
                print(f"{path}: {prob}")
            status = status or int(bool(problems))
        else:
            print(f"{path}: 执行中 ...", flush=True)
            execute_file(path, timeout=args.timeout)
            print(f"{path}: 已执行并清理")
    if status:
        print("请运行 python -m llava_lib.nbtools strip 清理这些笔记本。")
    return status


if __name__ == "__main__":
    sys.exit(main())
