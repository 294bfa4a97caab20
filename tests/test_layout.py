"""The module map: no import cycle, no library module importing a script, each module a screenful or few."""
import ast
import glob
import os

from conftest import ROOT

SCRIPTS = {"train", "predict", "evaluate", "export", "gpumemcheck", "serve", "cache"}
MAX_LINES = 350


def _modules() -> dict[str, set[str]]:
    """Top-level module -> the project modules it imports (anywhere in it, lazily or not)."""
    names = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    graph = {}
    for name in names:
        tree = ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
        graph[name] = imported & names - {name}
    return graph


def test_no_import_cycle():
    graph, done, path = _modules(), set(), []

    def visit(node):
        assert node not in path, "import cycle: " + " -> ".join(path[path.index(node):] + [node])
        if node in done:
            return
        path.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        path.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)


def test_library_modules_import_no_script():
    for name, deps in _modules().items():
        if name not in SCRIPTS:
            assert not deps & SCRIPTS, f"{name}.py imports the script(s) {sorted(deps & SCRIPTS)}"


def test_modules_stay_small():
    for path in glob.glob(os.path.join(ROOT, "*.py")):
        n = sum(1 for _ in open(path))
        assert n <= MAX_LINES, f"{os.path.basename(path)} has {n} lines; split it by concern"
