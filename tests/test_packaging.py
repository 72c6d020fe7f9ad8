"""pyproject.toml says what the code needs, and environment.yml builds the environment it describes."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
ENV_YML = (REPO / "environment.yml").read_text(encoding="utf-8")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_environment_python_is_the_oldest_python_the_package_claims():
    """The course environment runs the lowest supported Python, so the claim is what gets tested."""
    claimed = re.fullmatch(r">=\s*(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"].strip())
    assert claimed, PYPROJECT["project"]["requires-python"]
    env = re.search(r"^\s*-\s*python\s*=\s*(\d+)\.(\d+)\s*$", ENV_YML, re.M)
    assert env, "environment.yml 里没有 python=X.Y"
    assert env.groups() == claimed.groups()
    assert (int(claimed[1]), int(claimed[2])) >= (3, 11), "the code uses tomllib (Python 3.11+)"


def test_environment_installs_this_project_with_the_dev_extra():
    assert re.search(r"^\s*-\s*-e\s+\.\[dev\]\s*$", ENV_YML, re.M), "environment.yml 应通过 pip 安装 -e .[dev]"
    assert "dev" in PYPROJECT["project"]["optional-dependencies"]


def test_every_third_party_import_is_declared():
    """Each package llava_lib imports is a declared dependency (runtime or dev), not an accident of what else
    happens to pull it in."""
    declared = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    declared |= {_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["dev"]}
    dists = importlib.metadata.packages_distributions()
    missing = {}
    for path in sorted((REPO / "llava_lib").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top == "llava_lib":
                    continue
                names = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
                if not names & declared:
                    missing.setdefault(top, path.relative_to(REPO).as_posix())
    assert not missing, f"pyproject.toml 没有声明这些依赖：{missing}"
