"""No module of amlx uses another module's private names.

The rule, checked on the source of every module under amlx/ with `ast`:

* A *private name* is one that starts with an underscore and is not a dunder
  (``_read_json`` is private; ``__version__`` and ``__all__`` are not).
* ``from M import _name`` and ``from . import _name`` are refused when ``_name``
  is a private name *defined in* the module M (a function, class, constant) --
  whatever the importing module.
* An attribute ``X._name`` is refused when ``X`` is bound, by an import in
  the same file, to an amlx module other than the file's own (``from amlx.models
  import loader; loader._read_tensors``, ``import amlx.convert as c;
  c._plan``, ``amlx.convert._plan``).
* Modules and packages whose own names start with an underscore are the array
  layer's: ``amlx._mlx`` (the package and the modules inside it, e.g.
  ``amlx._mlx.ops``) may be imported from anywhere, like any public module.
  The native extensions ``amlx._mlxc`` (cffi) and ``amlx._arraytype`` (Array's
  C core) and the binding module ``amlx._mlx._lib`` belong to the array layer alone: only modules inside ``amlx/_mlx/`` may
  import them (DESIGN.md: only amlx/_mlx talks to amlx._mlxc).
* The array layer ``amlx/_mlx/`` is one unit behind its package name: its
  modules share helpers among themselves (``_call`` of ``array``, ``_Vec`` of
  ``ops``), so a module inside ``amlx/_mlx/`` may use private names of the
  other modules inside ``amlx/_mlx/``. No module outside it may.

Aliasing an import to a private local name (``from amlx._mlx import float32 as
_f32``) is fine: the name imported is public.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "amlx"
ARRAY_LAYER_ONLY = {"amlx._mlxc", "amlx._arraytype", "amlx._mlx._lib"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _array_layer(module: str) -> bool:
    return module == "amlx._mlx" or module.startswith("amlx._mlx.")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_module(name: str) -> bool:
    """Whether `name` is a module or package of amlx (a file or folder under amlx/, or the extension)."""
    if name in ("amlx._mlxc", "amlx._arraytype"):  # (the native extensions)
        return True
    rel = Path(*name.split("."))
    return (ROOT.parent / rel).with_suffix(".py").is_file() or (ROOT.parent / rel / "__init__.py").is_file()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if (ROOT.parent / Path(*module.split(".")) / "__init__.py").is_file() \
        else module.rpartition(".")[0]
    return importlib.util.resolve_name("." * node.level + (node.module or ""), package)


def _violations(path: Path) -> list[str]:
    module = _module_name(path)
    in_array_layer = _array_layer(module)
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: list[str] = []
    bound: dict[str, str] = {}  # local name -> the amlx module it is bound to

    def where(node: ast.AST) -> str:
        return f"{path.relative_to(ROOT.parent)}:{getattr(node, 'lineno', '?')}"

    def check_module_import(target: str, node: ast.AST) -> None:
        if target in ARRAY_LAYER_ONLY and not in_array_layer:
            found.append(f"{where(node)}: imports {target}, which only amlx/_mlx/ may use")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("amlx"):
                    check_module_import(alias.name, node)
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        bound["amlx"] = "amlx"
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            if not source.startswith("amlx"):
                continue
            check_module_import(source, node)
            for alias in node.names:
                full = f"{source}.{alias.name}"
                if _is_module(full):
                    check_module_import(full, node)
                    bound[alias.asname or alias.name] = full
                elif _is_private(alias.name) and source != module and not (in_array_layer and _array_layer(source)):
                    found.append(f"{where(node)}: imports private {alias.name} from {source}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            target = _dotted(node.value, bound)
            if target is not None and target != module and _is_module(target) \
                    and not (in_array_layer and _array_layer(target)):
                found.append(f"{where(node)}: uses private {target}.{node.attr}")
    return found


def _dotted(node: ast.AST, bound: dict[str, str]) -> str | None:
    """The amlx module an expression such as ``loader`` or ``amlx.models.loader`` names, if any."""
    if isinstance(node, ast.Name):
        return bound.get(node.id)
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value, bound)
        if head is not None and _is_module(f"{head}.{node.attr}"):
            return f"{head}.{node.attr}"
    return None


def _modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_module_uses_another_modules_private_names():
    found = [v for path in _modules() for v in _violations(path)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


@pytest.mark.parametrize("source,expected", [
    ("from amlx.models.config import _int\n", "imports private _int"),
    ("from amlx.models import loader\nloader._read_tensors([], None)\n", "uses private amlx.models.loader._read"),
    ("import amlx.convert\namlx.convert._plan\n", "uses private amlx.convert._plan"),
    ("import amlx.convert as c\nc._plan\n", "uses private amlx.convert._plan"),
    ("from amlx import _mlxc\n", "only amlx/_mlx/ may use"),
    ("from amlx import _arraytype\n", "only amlx/_mlx/ may use"),
    ("from amlx._mlx._lib import ffi\n", "only amlx/_mlx/ may use"),
    ("from . import _helper\n", "imports private _helper from amlx.models"),
    ("from amlx._mlx.array import _call\n", "imports private _call from amlx._mlx.array"),
])
def test_the_checker_catches(monkeypatch, source, expected):
    """The checker itself, on snippets placed as if they were amlx/models/probe.py."""
    probe = ROOT / "models" / "probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: source if self == probe else
                        Path.read_bytes(self).decode())
    found = _violations(probe)
    assert any(expected in v for v in found), found


@pytest.mark.parametrize("source", [
    "from amlx._mlx import float32 as _f32\n",
    "from amlx._mlx import ops\nops.add\n",
    "import amlx._mlx.ops\n",
    "from amlx.models.config import ConfigReader\n",
    "x = object()\nx._private\n",  # an object's attribute, not a module's
])
def test_the_checker_allows(monkeypatch, source):
    """Public names, module imports, private local aliases, objects' attributes."""
    probe = ROOT / "models" / "probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: source if self == probe else
                        Path.read_bytes(self).decode())
    assert _violations(probe) == []


def test_the_array_layer_shares_its_helpers_within_itself(monkeypatch):
    probe = ROOT / "_mlx" / "probe.py"
    source = "from amlx._mlx.array import _call\nfrom amlx._mlx import _lib\n_lib._x\n"
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: source if self == probe else
                        Path.read_bytes(self).decode())
    assert _violations(probe) == []
