"""Every third-party module the package imports (anywhere in a file, lazy imports too) comes
from a distribution that pyproject.toml's `dependencies` declares, so `pip install .` gives
a working install."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("distillflow", "flows", "tasks", "prompts", "training", "storage")


def normalized(name: str) -> str:
    """A distribution name as the package index compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_distributions() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {normalized(re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]) for requirement in project["dependencies"]}


def imported_modules() -> dict[str, set[str]]:
    """Top-level module → the project files that import it (the project's own left out)."""
    imports: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    imports.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    own = {"distillflow", *PACKAGES}
    return {name: files for name, files in imports.items() if name not in own and name not in sys.stdlib_module_names}


def test_every_imported_package_is_declared():
    declared = declared_distributions()
    installed = packages_distributions()
    problems = []
    for module, files in sorted(imported_modules().items()):
        where = ", ".join(sorted(files)[:3])
        distributions = installed.get(module)
        if not distributions:
            problems.append(f"{module} (imported by {where}) is not installed; declare its distribution and install it")
        elif not any(normalized(name) in declared for name in distributions):
            problems.append(f"{module} (imported by {where}) comes from {distributions}; add it to pyproject.toml's dependencies")
    assert not problems, "\n".join(problems)
