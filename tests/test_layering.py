"""The package's layering (DESIGN.md section 1), checked on the source with ``ast``.

Every module of ``autosculpt`` is parsed; each import is recorded with where it sits (module level or
inside a function), including ``importlib.import_module("autosculpt.x")`` string literals. The rules:

1. no import cycle between autosculpt modules (module-level imports: they run at import time), and
   none between the layered subpackages even through lazy imports (a lazy import that goes back up
   is a hidden cycle: ``plan`` importing ``nn`` inside a function while ``nn`` imports ``plan``);
2. ``ops/`` stands on the bottom: it imports only the kernel plumbing below it, never ``nn``,
   ``runtime``, ``graph``, ``rl``, ``search``, ``cli``... (lazy imports included);
3. ``rl/`` and ``graph/`` import no kernel code (``ops``, ``_ext``, ``_triton``);
4. no private name (leading underscore) crosses from one subpackage to another, neither imported
   (``from ..x import _y``, ``from ..x._y import z``) nor read off an imported module (``x._y``);
5. ``timing`` imports no autosculpt module (it is the bottom of everything that times), and it is the
   only module that calls ``torch.set_num_threads`` (elsewhere: ``timing.threads(n)``, which restores).

A "subpackage" is the first component under ``autosculpt`` (``ops``, ``nn``, ``plan``, ``runtime``...);
the top-level private modules (``_ext``, ``_optional``, ``_atomic``...) are shared by the whole package.
"""
from __future__ import annotations

import ast
import pathlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Set

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "autosculpt"
PKG = "autosculpt"

# The subpackages of DESIGN.md's layer picture: between them no cycle, lazy imports included.
LAYERED = {"ops", "nn", "plan", "fuse", "deploy", "export", "runtime", "graph", "rl", "search", "baselines", "cli",
           "patterns", "reference", "timing", "_ext", "_triton"}
# What ops/ may import: the modules below it in DESIGN.md's picture.
OPS_MAY_IMPORT = {"ops", "_ext", "_triton", "_version", "_optional", "_atomic", "reference", "timing"}
KERNEL_CODE = {"ops", "_ext", "_triton"}


@dataclass(frozen=True)
class Import:
    importer: str  # module doing the import
    target: str  # the autosculpt module imported (the deepest one that exists)
    names: tuple  # names taken from it (``from target import names``), () for ``import target``
    lazy: bool  # inside a function (or class body method), not at module level
    line: int


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: Dict[str, pathlib.Path] = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_package(mod: str) -> bool:
    return MODULES.get(mod, pathlib.Path()).name == "__init__.py"


def _unit(mod: str) -> str:
    """The subpackage (first component under autosculpt) a module belongs to; "" for the root."""
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def _deepest_module(dotted: str) -> Optional[str]:
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in MODULES:
            return ".".join(parts[:n])
    return None


def _resolve_from(importer: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if _is_package(importer) else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class _Collector(ast.NodeVisitor):
    def __init__(self, importer: str):
        self.importer = importer
        self.depth = 0  # > 0 inside a function
        self.imports: List[Import] = []
        self.bindings: Dict[str, str] = {}  # local name -> autosculpt module it names
        self.private_attrs: List[tuple] = []  # (module, attribute, line)
        self.uses_import_module = False
        self.module_strings: List[tuple] = []  # ("autosculpt.x", line, lazy): module names as strings

    def _add(self, target: str, names: tuple, line: int) -> None:
        if target == PKG or target.startswith(PKG + "."):
            mod = _deepest_module(target)
            if mod is not None:
                self.imports.append(Import(self.importer, mod, names, self.depth > 0, line))

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            self._add(alias.name, (), node.lineno)
            if alias.name.startswith(PKG):
                if alias.asname:
                    self.bindings[alias.asname] = alias.name
                else:
                    self.bindings.setdefault(PKG, PKG)

    def visit_ImportFrom(self, node: ast.ImportFrom):
        base = _resolve_from(self.importer, node)
        if not base.startswith(PKG):
            return
        plain = []
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in MODULES:  # ``from . import weight_cache``: a submodule
                self._add(sub, (), node.lineno)
                self.bindings[alias.asname or alias.name] = sub
            else:
                plain.append(alias.name)
        if plain or not node.names:
            self._add(base, tuple(plain), node.lineno)

    def visit_Attribute(self, node: ast.Attribute):
        dotted = _dotted(node.value)
        if dotted is not None:
            head, _, rest = dotted.partition(".")
            if head in self.bindings:
                mod = _deepest_module(self.bindings[head] + ("." + rest if rest else ""))
                if mod is not None and _is_private(node.attr) and (mod + "." + node.attr) not in MODULES:
                    self.private_attrs.append((mod, node.attr, node.lineno))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call):
        func = _dotted(node.func) or ""
        if func.endswith("import_module") or func == "__import__":
            self.uses_import_module = True
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant):
        if isinstance(node.value, str) and node.value.startswith(PKG + ".") and node.value in MODULES:
            self.module_strings.append((node.value, node.lineno, self.depth > 0))


def _dotted(node) -> Optional[str]:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclass
class ModuleInfo:
    imports: List[Import]
    private_attrs: List[tuple]


def _scan() -> Dict[str, ModuleInfo]:
    out = {}
    for mod, path in MODULES.items():
        c = _Collector(mod)
        c.visit(ast.parse(path.read_text(), str(path)))
        imports = list(c.imports)
        if c.uses_import_module:  # importlib.import_module("autosculpt.x") and friends: lazy imports
            imports += [Import(mod, s, (), lazy, line) for s, line, lazy in c.module_strings]
        out[mod] = ModuleInfo(imports, c.private_attrs)
    return out


SCAN = _scan()


def _where(imp: Import) -> str:
    kind = "lazy import" if imp.lazy else "import"
    return f"{MODULES[imp.importer].relative_to(ROOT.parent)}:{imp.line}: {kind} of {imp.target}"


def _module_level_graph() -> Dict[str, Set[str]]:
    """module -> modules it imports at import time. Importing ``a.b.c`` also runs the packages ``a.b``
    (not the root, and not the importer's own ancestors, which are already being imported)."""
    graph: Dict[str, Set[str]] = {m: set() for m in MODULES}
    for mod, info in SCAN.items():
        ancestors = {".".join(mod.split(".")[:n]) for n in range(1, mod.count(".") + 1)}
        for imp in info.imports:
            if imp.lazy:
                continue
            parts = imp.target.split(".")
            for n in range(2, len(parts) + 1):
                dep = ".".join(parts[:n])
                if dep in MODULES and dep not in ancestors and dep != mod:
                    graph[mod].add(dep)
    return graph


def _find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    state: Dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _subpackage_graph() -> Dict[str, Set[str]]:
    """subpackage -> subpackages it imports, module-level and lazy imports alike (LAYERED ones only)."""
    graph: Dict[str, Set[str]] = {u: set() for u in LAYERED}
    for mod, info in SCAN.items():
        for imp in info.imports:
            a, b = _unit(mod), _unit(imp.target)
            if a != b and a in LAYERED and b in LAYERED:
                graph[a].add(b)
    return graph


def _imports_of(unit: str):
    for mod, info in SCAN.items():
        if _unit(mod) == unit:
            yield from info.imports


# --------------------------------------------------------------------------- the rules


def test_scan_sees_the_package():
    """Sanity: the scanner finds the modules and their imports (lazy and importlib ones too)."""
    assert "autosculpt.ops.conv" in MODULES and "autosculpt.runtime" in MODULES
    assert any(i.target == "autosculpt.ops.conv" for i in SCAN["autosculpt.nn.conv"].imports)
    lazy = [i for info in SCAN.values() for i in info.imports if i.lazy]
    assert lazy and any(i.target == "autosculpt.ops._conv_cuda" for i in SCAN["autosculpt.ops.conv"].imports)


def test_no_import_cycles():
    cycle = _find_cycle(_module_level_graph())
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_no_hidden_cycles_between_subpackages():
    cycle = _find_cycle(_subpackage_graph())
    assert cycle is None, "subpackage cycle (lazy imports included): " + " -> ".join(cycle)


def test_ops_imports_only_what_is_below_it():
    bad = [_where(i) for i in _imports_of("ops") if _unit(i.target) not in OPS_MAY_IMPORT]
    assert not bad, "ops/ imports from a layer above it:\n" + "\n".join(bad)


@pytest.mark.parametrize("unit", ["rl", "graph"])
def test_rl_and_graph_import_no_kernel_code(unit):
    bad = [_where(i) for i in _imports_of(unit) if _unit(i.target) in KERNEL_CODE]
    assert not bad, f"{unit}/ imports kernel code:\n" + "\n".join(bad)


def test_no_private_name_crosses_a_subpackage():
    bad = []
    for mod, info in SCAN.items():
        for imp in info.imports:
            if _unit(imp.target) == _unit(mod):
                continue
            below_unit = imp.target.split(".")[2:]  # autosculpt.<unit>.<these>
            private = [p for p in below_unit if _is_private(p)] + [n for n in imp.names if _is_private(n)]
            if private:
                bad.append(f"{_where(imp)} takes private {', '.join(private)}")
        for target, attr, line in info.private_attrs:
            if _unit(target) != _unit(mod):
                bad.append(f"{MODULES[mod].relative_to(ROOT.parent)}:{line}: reads private {target}.{attr}")
    assert not bad, "private names used across subpackages:\n" + "\n".join(bad)


def test_timing_stands_alone():
    bad = [_where(i) for i in _imports_of("timing")]
    assert not bad, "autosculpt.timing must import only torch and the standard library:\n" + "\n".join(bad)


def test_threads_are_pinned_only_through_timing():
    bad = []
    for mod, path in MODULES.items():
        if mod == f"{PKG}.timing":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and (_dotted(node.func) or "").endswith("set_num_threads"):
                bad.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}")
    assert not bad, "torch.set_num_threads outside autosculpt.timing (use timing.threads / set_threads):\n" + "\n".join(bad)


def test_plan_kinds_are_registered_whatever_is_imported_first():
    """``plan`` imports none of the modules that define its kinds; any ``import autosculpt.x`` first runs
    ``autosculpt/__init__``, which imports ``nn`` (conv, attention and linear register there)."""
    import subprocess
    import sys

    code = "import autosculpt.plan as p; print(' '.join(sorted(p._KINDS)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert {"conv", "attention", "linear"} <= set(run.stdout.split())
