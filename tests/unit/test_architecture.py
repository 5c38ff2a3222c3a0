"""rmq's dependency rules, checked on the source: every ``import`` under rmq/ is read with ``ast``,
including imports inside functions and under ``if TYPE_CHECKING:``, relative imports resolved.

Dependencies point down: rmq.core imports nothing of rmq above it; rmq.concern only rmq.core; the resource
packages import core, concern and each other only along named, acyclic edges; rmq/celery/ (and the cli)
may import anything in rmq. Only rmq/celery/ imports Celery, kombu or billiard, and only its flower/
package (rmq's pages in Flower) imports Flower or Tornado; nothing imports
rmq.testing, the reference app, the tests or the scripts; no import cycle, also none hidden in a function.

The rules are data (below): adjust them here, not in the checks. Each check lists every violation with
its place (file:line, and whether the import sits in a function or a TYPE_CHECKING block).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

# --- the rules ------------------------------------------------------------------------------------

#: third-party packages that only rmq/celery/ may import
CELERY_PACKAGES = frozenset({"celery", "kombu", "billiard"})

#: modules (or packages, with everything under them) outside rmq/celery/ that may import them anyway
CELERY_IMPORT_ALLOWED = {
    "rmq.cli": "the rmq command loads the user's Celery app (-A) and runs celery's worker/beat",
    "rmq.testing": "helpers for users' own tests (start a worker, ...); nothing in rmq imports them",
}

#: third-party packages of the Flower dashboard, importable only by rmq's pages in it (rmq/celery/flower/)
FLOWER_PACKAGES = frozenset({"flower", "tornado"})
FLOWER_GLUE = "rmq.celery.flower"

#: top-level names of the repository's other trees, which the library must never import
FORBIDDEN_TOP_LEVEL = {
    "workers": "the reference application (rmq demo loads it by name at call time, not by import)",
    "tests": "the test suite",
    "scripts": "benchmarks and tooling",
}

#: importable only from inside itself
PRIVATE_TO_ITSELF = ("rmq.testing",)

#: the resource packages: they import rmq.core, rmq.concern, themselves, and each other only along
#: ALLOWED_RESOURCE_EDGES
RESOURCE_PACKAGES = ("memory", "cpu", "network", "disk", "models", "monitoring")

#: (importer, imported) between resource packages, with why; must stay acyclic. Not allowed (add it
#: only if needed): memory -> cpu.
ALLOWED_RESOURCE_EDGES = {
    ("models", "memory"): "the model cache reserves and trims memory",
    ("monitoring", "memory"): "the monitor reports the memory budget and ladder",
    ("monitoring", "models"): "the monitor reports loaded models",
    ("monitoring", "cpu"): "the monitor reports CPU slots",
    ("monitoring", "network"): "the monitor reports rate limits",
    ("monitoring", "disk"): "the monitor reports sessions and disk pressure",
}


def _layer_rules() -> dict[str, frozenset[str]]:
    """Component -> components it may import (components: see ``component``)."""
    rules = {"core": frozenset({"core"}), "concern": frozenset({"core", "concern"})}
    for pkg in RESOURCE_PACKAGES:
        rules[pkg] = frozenset({"core", "concern", pkg} | {b for (a, b) in ALLOWED_RESOURCE_EDGES if a == pkg})
    return rules


#: components not listed here (celery, cli, the ``rmq`` package itself, default_concerns, testing, ...)
#: are not restricted by the layer check; the other checks still apply to them
LAYER_RULES = _layer_rules()


def component(module: str) -> str:
    """``rmq.memory.budget`` -> ``memory``; ``rmq.concern`` -> ``concern``; ``rmq`` -> ``rmq``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "rmq"


# --- reading the imports --------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = ROOT / "rmq"


@dataclass(frozen=True)
class Import:
    importer: str  # rmq module doing the import
    target: str  # what it imports, resolved: an rmq module, or an absolute name outside rmq
    path: str  # file, relative to the repository
    line: int
    where: str  # "", " (in function f)", " (under TYPE_CHECKING)", ...

    def place(self) -> str:
        return f"{self.path}:{self.line}{self.where}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def find_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py")) if "__pycache__" not in p.parts}


MODULES = find_modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _deepest_module(name: str) -> str | None:
    """The longest prefix of ``name`` that is an rmq module, or None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in MODULES:
            return ".".join(parts[:end])
    return None


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, path: Path) -> None:
        self.module = module
        self.is_package = path.name == "__init__.py"
        self.path = str(path.relative_to(ROOT))
        self.context: list[str] = []
        self.found: list[Import] = []
        self._seen: set[tuple[str, int]] = set()

    def _where(self) -> str:
        return f" ({', '.join(self.context)})" if self.context else ""

    def _add(self, target: str, node: ast.stmt) -> None:
        if (target, node.lineno) not in self._seen:  # ``from x import a, b``: one import of x
            self._seen.add((target, node.lineno))
            self.found.append(Import(self.module, target, self.path, node.lineno, self._where()))

    def _nested(self, label: str, node: ast.AST) -> None:
        self.context.append(label)
        self.generic_visit(node)
        self.context.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._nested(f"in function {node.name}", node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._nested(f"in function {node.name}", node)

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.visit(node.test)
        self.context.append("under TYPE_CHECKING")
        for child in node.body:
            self.visit(child)
        self.context.pop()
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve_from(self.module, self.is_package, node)
        for alias in node.names:
            # ``from rmq.core import keys`` imports the module rmq.core.keys; ``from rmq.core.keys import X``
            # imports rmq.core.keys
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in MODULES else base, node)


def collect_imports() -> list[Import]:
    found: list[Import] = []
    for module, path in MODULES.items():
        collector = _Collector(module, path)
        collector.visit(ast.parse(path.read_text(), filename=str(path)))
        found.extend(collector.found)
    return found


IMPORTS = collect_imports()


def rmq_edges() -> dict[tuple[str, str], list[Import]]:
    """(importer, imported rmq module) -> the imports that make that edge."""
    edges: dict[tuple[str, str], list[Import]] = defaultdict(list)
    for imp in IMPORTS:
        if imp.target == "rmq" or imp.target.startswith("rmq."):
            target = _deepest_module(imp.target)
            if target is not None and target != imp.importer:
                edges[(imp.importer, target)].append(imp)
    return edges


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _fail_with(violations: list[str], title: str) -> None:
    assert not violations, f"{title} ({len(violations)}):\n" + "\n".join(sorted(violations))


# --- the checks -----------------------------------------------------------------------------------


def test_the_source_was_found():
    assert "rmq" in MODULES and "rmq.core" in MODULES and len(MODULES) > 20, sorted(MODULES)
    assert IMPORTS


def test_every_rmq_import_names_an_existing_module():
    # a function-level import left pointing at a module that moved fails only when the function runs
    violations = [
        f"{imp.place()}: {imp.importer} imports {imp.target}, which is not a module of rmq"
        for imp in IMPORTS
        if (imp.target == "rmq" or imp.target.startswith("rmq.")) and imp.target not in MODULES
    ]
    _fail_with(violations, "imports of rmq modules that do not exist")


def _cycle_through(start: str, graph: dict[str, set[str]], members: set[str]) -> list[str]:
    """A shortest cycle start -> ... -> start inside one strongly connected component."""
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph[node] & members):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"{start} is on no cycle")


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan; the graph is small enough for recursion
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            members = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                members.add(top)
                if top == node:
                    break
            found.append(members)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_between_rmq_modules():
    edges = rmq_edges()
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
        graph[b]  # every module is a node
    violations = []
    for members in _strongly_connected(graph):
        if len(members) < 2:
            continue
        cycle = _cycle_through(min(members), graph, members)
        steps = [
            f"    {a} -> {b}  at {', '.join(imp.place() for imp in edges[(a, b)])}"
            for a, b in zip(cycle, cycle[1:], strict=False)
        ]
        if len(members) > len(cycle) - 1:
            steps.append(f"  (one of the cycles among: {', '.join(sorted(members))})")
        violations.append("\n".join([f"cycle {' -> '.join(cycle)}", *steps]))
    _fail_with(violations, "import cycles")


def test_the_library_imports_neither_the_app_nor_the_tests_nor_the_scripts():
    violations = [
        f"{imp.place()}: {imp.importer} imports {imp.target} ({FORBIDDEN_TOP_LEVEL[imp.target.split('.')[0]]})"
        for imp in IMPORTS
        if imp.target.split(".")[0] in FORBIDDEN_TOP_LEVEL
    ]
    _fail_with(violations, "imports of workers/, tests/ or scripts/")


def test_only_the_celery_package_imports_celery_kombu_or_billiard():
    violations = [
        f"{imp.place()}: {imp.importer} imports {imp.target}"
        for imp in IMPORTS
        if imp.target.split(".")[0] in CELERY_PACKAGES
        and not _under(imp.importer, "rmq.celery")
        and not any(_under(imp.importer, allowed) for allowed in CELERY_IMPORT_ALLOWED)
    ]
    _fail_with(violations, "imports of celery/kombu/billiard outside rmq/celery/")


def test_only_rmqs_flower_pages_import_flower_or_tornado():
    violations = [
        f"{imp.place()}: {imp.importer} imports {imp.target}"
        for imp in IMPORTS
        if imp.target.split(".")[0] in FLOWER_PACKAGES and not _under(imp.importer, FLOWER_GLUE)
    ]
    _fail_with(violations, f"imports of flower/tornado outside {FLOWER_GLUE}")
    assert any(_under(imp.importer, FLOWER_GLUE) and imp.target.split(".")[0] == "flower" for imp in IMPORTS)


def test_nothing_outside_rmq_testing_imports_it():
    violations = [
        f"{imp.place()}: {a} imports {b}"
        for (a, b), imps in rmq_edges().items()
        for imp in imps
        for private in PRIVATE_TO_ITSELF
        if _under(b, private) and not _under(a, private)
    ]
    _fail_with(violations, "imports of rmq.testing from the library")


def test_the_allowed_resource_edges_are_resource_packages_and_acyclic():
    assert all(a in RESOURCE_PACKAGES and b in RESOURCE_PACKAGES and a != b for a, b in ALLOWED_RESOURCE_EDGES)
    graph: dict[str, set[str]] = {pkg: set() for pkg in RESOURCE_PACKAGES}
    for a, b in ALLOWED_RESOURCE_EDGES:
        graph[a].add(b)
    assert all(len(members) == 1 for members in _strongly_connected(graph)), ALLOWED_RESOURCE_EDGES


def test_package_dependencies_point_down():
    violations = []
    for (a, b), imps in rmq_edges().items():
        allowed = LAYER_RULES.get(component(a))
        if allowed is None or component(b) in allowed:
            continue
        may = ", ".join(sorted(allowed))
        violations.extend(f"{imp.place()}: {a} imports {b} ({component(a)} may import only {may})" for imp in imps)
    _fail_with(violations, "imports against the dependency direction")


def test_importing_rmq_alone_imports_no_celery():
    code = (
        "import rmq, sys; "
        f"print(rmq.__file__); print(sorted(m for m in {sorted(CELERY_PACKAGES)!r} if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    where, loaded = out.stdout.splitlines()
    assert Path(where).resolve().parent == PACKAGE_DIR, f"imported {where}, not this checkout's rmq"
    assert loaded == "[]", f"'import rmq' imported {loaded}"
