"""The package's layout rules: no import cycles (imports inside functions count), the one-way
floors of DESIGN.md, and no module outside ``fusegpt.methods`` that branches on a method name."""

from __future__ import annotations

import ast
from pathlib import Path

import fusegpt
from fusegpt.methods import registry

ROOT = Path(fusegpt.__file__).parent
PKG = ROOT.name


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def _ancestors(mod: str) -> list[str]:
    parts = mod.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (functions included).

    ``from pkg import sub`` points at ``pkg.sub`` when that is a module, else at ``pkg``; every
    target also pulls in its parent packages (Python runs their ``__init__`` first), except the
    importer's own ancestors, which are already being imported.
    """
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for mod, (path, is_pkg) in mods.items():
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == PKG]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    pkg = ".".join(base[:len(base) - (node.level - 1)] + ([node.module] if node.module else []))
                elif (node.module or "").split(".")[0] == PKG:
                    pkg = node.module
                else:
                    continue
                targets = [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in mods else pkg for a in node.names]
            for t in targets:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                deps.add(t)
                deps.update(a for a in _ancestors(t) if a != PKG)
        own = set(_ancestors(mod)) | {mod}
        graph[mod] = {d for d in deps if d not in own}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_floors_point_down():
    """Machinery never imports a method, the API or the CLI; methods never import the API or CLI."""
    graph = import_graph()
    top = {f"{PKG}.api", f"{PKG}.cli", f"{PKG}.sweep", f"{PKG}.report_render", PKG}
    for mod, deps in graph.items():
        if mod == PKG or mod.startswith((f"{PKG}.cli", f"{PKG}.api", f"{PKG}.sweep", f"{PKG}.report_render",
                                         f"{PKG}.__main__")):
            continue
        bad = {d for d in deps if d in top or d.startswith(f"{PKG}.cli")}
        if not mod.startswith(f"{PKG}.methods"):
            bad |= {d for d in deps if d.startswith(f"{PKG}.methods")}
        assert not bad, f"{mod} imports {sorted(bad)} from a floor above it"


def _method_literals(node: ast.AST, names: set[str]) -> bool:
    vals = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return any(isinstance(v, ast.Constant) and v.value in names for v in vals)


def test_no_method_name_branches_outside_methods():
    """No comparison with a method name (``x == "sleb"``, ``x in ("sleb", "mi")``) and no dict
    keyed by method names outside ``fusegpt/methods/``."""
    names = set(registry.names())
    offenders = []
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT)
        if rel.parts[0] == "methods":
            continue
        tree = ast.parse(f.read_text())
        # the papers' zero-shot task lists, named after the papers: data, not a method branch
        exempt = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                  and any(isinstance(t, ast.Name) and t.id == "TASK_ALIASES" for t in n.targets)}
        for node in ast.walk(tree):
            if id(node) in exempt:
                continue
            hit = (isinstance(node, ast.Compare) and any(_method_literals(x, names) for x in (node.left, *node.comparators))) \
                or (isinstance(node, ast.Dict) and any(k is not None and _method_literals(k, names) for k in node.keys))
            if hit:
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, offenders
