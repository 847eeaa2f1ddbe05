"""The package's layout: no import cycle inside bbvi/, counting the imports inside functions too (they hide cycles
from Python, not from a reader)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules():
    """{dotted name: path} of every module under bbvi/ (a package by its own name)."""
    out = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "bbvi")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def import_graph():
    """{module: set of bbvi modules it imports, anywhere in its code}."""
    modules = _modules()

    def targets(module, node):
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = module if modules[module].endswith("__init__.py") else module.rsplit(".", 1)[0]
        for _ in range(node.level - 1):
            base = base.rsplit(".", 1)[0]
        target = base if node.level else node.module
        if node.level and node.module:
            target = f"{base}.{node.module}"
        return [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]

    graph = {m: set() for m in modules}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in targets(module, node):
                    while t not in modules and "." in t:
                        t = t.rsplit(".", 1)[0]
                    if t in modules and t != module:
                        graph[module].add(t)
    return graph


def cycles(graph):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycles_finds_a_cycle_through_an_import_inside_a_function():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_inside_bbvi():
    graph = import_graph()
    assert "bbvi.algorithms.sgd" in graph and "bbvi.update" in graph["bbvi.algorithms.sgd"]   # the graph is read
    assert "bbvi.flows" in graph["bbvi.family_names"]                   # in-function imports count
    assert cycles(graph) == []
