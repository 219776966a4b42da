"""Cache keys follow the code a job can run (pipeline.codedeps): adding a family module or editing the report
reruns no quantization job, evaluation or search; a change in the quantization core reruns them all.

The keys are computed by the pipeline's own functions (``FamilyRunner.keys`` for every job of the default
families, ``evaluation_context``, ``study_key``) in one fresh process on a copy of the package, edited between
readings."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = r'''
import json, sys
from pathlib import Path

import pipeline
from pipeline.config import DiffusionConfig, EvalConfig, SamplingConfig, SearchConfig, load_section, read_params
from pipeline.evaluation import evaluation_context
from pipeline.io import data_hash
from pipeline.runner import FamilyRunner
from pipeline.search import study_key

copy, params, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
assert Path(pipeline.__file__).resolve().is_relative_to(copy.resolve()), pipeline.__file__
diffusion = load_section("diffusion", DiffusionConfig, params)
sampling = load_section("sampling", SamplingConfig, params)


def keys():
    out = {}
    for fam in read_params(params)["families"]:
        runner = FamilyRunner(fam, params, work / "fp", work / "calib", work / "out" / fam)
        for job in runner.jobs:
            out["job " + job.label] = runner.keys(job)
    ctx = evaluation_context(load_section("eval", EvalConfig, params), diffusion, sampling, work / "dataset",
                             work / "evaluators")
    out["evaluation"] = data_hash(ctx)
    out["search"] = study_key("unet", load_section("search", SearchConfig, params), diffusion, sampling,
                              work / "fp" / "unet", work / "calib" / "unet")
    return out


readings = {}
for line in sys.stdin:  # one edit per line: "<name> <file> <mode> <text>"; the script keys before and after it
    name, rel, mode, text = line.rstrip("\n").split("\t")
    if name == "base":
        readings[name] = keys()
        continue
    target = copy / "pipeline" / rel
    if mode == "create":
        target.write_text(text.replace("\\n", "\n"))
    else:
        target.write_text(target.read_text() + text.replace("\\n", "\n"))
    readings[name] = keys()
print("KEYS " + json.dumps(readings))
'''

_TOY = ('"""A toy family added after the fact: naive PTQ under another name."""\\n'
        "from . import Family, Variant, register_family\\n"
        "from .naive_ptq import NaivePTQConfig, quantize\\n\\n"
        'register_family(Family(name="toy", config_cls=NaivePTQConfig, quantize=quantize,\\n'
        '                       variants=(Variant("toy", "naive PTQ again"),)))\\n')


@pytest.fixture(scope="module")
def readings(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("codekeys")
    copy = tmp / "src"
    shutil.copytree(ROOT / "pipeline", copy / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp / "work"
    for b in ("unet", "dit", "pixart"):
        for d in ("fp", "calib"):
            (work / d / b).mkdir(parents=True)
            (work / d / b / "weights.bin").write_bytes(b"\x00" + b.encode())
    (work / "dataset").mkdir()
    (work / "evaluators").mkdir()
    (work / "data" / "search" / "unet").mkdir(parents=True)
    (work / "data" / "search" / "unet" / "front.json").write_text("{}")
    edits = [("base", "-", "-", "-"),
             ("toy_family", "methods/toy.py", "create", _TOY),
             ("report_comment", "report.py", "append", "\\n# a comment on the report\\n"),
             ("report_code", "report.py", "append", "\\n\\ndef _unused_helper():\\n    return 1\\n"),
             ("primitives", "quant/primitives.py", "append", "\\n# a comment in the quantization core\\n")]
    stdin = "".join("\t".join(e) + "\n" for e in edits)
    env = {"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin", "HOME": str(tmp)}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(copy), str(ROOT / "params.yaml"), str(work)],
                          input=stdin, capture_output=True, text=True, cwd=work, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("KEYS "))
    return json.loads(line[5:])


def test_every_default_job_evaluation_and_search_is_keyed(readings):
    base = readings["base"]
    jobs = [k for k in base if k.startswith("job ")]
    assert len(jobs) >= 150, len(jobs)  # the default matrix: ~199 jobs over the seven families
    assert {k.split()[1].split("/")[0] for k in jobs} == {"naive", "fp4dit", "mpq", "dilatequant", "tmpq", "peers",
                                                         "qdiff"}
    assert "evaluation" in base and "search" in base


@pytest.mark.parametrize("edit", ["toy_family", "report_comment", "report_code"])
def test_unrelated_code_leaves_every_key_unchanged(readings, edit):
    changed = [k for k, v in readings[edit].items() if readings["base"].get(k) != v]
    assert changed == [], f"{edit} changed {len(changed)} keys, e.g. {changed[:3]}"


def test_a_change_in_the_quantization_core_changes_every_key(readings):
    base, after = readings["report_code"], readings["primitives"]
    same = [k for k in base if after[k] == base[k]]
    assert same == [], f"quant/primitives.py edit left {len(same)} keys unchanged, e.g. {same[:3]}"


def test_code_files_follow_imports_not_the_registry():
    from pipeline.codedeps import PACKAGE_DIR, code_files

    names = {str(p.relative_to(PACKAGE_DIR)).replace("\\", "/") for p in code_files(PACKAGE_DIR / "methods" / "naive_ptq.py")}
    assert {"__init__.py", "methods/__init__.py", "methods/naive_ptq.py", "quant/primitives.py"} <= names
    # the registry discovers every family at run time; naive PTQ's key must not depend on them
    assert not names & {"methods/mpqdm.py", "methods/tmpq.py", "report.py", "evaluation.py", "search.py"}


def test_code_files_refuse_what_is_not_a_python_file(tmp_path):
    from pipeline.codedeps import code_key

    (tmp_path / "notes.txt").write_text("x")
    for bad in (tmp_path / "missing.py", tmp_path / "notes.txt"):
        with pytest.raises(ValueError, match="not a Python source file"):
            code_key(bad)
    with pytest.raises(ValueError, match="at least one"):
        code_key()
