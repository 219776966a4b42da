"""Which of this package's source files a piece of code can execute: the static import closure.

Used two ways: cache keys (:func:`code_key`: a quantization job, an evaluation or the TMPQ-DM study is keyed on
the sources it can run, so adding a family module or editing the report reruns none of them) and the
dependency test of ``dvc.yaml`` (``tests/depgraph.py``: every stage lists the code it runs as deps).

Files are parsed with :mod:`ast`, never imported, so this needs no third-party package. Importing ``a.b.c``
executes ``a/__init__.py`` and ``a/b/__init__.py`` too; ``from a.b import c`` also counts ``a/b/c.py`` when
``c`` is a submodule. Standard library only.
"""
from __future__ import annotations

import ast
import hashlib
import os
from pathlib import Path
from typing import Iterable, Optional

__all__ = ["import_closure", "code_key", "code_files"]



def _module_file(base: Path, dotted: str) -> Optional[Path]:
    """``base/a/b.py`` or ``base/a/b/__init__.py`` for ``dotted='a.b'`` (``''`` is ``base`` itself, a
    package only if it has an ``__init__.py``)."""
    target = base.joinpath(*dotted.split(".")) if dotted else base
    if dotted and target.with_suffix(".py").is_file():
        return target.with_suffix(".py")
    if (target / "__init__.py").is_file():
        return target / "__init__.py"
    return None


def _package_chain(base: Path, dotted: str) -> list[Path]:
    """Every file that ``import a.b.c`` executes below ``base``: ``a/__init__.py``, ``a/b/__init__.py``
    and ``a/b/c.py`` (or ``a/b/c/__init__.py``); empty if ``a`` is not found under ``base``."""
    parts = dotted.split(".")
    out = []
    for i in range(1, len(parts) + 1):
        f = _module_file(base, ".".join(parts[:i]))
        if f is None:
            break
        out.append(f)
    return out


def _package_modules(pkg_dir: Path) -> list[Path]:
    """What ``pkgutil.iter_modules([pkg_dir])`` finds: every ``*.py`` module in the directory and the
    ``__init__.py`` of every sub-package (which the closure then follows)."""
    out = sorted(p for p in pkg_dir.glob("*.py"))
    out += sorted(d / "__init__.py" for d in pkg_dir.iterdir() if d.is_dir() and (d / "__init__.py").is_file())
    return out


def _is_call_to(node: ast.Call, module: str, funcs: Iterable[str]) -> bool:
    f = node.func
    if isinstance(f, ast.Attribute) and f.attr in funcs:
        return isinstance(f.value, ast.Name) and f.value.id == module
    return isinstance(f, ast.Name) and f.id in funcs  # ``from pkgutil import iter_modules``


class _Imports(ast.NodeVisitor):
    """Collects, from one module (function bodies, ``if TYPE_CHECKING`` blocks and ``try`` blocks
    included, to err on the side of a dep too many):

    * ``absolute``: dotted names imported absolutely, with the names imported from them
      (``from a.b import c`` -> ``("a.b", ["c"])``; ``c`` may be a submodule);
    * ``relative``: ``(level, module, names)`` of ``from ..x import y``;
    * ``discovers_package``: the module imports the modules of its package dynamically --
      ``pkgutil.iter_modules`` / ``pkgutil.walk_packages`` (auto-registration: any use of the
      registry runs it) or ``importlib.import_module`` with a computed name (e.g. ``f"{__name__}.{x}"``);
    * ``lazy_exports``: the computed ``importlib.import_module`` sits only inside a module-level
      ``__getattr__`` (PEP 562 lazy exports): it runs when an importer reads a name of the package that
      is not a submodule (``from pkg import Name``, ``import pkg``), not when it imports a submodule
      (``from pkg.sub import x``) -- so only such importers depend on every module of the package.
    """

    def __init__(self) -> None:
        self.absolute: list[tuple[str, list[str]]] = []
        self.relative: list[tuple[int, str, list[str]]] = []
        self.discovers_package = False
        self.discovers_recursive = False
        self.lazy_exports = False
        self._depth = 0  # function nesting
        self._in_getattr = False

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        outer = self._in_getattr
        self._in_getattr = outer or (self._depth == 0 and node.name == "__getattr__")
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1
        self._in_getattr = outer

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.absolute.append((alias.name, []))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        names = [a.name for a in node.names if a.name != "*"]
        if node.level:
            self.relative.append((node.level, node.module or "", names))
        elif node.module:
            self.absolute.append((node.module, names))

    def visit_Call(self, node: ast.Call) -> None:
        if _is_call_to(node, "pkgutil", ("iter_modules",)):
            self.discovers_package = True
        elif _is_call_to(node, "pkgutil", ("walk_packages",)):
            self.discovers_package = self.discovers_recursive = True
        elif _is_call_to(node, "importlib", ("import_module",)) and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                name = arg.value
                if name.startswith("."):
                    level = len(name) - len(name.lstrip("."))
                    self.relative.append((level, name[level:], []))
                else:
                    self.absolute.append((name, []))
            elif self._in_getattr:  # lazy exports: see the class docstring
                self.lazy_exports = True
            else:  # a computed module name: assume any module of this package
                self.discovers_package = True
        self.generic_visit(node)


_PARSED: dict[Path, tuple[tuple[int, int], _Imports]] = {}


def _parse(path: Path) -> _Imports:
    """The imports of one file, cached while the file's mtime and size stay the same."""
    st = path.stat()
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _PARSED.get(path)
    if hit is None or hit[0] != stamp:
        v = _Imports()
        try:
            v.visit(ast.parse(path.read_bytes(), filename=str(path)))
        except (SyntaxError, ValueError):
            pass  # a file mid-edit: its own imports are unknown, the file itself still counts
        hit = _PARSED[path] = (stamp, v)
    return hit[1]


def import_closure(script: os.PathLike | str | Iterable[os.PathLike | str], root: os.PathLike | str,
                   search_path: Optional[Iterable[os.PathLike | str]] = None,
                   parents: Optional[dict[Path, Path]] = None, within: Optional[os.PathLike | str] = None,
                   follow_discovery: bool = True) -> set[Path]:
    """Every ``.py`` file below ``root`` that running ``script`` can execute through imports.

    ``search_path`` plays ``sys.path`` for absolute imports (default: the script's directory -- what
    ``python stages/x.py`` puts first, so ``from _common import ...`` finds ``stages/_common.py`` --
    then ``root``). Importing ``a.b.c`` executes ``a/__init__.py`` and ``a/b/__init__.py`` too; ``from
    a.b import c`` also counts ``a/b/c.py`` when ``c`` is a submodule. A module that discovers its
    package's modules at run time (see :class:`_Imports`) depends on every module of its package.
    Files outside ``within`` (default ``root``; the standard library, site-packages) are ignored. Returns
    resolved paths; ``parents``, if given, is filled with the first importer found for each file (to explain
    a chain). ``script`` may be several files (the union of their closures).

    ``follow_discovery=False`` does not follow run-time discovery (``pkgutil`` registries, computed
    ``importlib.import_module`` names): what a cache key wants, since a discovered module (another family
    registering itself) does not compute the result of the code that discovers it; the dvc.yaml check keeps
    the default, since a stage does execute every discovered module.
    """
    root = Path(root).resolve()
    scripts = [Path(script)] if isinstance(script, (str, os.PathLike)) else [Path(s) for s in script]
    scripts = [s.resolve() for s in scripts]
    if not scripts:
        raise ValueError("import_closure: no script given")
    within_dir = Path(within).resolve() if within is not None else root
    bases = [Path(p).resolve() for p in (search_path or [scripts[0].parent, root])]
    seen: set[Path] = set()
    todo = list(scripts)
    f = scripts[0]

    def add(paths: Iterable[Path]) -> None:
        for p in paths:
            p = p.resolve()
            if p not in seen and p.is_relative_to(within_dir):
                todo.append(p)
                if parents is not None:
                    parents.setdefault(p, f)

    def from_package(target: Path, names: list[str], bare: bool) -> None:
        """``target`` was imported (``bare``: as ``import target``), then ``names`` read from it."""
        add([target])
        if target.name != "__init__.py":
            return
        pkg_dir = target.parent
        attrs = bare
        for n in names:
            sub = _module_file(pkg_dir, n)
            if sub is not None:
                add([sub])
            else:
                attrs = True
        if (attrs and follow_discovery and target.is_file() and target.is_relative_to(within_dir)
                and _parse(target).lazy_exports):
            add(_package_modules(pkg_dir))

    def absolute(dotted: str, names: list[str]) -> None:
        for base in bases:
            chain = _package_chain(base, dotted)
            if not chain:
                continue
            add(chain)
            if len(chain) == len(dotted.split(".")):
                from_package(chain[-1], names, bare=not names)
            return  # a partial match (``pipeline`` found, ``pipeline.gone`` not) stops the search too

    while todo:
        f = todo.pop()
        if f in seen or not f.is_file():
            continue
        seen.add(f)
        imp = _parse(f)
        for dotted, names in imp.absolute:
            absolute(dotted, names)
        for level, mod, names in imp.relative:
            pkg_dir = f.parent
            for _ in range(level - 1):
                pkg_dir = pkg_dir.parent
            # the packages from ``pkg_dir`` up are already executed (they contain the importing module)
            if mod:
                chain = _package_chain(pkg_dir, mod)
                add(chain)
                if len(chain) == len(mod.split(".")):
                    from_package(chain[-1], names, bare=False)
            elif (pkg_dir / "__init__.py").is_file():
                from_package(pkg_dir / "__init__.py", names, bare=False)
            else:  # ``from . import a`` in a directory without ``__init__.py`` (namespace package)
                add(m for m in (_module_file(pkg_dir, n) for n in names) if m is not None)
        if imp.discovers_package and follow_discovery:
            pkg_dir = f.parent
            if imp.discovers_recursive:
                add(sorted(pkg_dir.rglob("*.py")))
            else:
                add(_package_modules(pkg_dir))
    return seen




# --------------------------------------------------------------------------------------------------
# cache keys

PACKAGE_DIR = Path(__file__).resolve().parent


def code_files(*modules: os.PathLike | str) -> list[Path]:
    """``modules`` (paths of ``.py`` files: of this package, or a family module of its own elsewhere) and the
    files of this package they can execute, sorted: their import closure inside the package, run-time
    discovery not followed, ``pipeline/__init__.py`` (the CPU numerics every process applies) always
    included."""
    if not modules:
        raise ValueError("code_files: name at least one Python module")
    paths = [Path(m).resolve() for m in modules]
    for p in paths:
        if not p.is_file() or p.suffix != ".py":
            raise ValueError(f"code_files: {p} is not a Python source file")
    files = import_closure([PACKAGE_DIR / "__init__.py", *paths], PACKAGE_DIR.parent, search_path=[PACKAGE_DIR.parent],
                           within=PACKAGE_DIR, follow_discovery=False)
    return sorted(files)


def code_key(*modules: os.PathLike | str) -> str:
    """Hash of the sources :func:`code_files` finds for ``modules`` (paths relative to the package, or the
    file name of a module outside it, and their bytes): the code part of a cache key. A file the modules cannot import (a new family, the report)
    leaves it unchanged; any byte of a file they can import changes it."""
    h = hashlib.sha256()
    for p in code_files(*modules):
        name = (str(p.relative_to(PACKAGE_DIR)).replace(os.sep, "/") if p.is_relative_to(PACKAGE_DIR)
                else f"<outside>/{p.name}")  # a module of the user's own: its name, not where it lies
        h.update(name.encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()[:16]
