"""dvc.yaml lists the code each stage runs: every repository file in the import closure of a stage's
script (parsed statically, see tests/depgraph.py) is a dep of the stage or lies in a dep directory.
Otherwise editing that file would not re-run the stage and `dvc repro` would keep stale outputs.

Nothing here hard-codes stage names: the stages, their scripts and deps are read from dvc.yaml."""
from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from depgraph import (check_dvc_yaml, covered, format_report, import_closure, stage_instances,
                               stage_scripts)

ROOT = Path(__file__).resolve().parents[1]


def _load_dvc() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def _rel(paths, root: Path) -> set[str]:
    return {p.relative_to(root.resolve()).as_posix() for p in paths}


# ------------------------------------------------------------------------------------------------
# the real dvc.yaml


def test_every_stage_lists_its_code_deps():
    dvc = _load_dvc()
    instances = stage_instances(dvc, ROOT)
    assert instances, "dvc.yaml has no stages"
    assert any(stage_scripts(body, ROOT) for _, _, body in instances), "no `python <script>.py` in any cmd"
    missing = check_dvc_yaml(dvc, ROOT)
    assert not missing, ("stages whose deps miss code they import (add the file, or a directory "
                         "containing it, to the stage's deps):\n" + format_report(missing))


def _raw_deps(stage: dict) -> list:
    body = stage.get("do", stage) if "foreach" in stage else stage
    return body.setdefault("deps", [])


def test_checker_reports_a_removed_dep():
    """Remove one covering dep from one real stage, in memory: the checker must name what it covered."""
    dvc = _load_dvc()
    for name, stage in (dvc.get("stages") or {}).items():
        if not isinstance(stage, dict):
            continue
        only = {k: v for k, v in dvc.items() if k != "stages"}
        only["stages"] = {name: stage}
        before = check_dvc_yaml(only, ROOT)
        for i, dep in enumerate(list(_raw_deps(stage))):
            mutated = copy.deepcopy(only)
            del _raw_deps(mutated["stages"][name])[i]
            after = check_dvc_yaml(mutated, ROOT)
            new = {inst: sorted(set(files) - set(before.get(inst, []))) for inst, files in after.items()}
            new = {inst: files for inst, files in new.items() if files}
            if not new:
                continue  # that dep covers no code (data, params) or another dep covers the same files
            inst, files = next(iter(new.items()))
            assert inst == name or inst.startswith(f"{name}@")
            dep_path = dep if isinstance(dep, str) else next(iter(dep))
            assert all(f == dep_path or f.startswith(dep_path.rstrip("/") + "/") or "${" in dep_path
                       for f in files), (dep_path, files)
            report = format_report(after)
            assert f"{inst}: missing deps " in report and all(f in report for f in files)
            return
    pytest.fail("no stage of dvc.yaml has a dep covering code from its import closure")


# ------------------------------------------------------------------------------------------------
# the closure on a synthetic repository


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))


SYNTHETIC = {
    "stages/run.py": """
        import os, json                       # stdlib: ignored
        from _helper import setup             # sibling of the script (sys.path[0])
        import numpy                          # third party, not in the repository: ignored

        def run():
            from pkg import a                 # function-level import; `a` is a submodule
            import pkg.sub.deep as deep       # every package on the way executes
    """,
    "stages/_helper.py": "from pkg.cfg import Config\n",
    "stages/unused.py": "",
    "pkg/__init__.py": "",
    "pkg/cfg.py": "Config = dict\n",
    "pkg/a.py": """
        from . import b                      # relative: `b` is a submodule of pkg
        from .sub import c                   # pkg/sub/__init__.py and pkg/sub/c.py
        from .cfg import Config              # a name, not a submodule
    """,
    "pkg/b.py": "",
    "pkg/sub/__init__.py": "",
    "pkg/sub/c.py": """
        def f():
            from ..d import x                # two levels up, inside a function
            return x
    """,
    "pkg/sub/deep.py": "",
    "pkg/d.py": "x = 1\n",
    "pkg/never.py": "",
    "pkg/sub/never2.py": "",
    # auto-registration: using any module of `reg` loads every module of it at run time
    "stages/uses_reg.py": "from reg.m1 import thing\n",
    "reg/__init__.py": """
        import importlib, pkgutil

        def load_all():
            for info in pkgutil.iter_modules(__path__):
                importlib.import_module(f"{__name__}.{info.name}")
    """,
    "reg/m1.py": "from . import load_all\nthing = 1\n",
    "reg/m2.py": "from ..pkg import d\n",
    "reg/subreg/__init__.py": "",
    # lazy exports (PEP 562): only reading a name of the package imports its modules
    "stages/uses_lazy_sub.py": "from lazy.one import f\n",
    "stages/uses_lazy_name.py": "from lazy import F\n",
    "lazy/__init__.py": """
        import importlib
        _EXPORTS = {"F": "one", "G": "two"}

        def __getattr__(name):
            return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    """,
    "lazy/one.py": "def f(): pass\nF = f\n",
    "lazy/two.py": "G = 2\n",
}


@pytest.fixture()
def repo(tmp_path):
    _write(tmp_path, SYNTHETIC)
    return tmp_path


def test_closure_relative_function_level_and_submodule_imports(repo):
    got = _rel(import_closure(repo / "stages/run.py", repo), repo)
    assert got == {"stages/run.py", "stages/_helper.py", "pkg/__init__.py", "pkg/cfg.py", "pkg/a.py", "pkg/b.py",
                   "pkg/sub/__init__.py", "pkg/sub/c.py", "pkg/sub/deep.py", "pkg/d.py"}


def test_closure_package_discovery_depends_on_every_module(repo):
    got = _rel(import_closure(repo / "stages/uses_reg.py", repo), repo)
    assert got == {"stages/uses_reg.py", "reg/__init__.py", "reg/m1.py", "reg/m2.py", "reg/subreg/__init__.py",
                   "pkg/__init__.py", "pkg/d.py"}


def test_closure_lazy_exports(repo):
    sub = _rel(import_closure(repo / "stages/uses_lazy_sub.py", repo), repo)
    assert sub == {"stages/uses_lazy_sub.py", "lazy/__init__.py", "lazy/one.py"}
    name = _rel(import_closure(repo / "stages/uses_lazy_name.py", repo), repo)
    assert name == {"stages/uses_lazy_name.py", "lazy/__init__.py", "lazy/one.py", "lazy/two.py"}


def test_closure_survives_a_file_with_a_syntax_error(repo):
    (repo / "pkg/b.py").write_text("def broken(:\n")
    assert "pkg/b.py" in _rel(import_closure(repo / "stages/run.py", repo), repo)


def test_templated_stages_and_coverage(repo):
    params = {"names": ["x", "y"], "sec": {"settings": ["W4A8", "W8A8"]}}
    dvc = {"stages": {
        "plain": {"cmd": "python stages/run.py --out o", "deps": ["stages/run.py", "stages/_helper.py", "pkg"]},
        "each": {"foreach": "${names}", "do": {"cmd": "python3 stages/uses_${item}.py", "deps": ["data/${item}"]}},
        "grid": {"matrix": {"s": "${sec.settings}", "b": ["u"]},
                 "cmd": ["echo ${item.s}", "python -u stages/uses_reg.py --s ${item.s} --b ${item.b}"],
                 "deps": ["stages/uses_reg.py", {"reg": {"hash": "md5"}}, "pkg/d.py", "pkg/__init__.py"]},
        "unknown": {"foreach": "${nope}", "do": {"cmd": "python stages/uses_lazy_*.py", "deps": ["stages", "lazy"]}},
    }}
    inst = {i: body for _, i, body in stage_instances(dvc, repo, params)}
    assert set(inst) == {"plain", "each@x", "each@y", "grid@W4A8-u", "grid@W8A8-u", "unknown@*"}
    assert stage_scripts(inst["each@x"], repo) == ["stages/uses_x.py"]
    assert stage_scripts(inst["grid@W8A8-u"], repo) == ["stages/uses_reg.py"]
    assert stage_scripts(inst["unknown@*"], repo) == ["stages/uses_lazy_name.py", "stages/uses_lazy_sub.py"]
    missing = check_dvc_yaml(dvc, repo, params)
    # a cmd script that does not exist is reported as missing, per item since the items differ
    assert missing == {"each@x": ["stages/uses_x.py"], "each@y": ["stages/uses_y.py"]}
    assert format_report({"s": ["a.py", "b.py"]}) == "s: missing deps a.py, b.py"
    assert covered("pipeline/quant/act.py", ["pipeline/quant"]) and covered("a/b.py", ["./a/"])
    assert not covered("pipeline/quantize.py", ["pipeline/quant"])


def test_checker_imports_no_heavy_package():
    code = "import sys; sys.path.insert(0, 'tests'); import depgraph; sys.exit('torch' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=30)
