"""The names --arch accepts, known without importing torch: torchvision's classification builders, and ours.

A typo in --arch is then one line with a suggestion before the seconds of torch's import.
"""
from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import os

from flowerclf.base.errors import FlowerclfError

# models/lite.py's EXTRA_ARCHS (tests/test_models.py keeps the two equal)
OURS = ("efficientnet_lite0", "efficientnet_lite2")


def _registered(path: str) -> list[str]:
    """Functions of one torchvision source file decorated with @register_model(), under the name it registers."""
    found = []
    for node in ast.parse(open(path, encoding="utf-8").read()).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for deco in node.decorator_list:
            call = deco if isinstance(deco, ast.Call) else None
            if getattr(call.func if call else deco, "id", None) == "register_model":
                named = [k.value.value for k in (call.keywords if call else []) if k.arg == "name"]
                found.append(named[0] if named else node.name)
    return found


@functools.cache
def arch_names() -> tuple[str, ...]:
    """Every classification model torchvision registers in torchvision.models (its own source, read, not
    imported: 0.1 s instead of torch's seconds), and ours."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.origin:
        return OURS
    folder = os.path.join(os.path.dirname(spec.origin), "models")
    names = [n for f in sorted(os.listdir(folder)) if f.endswith(".py")
             for n in _registered(os.path.join(folder, f))]
    return tuple(sorted(set(names) | set(OURS)))


def check_arch(arch: str) -> None:
    """One line for an unknown --arch: the closest names, and how to list them all."""
    names = arch_names()
    if arch in names:
        return
    close = difflib.get_close_matches(arch, names, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else f"choose one of {len(names)} names"
    raise FlowerclfError(f"unknown --arch {arch!r}; {hint} (python train.py --list_archs lists them all)")
