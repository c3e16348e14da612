"""The import direction: library (gradflow/) → analyses (analyses/) → CLI (gradflow/cli/), no cycles.

Imports are read from the source with ``ast`` (function-level imports included), so an edge hidden
inside a function counts like one at the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Third-party packages that draw the terminal or parse the command line: the CLI's, not the library's.
CLI_ONLY = ("rich", "typer", "click")


def module_name(path: Path, root: Path) -> str:
    """``gradflow/store.py`` → ``gradflow.store``; ``analyses/__init__.py`` → ``analyses``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def canonical(name: str) -> str:
    """The analyses package under either of its names (``analyses`` or ``gradflow.analyses``) as ``analyses``."""
    return name.removeprefix("gradflow.") if name == "gradflow.analyses" or name.startswith(
        "gradflow.analyses.") else name


def imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from pkg import sub`` gives ``pkg.sub`` for a submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if canonical(sub) in modules else base)
    return {canonical(n) for n in found}


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: modules it imports}`` for gradflow/ and analyses/ under ``root``."""
    files = {canonical(module_name(p, root)): p for folder in ("gradflow", "analyses")
             for p in sorted((root / folder).rglob("*.py"))}
    return {name: imports(path, name, set(files)) for name, path in files.items()}


def layer(module: str) -> str | None:
    if module == "gradflow.cli" or module.startswith("gradflow.cli."):
        return "cli"
    if module == "analyses" or module.startswith("analyses."):
        return "analyses"
    if module == "gradflow" or module.startswith("gradflow."):
        return "library"
    return None


def violations(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(module, what it must not import): upward edges, CLI-only packages in the library, private imports."""
    found = set()
    for module, targets in graph.items():
        for target in targets:
            top = target.split(".")[0]
            if layer(module) == "library" and (layer(target) in ("analyses", "cli") or top in CLI_ONLY):
                found.add((module, top if top in CLI_ONLY else layer(target)))
            if layer(module) == "analyses" and layer(target) == "cli":
                found.add((module, "cli"))
            if layer(module) == "analyses" and layer(target) == "library" and any(
                    part.startswith("_") for part in target.split(".")):
                found.add((module, target))
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles among the graph's own modules (edges to a module's own parent package ignored)."""
    def edges(module: str) -> list[str]:
        return sorted(t for t in graph[module] if t in graph and not module.startswith(t + "."))

    found, state, stack = [], {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in edges(module):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def private_names(root: Path) -> set[tuple[str, str]]:
    """(analyses module, private name) for every ``from gradflow... import _name`` in analyses/."""
    found = set()
    for path in sorted((root / "analyses").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and layer(canonical(node.module or "")) == "library":
                found |= {(module_name(path, root), a.name) for a in node.names if a.name.startswith("_")}
    return found


def test_the_library_never_imports_analyses_the_cli_or_terminal_drawing():
    assert violations(import_graph(REPO)) == set()


def test_analyses_use_only_public_library_names():
    assert private_names(REPO) == set()


def test_no_import_cycles():
    assert cycles(import_graph(REPO)) == []


@pytest.fixture
def tree(tmp_path):
    def write(files: dict[str, str]) -> Path:
        for name, text in files.items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(text)
        return tmp_path
    return write


def test_the_checks_find_upward_edges_hidden_in_functions_and_cycles(tree):
    root = tree({
        "gradflow/__init__.py": "from gradflow.store import open\n",
        "gradflow/store.py": "def f():\n    from analyses.plots import draw\n    import rich.progress\n",
        "gradflow/cli/__init__.py": "import typer\nfrom gradflow.analyses import plots\n",
        "analyses/__init__.py": "",
        "analyses/plots.py": "from gradflow import store\nfrom gradflow.store import _private\n"
                             "from . import tables\n",
        "analyses/tables.py": "from .plots import draw\nfrom gradflow.cli import app\n",
    })
    graph = import_graph(root)
    assert graph["gradflow.cli"] == {"typer", "analyses.plots"}
    assert violations(graph) == {("gradflow.store", "analyses"), ("gradflow.store", "rich"),
                                 ("analyses.tables", "cli")}
    assert ["analyses.plots", "analyses.tables", "analyses.plots"] in cycles(graph)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert private_names(root) == {("analyses.plots", "_private")}
