"""Static code-dependency check of ``dvc.yaml``: does every stage list the code it runs as deps?

For each stage (``foreach`` / ``matrix`` items included) the stage script(s) named in its ``cmd``
(``python stages/<name>.py ...`` or ``python -m pkg.mod``) are parsed with :mod:`ast` -- never imported,
so this needs neither torch nor any other third-party package -- and their import closure inside the
repository is computed (:func:`pipeline.codedeps.import_closure`, the engine the cache keys use too).
Every file of that closure must be covered by a dep of the stage: a dep equal to the file, or a dep that is
a directory above it. Used by ``tests/test_dvc_deps.py``.

Standard library + PyYAML only (``pipeline.codedeps`` imports nothing else).
"""
from __future__ import annotations

import fnmatch
import itertools
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional

__all__ = ["import_closure", "stage_instances", "stage_scripts", "missing_deps", "check_dvc_yaml",
           "format_report"]

from pipeline.codedeps import _module_file, import_closure  # noqa: E402  (import_closure re-exported)


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
