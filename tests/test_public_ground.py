"""Public ground: Keel imports only the public API of its dependencies (no `_`-prefixed module or name, no
known internal module), so a dependency's minor release cannot break it silently."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

KEEL = Path(__file__).resolve().parent.parent / "keel"
# Internal modules without a leading underscore, named by their projects as not public.
INTERNAL = ("onnxruntime.capi", "uvicorn.protocols", "granian.server.common", "starlette._", "fastapi.dependencies.utils")


def third_party(module: str) -> bool:
    top = module.split(".")[0]
    return top != "keel" and top not in sys.stdlib_module_names


def private_uses(tree: ast.AST) -> list[str]:
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if third_party(a.name):
                    aliases[a.asname or a.name.split(".")[0]] = a.name
                    if any(p.startswith("_") for p in a.name.split(".")) or a.name.startswith(INTERNAL):
                        found.append(f"import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and third_party(node.module):
            mod = node.module
            if any(p.startswith("_") for p in mod.split(".")) or mod.startswith(INTERNAL):
                found.append(f"from {mod} import …")
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"from {mod} import {a.name}")
    for node in ast.walk(tree):  # module._name on an imported dependency
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{aliases[node.value.id]}.{node.attr}")
    return found


def test_keel_uses_only_public_api_of_its_dependencies():
    bad = {}
    for path in sorted(KEEL.rglob("*.py")):
        uses = private_uses(ast.parse(path.read_text(), str(path)))
        if uses:
            bad[str(path.relative_to(KEEL.parent))] = uses
    assert bad == {}, f"private API of a dependency used: {bad}"


def test_the_check_finds_what_it_is_for():
    """The checker itself: each shape of private use is caught, public use is not."""
    src = ("import dbos._error\nfrom granian._futures import x\nfrom aiohttp import _helpers\n"
           "from onnxruntime.capi import onnxruntime_pybind11_state\nimport uvloop\nuvloop._noop()\n"
           "from aiohttp import ClientSession\nimport keel._x\n")
    assert private_uses(ast.parse(src)) == [
        "import dbos._error", "from granian._futures import …", "from aiohttp import _helpers",
        "from onnxruntime.capi import …", "uvloop._noop"]
