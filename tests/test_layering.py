"""Imports go one way: entry points → flows → tasks → prompts, training → storage → core
types and config. Nothing imports a layer above it, and no modules import each other in
a cycle (lazy imports inside functions count: they are cycles all the same). Inside tasks/,
the teacher package (tasks/teacher/) sits below the other steps: of tasks/ it imports only
the process plumbing of tasks/child.py. Flows only wire."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("distillflow", "flows", "tasks", "prompts", "training", "storage")

# The lowest layer: core types, interrupt/failure handling, how runs run (distillflow/runs.py), and every config model (a
# config validates with these only, so loading a config imports no machinery).
CORE = {
    "distillflow",
    "distillflow.records",
    "distillflow.text",
    "distillflow.resources",
    "distillflow.interrupt",
    "distillflow.memory",
    "distillflow.failures",
    "distillflow.progress",
    "distillflow.runs",
    "distillflow.training.chat_template",
}
LEVELS = {"storage": 1, "prompts": 2, "training": 2, "tasks": 3, "flows": 4}
ENTRY = 5  # distillflow.cli and the other modules of distillflow/ itself
LAYER_NAMES = {0: "core/config", 1: "storage", 2: "prompts/training", 3: "tasks", 4: "flows", 5: "entry points"}
# tasks/teacher/: the teacher transports and the ledger in front of them. Of tasks/, its
# modules import each other and tasks/child.py (how a client process starts) only; the other
# steps of tasks/ import it, never the reverse.
TEACHER = "distillflow.tasks.teacher"
TEACHER_MAY_IMPORT = {"distillflow.tasks.child"}
FLOW_MAX_LINES = 80  # a flow function wires tasks; what does the work lives in tasks/
# Inside tasks/: each role package (or loose module) and its level; a module imports tasks/
# modules of a lower level, or of its own package (the config models, level 0 of the whole
# tree, are free to import). tasks/__init__.py's docstring draws the same order.
TASK_ROLES = {
    "child": 0, "artifact_charts": 0, "teacher": 1, "filters": 2,
    "build": 3, "capture": 3, "train": 3, "evaluation": 3, "mining": 4, "sweep": 4, "preflight": 5,
}
LOOSE_TASK_MODULES = {"child", "artifact_charts", "preflight"}  # every other module sits in a role package


def module_files() -> dict[str, Path]:
    """Module name → file. The five layer folders install as distillflow.<folder>."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            if package != "distillflow":
                name = f"distillflow.{name}"
            modules[name.removesuffix(".__init__")] = path
    return modules


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module → the project modules it imports (anywhere in the file, TYPE_CHECKING aside)."""
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            if _type_checking_only(node, parents):
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def level(module: str) -> int:
    last = module.rsplit(".", 1)[-1]
    if module in CORE or last == "config" or last.endswith("_config"):
        return 0
    return LEVELS.get(module.split(".")[1], ENTRY)


def package_of(module: str) -> str:
    """distillflow.tasks.teacher → tasks; distillflow.cli → distillflow."""
    second = module.split(".")[1] if module.count(".") else ""
    return second if second in LEVELS else "distillflow"


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def edges() -> dict[str, set[str]]:
    return import_edges(module_files())


def test_no_import_cycles(edges):
    assert cycles(edges) == []


def test_no_import_reaches_up_a_layer(edges):
    upward = []
    for source, targets in sorted(edges.items()):
        for target in sorted(targets):
            same_package = package_of(source) == package_of(target)
            if level(target) > level(source) or (
                level(target) == level(source) and level(source) > 0 and not same_package
            ):
                upward.append(
                    f"{source} ({LAYER_NAMES[level(source)]}) imports {target} ({LAYER_NAMES[level(target)]})"
                )
    assert upward == []


def in_teacher_package(module: str) -> bool:
    return module == TEACHER or module.startswith(f"{TEACHER}.")


def test_the_teacher_package_imports_no_other_step(edges):
    wrong = [
        f"{source} imports {target}"
        for source, targets in sorted(edges.items()) if in_teacher_package(source)
        for target in sorted(targets)
        if package_of(target) == "tasks" and level(target) > 0
        and not in_teacher_package(target) and target not in TEACHER_MAY_IMPORT
    ]
    assert wrong == []


def task_role(module: str) -> str | None:
    """distillflow.tasks.filters.minhash → filters; None outside tasks/."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["distillflow", "tasks"] else None


def test_tasks_are_grouped_by_role_and_import_only_lower_roles(edges):
    modules = [m for m in edges if task_role(m) is not None]
    unplaced = [m for m in modules if task_role(m) not in TASK_ROLES]
    loose = [m for m in modules if m.count(".") == 2 and task_role(m) not in LOOSE_TASK_MODULES | set(TASK_ROLES)]
    assert unplaced == [] and loose == []
    upward = [
        f"{source} ({task_role(source)}) imports {target} ({task_role(target)})"
        for source in sorted(modules) if level(source) > 0
        for target in sorted(edges[source])
        if task_role(target) is not None and level(target) > 0 and task_role(target) != task_role(source)
        and TASK_ROLES[task_role(target)] >= TASK_ROLES[task_role(source)]
    ]
    assert upward == []
    for role in TASK_ROLES.keys() - LOOSE_TASK_MODULES:
        doc = ast.get_docstring(ast.parse((ROOT / "tasks" / role / "__init__.py").read_text(encoding="utf-8")))
        assert doc and "May import" in doc or role == "teacher", role


def test_only_the_recording_writes_answers_to_the_ledger():
    """A teacher transport only returns answers: in tasks/teacher/, `put`/`put_many` on a
    ledger are called by recording.py alone (the batch transport keeps only its own batch
    bookkeeping there)."""
    writes = []
    for path in sorted((ROOT / "tasks" / "teacher").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("put", "put_many") and "ledger" in ast.unparse(node.func.value)
            ):
                writes.append(f"{path.name}:{node.lineno}")
    assert writes and all(place.startswith("recording.py:") for place in writes), writes


def test_every_flow_only_wires():
    """Each Prefect flow function is at most `FLOW_MAX_LINES` lines of calls to tasks."""
    long = []
    for path in sorted((ROOT / "flows").glob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and any("flow" in ast.unparse(d) for d in node.decorator_list):
                lines = node.end_lineno - node.lineno + 1
                if lines > FLOW_MAX_LINES:
                    long.append(f"flows/{path.name}: {node.name} is {lines} lines")
    assert long == []


def test_the_walk_sees_lazy_imports_and_cycles():
    """The checker itself: a lazy import inside a function is an edge, and a cycle is found."""
    modules = module_files()
    edges = import_edges(modules)
    assert "distillflow.tasks.train.student" in edges["distillflow.flows.train"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_config_name_lists_match_the_generators():
    """Configs validate generator names from plain tuples (no generator import); they must
    list exactly the generators that exist."""
    from distillflow.prompts.adversarial import ADVERSARIAL
    from distillflow.prompts.config import ADVERSARIAL_KINDS, DOMAIN_PACKS, EDGE_CASE_KINDS
    from distillflow.prompts.domains import DOMAIN_EDGE_CASES
    from distillflow.prompts.edge_cases import EDGE_CASES

    assert tuple(ADVERSARIAL) == ADVERSARIAL_KINDS
    assert tuple(EDGE_CASES) == EDGE_CASE_KINDS
    assert tuple(DOMAIN_EDGE_CASES) == DOMAIN_PACKS


def test_language_scripts_match_the_script_ranges():
    from distillflow.tasks.filters.config import LANGUAGE_SCRIPTS
    from distillflow.tasks.filters.quality import SCRIPT_RANGES

    assert sorted(LANGUAGE_SCRIPTS) == sorted(SCRIPT_RANGES)


def test_building_with_an_http_teacher_does_not_import_torch():
    """torch and transformers cost ~1.5 s of start-up; only a local teacher needs them."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import distillflow.cli, distillflow.flows.build\n"
        "from distillflow.config import TeacherConfig\n"
        "from distillflow.tasks.teacher.choose import make_teacher\n"
        "make_teacher(TeacherConfig(base_url='http://127.0.0.1:9/v1', model='m', api_key_env=None), api_key='k')\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "DO_NOT_TRACK": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
