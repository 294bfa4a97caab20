"""The module map: thin root scripts over one package, imports pointing down the pipeline, no cycle, small modules."""
import ast
import glob
import os
import subprocess
import sys

from conftest import ROOT

SCRIPTS = {"train", "predict", "evaluate", "export", "gpumemcheck", "serve", "cache", "audit"}
FACES = {"model_utils", "data_utils"}
# each layer imports only itself and the layers before it
LAYERS = ["base", "runtime", "data", "models", "features", "evaluation", "training", "serving"]
# what the inference-only install (no torch) imports: predict.py and serve.py with a model.onnx
TORCH_FREE = ["flowerclf.base.cli", "flowerclf.base.errors", "flowerclf.base.files", "flowerclf.base.progress",
              "flowerclf.base.runfiles", "flowerclf.base.schema", "flowerclf.data.folders", "flowerclf.data.layout",
              "flowerclf.data.images", "flowerclf.data.transforms", "flowerclf.models.names", "flowerclf.models.onnx",
              "flowerclf.features.store", "flowerclf.features.upkeep", "flowerclf.evaluation.audit_cache",
              "flowerclf.evaluation.ranker",
              "flowerclf.training.config", "flowerclf.training.rundir", "flowerclf.training.preflight",
              "flowerclf.evaluation.metrics", "flowerclf.evaluation.plots", "flowerclf.serving.predictor",
              "flowerclf.serving.app", "flowerclf.serving.table", "flowerclf.serving.page", "flowerclf.serving.figure",
              "predict", "serve", "cache"]
MAX_LINES = 350


def _package_modules() -> dict[str, str]:
    """flowerclf.x.y -> its file."""
    out = {}
    for path in glob.glob(os.path.join(ROOT, "flowerclf", "**", "*.py"), recursive=True):
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: str) -> set[str]:
    """Every module `path` imports, anywhere in it (lazily or not), as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_the_root_holds_only_scripts_and_the_two_faces():
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    at_root = {p[:-3] for p in tracked if "/" not in p}
    if at_root:  # outside a git checkout (an exported tree) there is nothing to list
        assert at_root == SCRIPTS | FACES


def test_the_package_never_imports_a_root_file():
    for name, path in _package_modules().items():
        roots = {i.split(".")[0] for i in _imports(path)} & (SCRIPTS | FACES)
        assert not roots, f"{name} imports the root file(s) {sorted(roots)}"


def test_imports_point_down_the_pipeline_and_never_cycle():
    modules = _package_modules()
    graph = {name: {i for i in _imports(path) if i in modules and i != name} for name, path in modules.items()}
    for name, deps in graph.items():
        layer = LAYERS.index(name.split(".")[1]) if name.count(".") else -1
        for dep in deps:
            if dep.count("."):
                assert LAYERS.index(dep.split(".")[1]) <= layer, f"{name} imports {dep}, a later layer"
    done, path = set(), []

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


def test_modules_stay_small():
    files = list(_package_modules().values()) + [os.path.join(ROOT, f"{n}.py") for n in SCRIPTS | FACES]
    for path in files:
        n = sum(1 for _ in open(path))
        assert n <= MAX_LINES, f"{os.path.relpath(path, ROOT)} has {n} lines; split it by concern"


def test_the_torch_free_modules_import_no_torch():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in TORCH_FREE)
            + "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
              "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_inference_only_install_has_what_its_modules_import():
    """requirements-predict.txt names every package the torch-free modules import when they load."""
    with open(os.path.join(ROOT, "requirements-predict.txt")) as f:
        wanted = {line.split(">")[0].split("=")[0].strip().lower() for line in f if line.strip()[:1].isalpha()}
    modules = _package_modules()
    for name in TORCH_FREE:
        path = modules.get(name) or os.path.join(ROOT, f"{name}.py")
        for node in ast.parse(open(path).read()).body:  # the imports that run when the module loads
            roots = ({a.name.split(".")[0] for a in node.names} if isinstance(node, ast.Import) else
                     {node.module.split(".")[0]} if isinstance(node, ast.ImportFrom) and node.level == 0 else set())
            for root in roots - {"flowerclf", "__future__"} - set(sys.stdlib_module_names):
                assert {"PIL": "pillow"}.get(root, root).lower() in wanted, f"{name} imports {root}"
