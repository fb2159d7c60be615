"""The module import graph of kvsieve: every module imports, and no two modules import each other, directly or
around a loop.

The graph is read statically from the source tree (core/ -> ``kvsieve``, policies/ -> ``kvsieve.policies``,
backends/ -> ``kvsieve.backends``): every ``import`` statement counts, function-local ones included (a local import
only delays a cycle to the first call), except those under ``if TYPE_CHECKING:`` (annotations only). A module's
import of one of its own parent packages is not an edge: Python imports the parents first anyway.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"kvsieve": ROOT / "core", "kvsieve.policies": ROOT / "policies", "kvsieve.backends": ROOT / "backends"}

#: Cycles tolerated, each as the set of modules in one strongly connected component: none. (A cycle that must be
#: tolerated for a while goes here, and the test fails once it is gone until the entry is deleted.)
ALLOWED_CYCLES: set[frozenset[str]] = set()

#: Optional packages that only some machines have (GPU kernels): a module that needs one is skipped, not failed,
#: when the package is missing.
OPTIONAL_IMPORTS = {"triton", "flash_attn"}


def source_modules(sources: dict[str, Path]) -> dict[str, Path]:
    """``{"kvsieve.evaluation.cli": Path(".../core/evaluation/cli.py"), ...}``: every module under the roots
    (a package is its ``__init__.py``)."""
    modules = {}
    for package, root in sources.items():
        for path in sorted(root.rglob("*.py")):
            parts = [p for p in path.relative_to(root).with_suffix("").parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


def _imported_names(module: str, path: Path) -> set[str]:
    """Dotted names the module imports (``from a import b`` names ``a`` and ``a.b``), relative imports resolved,
    imports under ``if TYPE_CHECKING:`` left out."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """``module -> modules it imports``, restricted to ``modules`` (imports of parent packages dropped)."""
    graph = {}
    for module, path in modules.items():
        graph[module] = {
            name
            for name in _imported_names(module, path)
            if name in modules and name != module and not module.startswith(name + ".")
        }
    return graph


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.add(frozenset(component))
    return found


MODULES = source_modules(SOURCES)


def _describe(found: set[frozenset[str]]) -> str:
    return "; ".join(" <-> ".join(sorted(c)) for c in sorted(found, key=sorted)) or "(none)"


def test_no_import_cycles_beyond_the_allowed_ones():
    found = cycles(import_graph(MODULES))
    assert found - ALLOWED_CYCLES == set(), f"new import cycles: {_describe(found - ALLOWED_CYCLES)}"
    assert ALLOWED_CYCLES - found == set(), (
        f"allowed cycles that are gone (delete them from ALLOWED_CYCLES): {_describe(ALLOWED_CYCLES - found)}"
    )


def test_the_tooling_is_not_imported_by_the_library():
    """``kvsieve.cli`` may import the subcommands (bench, eval); nothing imports ``kvsieve.cli`` back."""
    graph = import_graph(MODULES)
    importers = sorted(m for m, names in graph.items() if "kvsieve.cli" in names)
    assert importers == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module):
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in OPTIONAL_IMPORTS:
            pytest.skip(f"{module} needs {exc.name}, which is not installed")
        raise


# ---------------------------------------------------------------------------------------------- the checker itself
def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return import_graph(source_modules({"pkg": tmp_path / "pkg"}))


def test_checker_finds_a_cycle_through_a_function_local_import(tmp_path):
    graph = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from pkg.b import f\n",
            "b.py": "def f():\n    from pkg import a\n",
            "c.py": "import pkg.a\n",
        },
    )
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}
    assert cycles(graph) == {frozenset({"pkg.a", "pkg.b"})}


def test_checker_resolves_relative_imports_and_ignores_type_checking(tmp_path):
    graph = _tree(
        tmp_path,
        {
            "__init__.py": "from .sub import x\n",
            "sub/__init__.py": "from ..top import y\n",
            "sub/x.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub import z\n",
            "sub/z.py": "from . import x\nfrom pkg import sub\n",
            "top.py": "from .sub import x\n",
        },
    )
    assert graph["pkg"] == {"pkg.sub", "pkg.sub.x"}
    assert graph["pkg.sub"] == {"pkg.top"} and graph["pkg.sub.x"] == set()
    assert graph["pkg.sub.z"] == {"pkg.sub.x"}  # its parent package pkg.sub is not an edge
    assert cycles(graph) == {frozenset({"pkg.sub", "pkg.top"})}  # pkg.top imports pkg.sub (the package) for x


def test_checker_finds_a_long_loop_once():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
    assert cycles(graph) == {frozenset("abc"), frozenset("de")}
