"""Keep the course notebooks clean in git: no outputs except the reference outputs that nbval checks.

A code cell is *checked* when one of its lines is the comment ``# NBVAL_CHECK_OUTPUT`` (nbval's own rule) or its
metadata has the tag ``nbval-check-output``; its outputs are the reference that ``pytest --nbval-lax`` compares
against, so they stay, with a stable execution count (nbval skips nothing but refuses a reference cell with
outputs and no count). Every other cell loses its outputs and its execution count (stripped by nbstripout).

    python -m llava_lib.nbtools strip notebooks/*.ipynb     # strip in place (keeps the checked cells' outputs)
    python -m llava_lib.nbtools check notebooks/*.ipynb     # exit 1 and list the cells that carry outputs
    python -m llava_lib.nbtools refresh notebooks/*.ipynb   # execute, then strip: new reference outputs

``refresh`` runs each notebook top to bottom in a fresh kernel (in the notebook's folder, so the notebooks run
in name order: 05 finds what 04 trained) and keeps only the checked cells' new outputs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

CHECK_MARKER = "NBVAL_CHECK_OUTPUT"
CHECK_TAG = "nbval-check-output"
AS_VERSION = 4


def is_checked(cell) -> bool:
    """True for a code cell whose reference output nbval compares (``# NBVAL_CHECK_OUTPUT`` or the tag)."""
    if cell.get("cell_type") != "code":
        return False
    if CHECK_TAG in (cell.get("metadata", {}).get("tags") or []):
        return True
    source = cell.get("source", "")
    source = "".join(source) if isinstance(source, list) else source
    for line in source.splitlines():
        line = line.strip()
        if line.startswith("#") and line.lstrip("#").strip() == CHECK_MARKER:
            return True
    return False


# nbstripout's own defaults (its command line strips these): volatile notebook and cell metadata.
_EXTRA_KEYS = ["metadata.signature", "metadata.widgets", "cell.metadata.collapsed", "cell.metadata.ExecuteTime",
               "cell.metadata.execution", "cell.metadata.heading_collapsed", "cell.metadata.hidden",
               "cell.metadata.scrolled"]


def strip_notebook(nb) -> int:
    """Strip outputs and execution counts in place, except in checked cells; returns how many cells changed.

    nbstripout does the stripping; a checked cell is marked for it with ``keep_output`` for the time of the call
    (nbstripout's per-cell switch), so the committed notebook carries no extra metadata. A checked cell then gets a
    stable execution count (its 1-based position among the code cells): nbval refuses a reference cell that has
    outputs but no count ("unrun"), and a stable number means a re-run leaves no diff.
    """
    import nbstripout

    before = [repr(cell) for cell in nb.cells]
    marked = []
    for cell in nb.cells:
        if is_checked(cell) and "keep_output" not in cell.get("metadata", {}):
            cell.setdefault("metadata", {})["keep_output"] = True
            marked.append(cell)
    try:
        nbstripout.strip_output(nb, keep_output=False, keep_count=False, keep_id=True, extra_keys=_EXTRA_KEYS)
    finally:
        for cell in marked:
            del cell["metadata"]["keep_output"]
    code_index = 0
    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        code_index += 1
        if is_checked(cell) and cell.get("outputs"):
            cell["execution_count"] = code_index
            for out in cell["outputs"]:
                if "execution_count" in out:
                    out["execution_count"] = code_index
    return sum(repr(cell) != old for cell, old in zip(nb.cells, before))


def dirty_cells(nb) -> list[str]:
    """Descriptions of the cells that carry what a committed notebook must not (empty list: clean)."""
    problems = []
    code_index = 0
    for i, cell in enumerate(nb.cells):
        if cell.get("cell_type") != "code":
            continue
        code_index += 1
        first = (cell.get("source") or "").strip().splitlines()[:1]
        where = f"第 {i} 个单元格（代码单元 {code_index}：{first[0][:40] if first else ''!r}）"
        if is_checked(cell) and cell.get("outputs"):
            counts = {cell.get("execution_count")} | {o["execution_count"] for o in cell["outputs"]
                                                      if "execution_count" in o}
            if counts != {code_index}:
                problems.append(f"{where} 是检查单元格，执行计数应为 {code_index}（nbval 需要它），实际是 {sorted(counts, key=str)}")
            continue
        if cell.get("execution_count") is not None:
            problems.append(f"{where} 带有执行计数 {cell['execution_count']}")
        if cell.get("outputs"):
            problems.append(f"{where} 带有输出，但没有 # {CHECK_MARKER} 标记")
    if "widgets" in nb.metadata:
        problems.append("notebook 元数据里保存了控件状态（metadata.widgets）")
    return problems


def strip_file(path, check_only: bool = False) -> int:
    """Strip one notebook file (rewritten only if something changed); returns the number of changed cells."""
    path = Path(path)
    nb = nbformat.read(path, as_version=AS_VERSION)
    original = nbformat.writes(nb)
    changed = strip_notebook(nb)
    text = nbformat.writes(nb)
    if not check_only and text != original:
        path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    return changed


def is_skipped(cell) -> bool:
    """True for a cell nbval skips (``# NBVAL_SKIP`` or the tag ``nbval-skip``): e.g. a TensorBoard server."""
    if "nbval-skip" in (cell.get("metadata", {}).get("tags") or []):
        return True
    return any(line.strip().startswith("#") and line.strip().lstrip("#").strip() == "NBVAL_SKIP"
               for line in (cell.get("source") or "").splitlines())


def execute_file(path, timeout: int = 1200, kernel_name: str = "python3") -> None:
    """Run a notebook top to bottom in a fresh kernel (its folder as working directory), like nbval does, and
    store the new outputs of the checked cells; everything else stays as it was, stripped.

    Cells nbval skips are not run here either.
    """
    import copy

    from nbclient import NotebookClient
    path = Path(path).resolve()
    nb = nbformat.read(path, as_version=AS_VERSION)
    run = copy.deepcopy(nb)
    skip_tag = "llava-nbtools-skip"
    for cell in run.cells:
        if is_skipped(cell):
            cell.setdefault("metadata", {}).setdefault("tags", []).append(skip_tag)
    client = NotebookClient(run, timeout=timeout, kernel_name=kernel_name, skip_cells_with_tag=skip_tag,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    for cell, done in zip(nb.cells, run.cells):
        if is_checked(cell):
            cell["outputs"] = done.get("outputs", [])
    strip_notebook(nb)
    text = nbformat.writes(nb)
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


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
            print(f"{path}: 清理了 {n} 个单元格" if n else f"{path}: 已经是干净的")
        elif args.cmd == "check":
            problems = dirty_cells(nbformat.read(path, as_version=AS_VERSION))
            for prob in problems:
                print(f"{path}: {prob}")
            status = status or (1 if problems else 0)
        else:
            print(f"{path}: 执行中 ...", flush=True)
            execute_file(path, timeout=args.timeout)
            print(f"{path}: 已执行并清理")
    return status


if __name__ == "__main__":
    sys.exit(main())
