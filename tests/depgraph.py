"""Static code-dependency check of ``dvc.yaml``: does every stage list the code it runs as deps?

For each stage (``foreach`` / ``matrix`` items included) the stage script(s) named in its ``cmd``
(``python stages/<name>.py ...`` or ``python -m pkg.mod``) are parsed with :mod:`ast` -- never imported,
so this needs neither torch nor any other third-party package -- and their import closure inside the
repository is computed. Every file of that closure must be covered by a dep of the stage: a dep equal
to the file, or a dep that is a directory above it. Used by ``tests/test_dvc_deps.py``.

Standard library + PyYAML only.
"""
from __future__ import annotations

import ast
import fnmatch
import itertools
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional

__all__ = ["import_closure", "stage_instances", "stage_scripts", "missing_deps", "check_dvc_yaml",
           "format_report"]


# --------------------------------------------------------------------------------------------------
# import closure


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


def import_closure(script: os.PathLike | str, root: os.PathLike | str,
                   search_path: Optional[Iterable[os.PathLike | str]] = None,
                   parents: Optional[dict[Path, Path]] = None) -> set[Path]:
    """Every ``.py`` file below ``root`` that running ``script`` can execute through imports.

    ``search_path`` plays ``sys.path`` for absolute imports (default: the script's directory -- what
    ``python stages/x.py`` puts first, so ``from _common import ...`` finds ``stages/_common.py`` --
    then ``root``). Importing ``a.b.c`` executes ``a/__init__.py`` and ``a/b/__init__.py`` too; ``from
    a.b import c`` also counts ``a/b/c.py`` when ``c`` is a submodule. A module that discovers its
    package's modules at run time (see :class:`_Imports`) depends on every module of its package.
    Files outside ``root`` (the standard library, site-packages) are ignored. Returns resolved paths;
    ``parents``, if given, is filled with the first importer found for each file (to explain a chain).
    """
    root = Path(root).resolve()
    script = Path(script).resolve()
    bases = [Path(p).resolve() for p in (search_path or [script.parent, root])]
    seen: set[Path] = set()
    todo = [script]
    f = script

    def add(paths: Iterable[Path]) -> None:
        for p in paths:
            p = p.resolve()
            if p not in seen and p.is_relative_to(root):
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
        if attrs and target.is_file() and target.is_relative_to(root) and _parse(target).lazy_exports:
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
        if imp.discovers_package:
            pkg_dir = f.parent
            if imp.discovers_recursive:
                add(sorted(pkg_dir.rglob("*.py")))
            else:
                add(_package_modules(pkg_dir))
    return seen


# --------------------------------------------------------------------------------------------------
# dvc.yaml


_TEMPLATE = re.compile(r"\$\{\s*([^}]*?)\s*\}")
_PY_SCRIPT = re.compile(r"(?:^|[\s;&|(])python[0-9.]*\s+((?:-[A-Za-z]\S*\s+)*)(\S+)")


def _lookup(ctx: dict, dotted: str) -> Any:
    cur: Any = ctx
    for part in dotted.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            raise KeyError(dotted)
    return cur


def _substitute(value: Any, ctx: dict) -> Any:
    """Replace ``${...}`` in strings (recursively in lists / dicts) from ``ctx``; an unresolvable
    template becomes the wildcard ``*``."""
    if isinstance(value, str):
        m = _TEMPLATE.fullmatch(value)
        if m:
            try:
                return _lookup(ctx, m.group(1))
            except KeyError:
                return "*"

        def one(m: re.Match) -> str:
            try:
                v = _lookup(ctx, m.group(1))
            except KeyError:
                return "*"
            return v if isinstance(v, str) else str(v)

        return _TEMPLATE.sub(one, value)
    if isinstance(value, list):
        return [_substitute(v, ctx) for v in value]
    if isinstance(value, dict):
        return {_substitute(k, ctx) if isinstance(k, str) else k: _substitute(v, ctx) for k, v in value.items()}
    return value


def _context(dvc: dict, root: Path, params: Optional[dict]) -> dict:
    import yaml

    ctx: dict = {}
    if params is None:
        p = root / "params.yaml"
        params = (yaml.safe_load(p.read_text()) or {}) if p.is_file() else {}
    ctx.update(params)
    for entry in dvc.get("vars") or []:
        if isinstance(entry, dict):
            ctx.update(entry)
        elif isinstance(entry, str):
            path, _, keys = entry.partition(":")
            f = root / path
            if f.is_file() and f.suffix in (".yaml", ".yml"):
                data = yaml.safe_load(f.read_text()) or {}
                if keys:
                    ctx.update({k: data[k] for k in keys.split(",") if k in data})
                else:
                    ctx.update(data)
    return ctx


def _as_items(value: Any, ctx: dict) -> Optional[list[tuple[str, Any]]]:
    """``(name, item)`` pairs of a ``foreach`` value; ``None`` when it cannot be resolved."""
    value = _substitute(value, ctx)
    if isinstance(value, list) and value:
        return [(str(v) if not isinstance(v, (dict, list)) else str(i), v) for i, v in enumerate(value)]
    if isinstance(value, dict) and value:
        return [(str(k), v) for k, v in value.items()]
    return None


def stage_instances(dvc: dict, root: os.PathLike | str = ".", params: Optional[dict] = None
                    ) -> list[tuple[str, str, dict]]:
    """Expand the stages of a parsed ``dvc.yaml`` into ``(stage, instance, definition)`` triples:
    one per ``foreach`` / ``matrix`` item (``instance`` is ``stage@item`` then, DVC's naming) with
    ``${item}``, ``${key}``, ``${item.<k>}`` and ``${<params key>}`` substituted from ``params.yaml``
    (and ``vars``). What cannot be resolved becomes a ``*`` wildcard (one instance ``stage@*``)."""
    root = Path(root)
    ctx = _context(dvc, root, params)
    out = []
    for name, st in (dvc.get("stages") or {}).items():
        if not isinstance(st, dict):
            continue
        if "foreach" in st:
            body = st.get("do") or {}
            items = _as_items(st["foreach"], ctx)
            if items is None:
                out.append((name, f"{name}@*", _substitute(body, ctx)))
                continue
            for key, item in items:
                local = dict(ctx, item=item, key=key)
                out.append((name, f"{name}@{key}", _substitute(body, local)))
        elif "matrix" in st:
            body = {k: v for k, v in st.items() if k != "matrix"}
            axes = []
            for axis, values in (st["matrix"] or {}).items():
                values = _substitute(values, ctx)
                axes.append([(axis, v) for v in values] if isinstance(values, list) and values else [(axis, "*")])
            for combo in itertools.product(*axes):
                item = dict(combo)
                label = "-".join(str(v) if not isinstance(v, (dict, list)) else k for k, v in combo)
                out.append((name, f"{name}@{label}", _substitute(body, dict(ctx, item=item))))
        else:
            out.append((name, name, _substitute(st, ctx)))
    return out


def _norm(path: str, wdir: str) -> str:
    return os.path.normpath(os.path.join(wdir, path)).replace(os.sep, "/")


def stage_scripts(stage: dict, root: os.PathLike | str = ".") -> list[str]:
    """Repository-relative paths of the Python files a stage's ``cmd`` runs (``python x.py``,
    ``python -m pkg.mod``); a wildcard path is globbed."""
    root = Path(root)
    wdir = stage.get("wdir") or "."
    cmds = stage.get("cmd") or []
    cmds = [cmds] if isinstance(cmds, str) else list(cmds)
    out: list[str] = []
    for cmd in cmds:
        for m in _PY_SCRIPT.finditer(str(cmd)):
            flags, target = m.group(1).split(), m.group(2)
            if flags and flags[-1] == "-m":
                f = _module_file(root / wdir, target)
                candidates = [_norm(str(f.relative_to(root / wdir)), wdir)] if f else []
            elif target.endswith(".py"):
                rel = _norm(target, wdir)
                candidates = (sorted(str(p.relative_to(root)).replace(os.sep, "/") for p in root.glob(rel))
                              if "*" in rel else [rel])
            else:
                continue
            out += [c for c in candidates if c not in out]
    return out


def _dep_paths(stage: dict) -> list[str]:
    wdir = stage.get("wdir") or "."
    out = []
    for d in stage.get("deps") or []:
        if isinstance(d, dict):
            out += [_norm(str(k), wdir) for k in d]
        elif d is not None:
            out.append(_norm(str(d), wdir))
    return out


def covered(file: str, deps: Iterable[str]) -> bool:
    """``file`` equals a dep or lies in a dep directory (``*`` in a dep matches anything)."""
    for d in deps:
        d = _norm(d, ".")
        if d in (".", "") or file == d or file.startswith(d + "/"):
            return True
        if "*" in d and (fnmatch.fnmatchcase(file, d) or fnmatch.fnmatchcase(file, d + "/*")):
            return True
    return False


def missing_deps(stage: dict, root: os.PathLike | str = ".") -> tuple[list[str], list[str]]:
    """``(missing, scripts)``: the repository files of the stage's import closure that no dep covers
    (sorted, repo-relative), and the scripts found in its ``cmd``. A script that does not exist is
    itself reported missing."""
    root = Path(root).resolve()
    scripts = stage_scripts(stage, root)
    deps = _dep_paths(stage)
    closure: set[str] = set()
    for s in scripts:
        closure.add(s)
        if (root / s).is_file():
            closure |= {str(p.relative_to(root)).replace(os.sep, "/") for p in import_closure(root / s, root)}
    return sorted(f for f in closure if not covered(f, deps)), scripts


def check_dvc_yaml(dvc: dict, root: os.PathLike | str = ".", params: Optional[dict] = None
                   ) -> dict[str, list[str]]:
    """Missing code deps of every stage of a parsed ``dvc.yaml``: ``{name: [missing files]}`` for the
    stages that miss any. Items of a ``foreach`` / ``matrix`` stage that miss the same files are reported
    once under the stage name; otherwise per item (``stage@item``)."""
    per_stage: dict[str, list[tuple[str, list[str]]]] = {}
    for stage, instance, body in stage_instances(dvc, root, params):
        missing, _ = missing_deps(body, root)
        per_stage.setdefault(stage, []).append((instance, missing))
    out: dict[str, list[str]] = {}
    for stage, results in per_stage.items():
        distinct = {tuple(m) for _, m in results}
        if len(distinct) == 1:
            if results[0][1]:
                out[stage] = results[0][1]
        else:
            out.update({inst: m for inst, m in results if m})
    return out


def format_report(missing: dict[str, list[str]]) -> str:
    return "\n".join(f"{name}: missing deps {', '.join(files)}" for name, files in missing.items())
