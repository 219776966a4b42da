"""The family runner: job planning, one output layout + manifest, reuse of unchanged jobs, a failing
variant as a row (siblings finish, the stage fails), and the fine-tune phase reusing its first phase."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import BackboneModel, CalibrateConfig, DiffusionConfig, SamplingConfig, UNetArch
from pipeline.io import read_json
from pipeline.runner import read_job_info

ROOT = Path(__file__).resolve().parents[1]


def _toy_module():
    """Register the toy family from tests/fixtures (once per process)."""
    from pipeline import methods

    if "toy" not in methods._REGISTRY:
        spec = importlib.util.spec_from_file_location("toy_family", ROOT / "tests" / "fixtures" / "toy_family.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses resolve annotations through the module
        spec.loader.exec_module(mod)
    return methods._REGISTRY["toy"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny FP UNet and its calibration file on disk, as train_fp / calibrate write them."""
    from pipeline.calibration import collect_calibration, save_calibration
    from pipeline.models import build_backbone, save_backbone

    root = tmp_path_factory.mktemp("runner")
    torch.manual_seed(0)
    fp = build_backbone("unet", BackboneModel(unet=UNetArch(block_out_channels=[8, 16], norm_num_groups=4)),
                        8, 1, 10).eval()
    save_backbone(fp, root / "fp" / "unet")
    calib = collect_calibration(fp, CalibrateConfig(n_samples=4, n_timesteps=2, batch_size=4), DiffusionConfig(),
                                SamplingConfig(steps=3))
    save_calibration(calib, root / "calib" / "unet")
    return root


def _params(root, **toy):
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["quantize"]["n_workers"] = 1  # in this process: the toy family is registered here only
    p["sampling"]["steps"] = 3
    p["model"]["backbones"] = ["unet"]
    p["families"] = ["toy"]
    for fam in ("naive", "fp4dit", "mpq"):
        p.pop(fam)
    p["toy"] = {"variants": ["toy_rtn", "toy_fragile"], "settings": ["W8A8", "W4A8"], "backbones": ["unet"], **toy}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def _runner(root, **toy):
    from pipeline.runner import FamilyRunner

    return FamilyRunner("toy", _params(root, **toy), root / "fp", root / "calib", root / "out")


def test_plan_order_layout_and_manifest(inputs, monkeypatch):
    import mlflow

    _toy_module()
    monkeypatch.chdir(inputs)
    monkeypatch.setenv("TOY_FAIL_ON", "W4A8")
    runner = _runner(inputs)
    assert [j.label for j in runner.jobs] == ["toy/toy_rtn/W8A8@unet#seed0", "toy/toy_fragile/W8A8@unet#seed0",
                                              "toy/toy_rtn/W4A8@unet#seed0", "toy/toy_fragile/W4A8@unet#seed0"]
    failed = runner.run()
    manifest = read_json(inputs / "out" / "manifest.json")
    status = {(m["variant"], m["setting"]): m["status"] for m in manifest["models"]}
    assert status == {("toy_rtn", "W8A8"): "ok", ("toy_fragile", "W8A8"): "ok", ("toy_rtn", "W4A8"): "ok",
                      ("toy_fragile", "W4A8"): "failed"}
    assert [f["variant"] for f in failed] == ["toy_fragile"] and "asked to fail at W4A8" in failed[0]["error"]
    assert (inputs / "out" / "W4A8" / "toy_rtn" / "unet" / "seed0" / "packed.safetensors").exists()
    assert not (inputs / "out" / "W4A8" / "toy_fragile" / "unet" / "seed0" / "info.json").exists()
    # the runner measures every family's peak memory (here the toy family, which measures nothing itself)
    job = inputs / "out" / "W4A8" / "toy_rtn" / "unet" / "seed0"
    info = read_job_info(job)
    assert info["peak_memory_mb"] > 0 and info["peak_memory_kind"] == "cpu_peak_rss"
    assert "peak_memory_mb" not in info["info"]
    # clock readings live in the untracked side file, never in the DVC-hashed info.json
    tracked = read_json(job / "info.json")
    assert not {"peak_memory_mb", "method_seconds", "quantize_seconds"} & set(tracked)
    assert read_json(job / "job.timing.json")["method_seconds"] == info["method_seconds"] > 0
    assert manifest["tables"][0]["settings"] == ["W8A8", "W4A8"]
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.family = 'toy'")
    by_variant = {(r["tags.variant"], r["tags.setting"]): r["status"] for _, r in runs.iterrows()}
    assert by_variant[("toy_fragile", "W4A8")] == "FAILED" and by_variant[("toy_rtn", "W4A8")] == "FINISHED"


def test_rerun_reuses_finished_jobs_and_retries_the_failed_one(inputs, monkeypatch):
    _toy_module()
    monkeypatch.chdir(inputs)
    monkeypatch.setenv("TOY_FAIL_ON", "W4A8")
    assert len(_runner(inputs).run()) == 1
    monkeypatch.delenv("TOY_FAIL_ON")
    assert _runner(inputs).run() == []
    models = read_json(inputs / "out" / "manifest.json")["models"]
    assert not any("reused" in m for m in models)  # a fact of the execution: kept out of the DVC output
    path = {(m["variant"], m["setting"]): m["path"] for m in models}
    reused = set(read_json(inputs / "out" / "reuse.timing.json")["reused"])
    assert reused == {path["toy_rtn", "W8A8"], path["toy_fragile", "W8A8"], path["toy_rtn", "W4A8"]}


def test_packed_models_load_and_error_grows_as_bits_shrink(inputs, monkeypatch):
    from pipeline.evaluation import ModelEntry, load_entry
    from pipeline.models import load_backbone

    _toy_module()
    monkeypatch.chdir(inputs)
    _runner(inputs).run()
    fp = load_backbone(inputs / "fp" / "unet")
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([999, 500, 100, 1]), torch.arange(4)
    with torch.no_grad():
        ref = fp(x, t, y)
        errs = {}
        for s in ("W8A8", "W4A8"):
            e = ModelEntry("unet", "toy", "toy_rtn", s, inputs / "fp" / "unet", inputs / "out" / s / "toy_rtn" / "unet" / "seed0")
            errs[s] = float((load_entry(e, "cpu")(x, t, y) - ref).pow(2).mean() / ref.pow(2).mean())
    assert 0 < errs["W8A8"] < errs["W4A8"]


def test_finetune_phase_reuses_its_first_phase(inputs, monkeypatch):
    from dataclasses import dataclass, field

    from pipeline import methods
    from pipeline.methods import Family, Variant, naive_ptq
    from pipeline.runner import FamilyRunner

    calls = {"quantize": 0, "finetune": 0}

    @dataclass
    class FtOptions:
        calib_batches: int = 1
        tune: dict[str, int] = field(default_factory=lambda: {"steps": 1})

    def quantize(backbone, calib, setting, cfg, ctx):
        calls["quantize"] += 1
        return naive_ptq.quantize(backbone, calib, setting, naive_ptq.NaivePTQConfig(calib_batches=1), ctx)

    def finetune(student, teacher, setting, cfg, ctx):
        calls["finetune"] += 1
        return {"steps": cfg.tune["steps"]}

    if "ftoy" not in methods._REGISTRY:
        methods.register_family(Family(name="ftoy", config_cls=FtOptions, quantize=quantize, finetune=finetune,
                                       finetune_field="tune", variants=(Variant("ftoy", "naive + a no-op tune"),)))
    monkeypatch.chdir(inputs)
    p = yaml.safe_load(_params(inputs).read_text())
    p["families"] = ["ftoy"]
    p.pop("toy")
    p["ftoy"] = {"variants": ["ftoy"], "settings": ["W8A8"], "backbones": ["unet"], "tune": {"steps": 1}}
    path = inputs / "ft.yaml"
    path.write_text(yaml.safe_dump(p))
    out = inputs / "ftout"
    assert FamilyRunner("ftoy", path, inputs / "fp", inputs / "calib", out).run() == []
    assert calls == {"quantize": 1, "finetune": 1}
    assert (out / "W8A8" / "ftoy" / "unet" / "seed0" / "init" / "info.json").exists()
    p["ftoy"]["tune"] = {"steps": 2}
    path.write_text(yaml.safe_dump(p))
    assert FamilyRunner("ftoy", path, inputs / "fp", inputs / "calib", out).run() == []
    assert calls == {"quantize": 1, "finetune": 2}  # only the fine-tune phase re-ran
    info = read_job_info(out / "W8A8" / "ftoy" / "unet" / "seed0")
    assert info["finetune"] == {"steps": 2} and info["method_seconds"] >= info["init_seconds"]
    # peak memory of both phases (the reused first phase's from its init/info.json); the job's is the larger
    assert info["init_peak_memory_mb"] > 0 and info["finetune_peak_memory_mb"] > 0
    assert info["peak_memory_mb"] == max(info["init_peak_memory_mb"], info["finetune_peak_memory_mb"])
    assert read_job_info(out / "W8A8" / "ftoy" / "unet" / "seed0" / "init")["peak_memory_mb"] > 0


def test_peak_memory_on_cuda_is_max_allocated_with_reset(monkeypatch):
    """On a GPU the runner's PeakMemory resets the CUDA peak at entry and reads max_memory_allocated at exit."""
    from pipeline.runner import PeakMemory

    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(("reset", str(d))))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: calls.append(("max", str(d))) or 3 * 2**20)
    with PeakMemory("cuda") as mem:
        calls.append("run")
    assert calls == [("reset", "cuda"), "run", ("max", "cuda")]
    assert mem.peak_mb == 3.0 and mem.kind == "cuda_max_allocated"
    with PeakMemory("cpu") as mem:
        x = torch.zeros(2**22)  # 16 MB
        del x
    assert mem.peak_mb > 0 and mem.kind == "cpu_peak_rss"


def test_method_seeds_plan_and_offset_every_seed_option(inputs):
    from dataclasses import dataclass, field

    from pipeline.runner import seeded_config

    _toy_module()
    runner = _runner(inputs, seeds=[0, 2], seeded_variants=["toy_rtn"])
    assert [(j.variant, j.setting.name, j.seed) for j in runner.jobs] == [
        ("toy_rtn", "W8A8", 0), ("toy_rtn", "W8A8", 2), ("toy_fragile", "W8A8", 0),
        ("toy_rtn", "W4A8", 0), ("toy_rtn", "W4A8", 2), ("toy_fragile", "W4A8", 0)]
    assert runner.jobs[1].rel.as_posix() == "W8A8/toy_rtn/unet/seed2"
    assert runner.keys(runner.jobs[0]) != runner.keys(runner.jobs[1])

    @dataclass
    class Inner:
        seed: int = 5
        lr: float = 0.1

    @dataclass
    class Outer:
        seed: int = 1
        steps: int = 3
        inner: Inner = field(default_factory=Inner)

    c = seeded_config(Outer(), 2)
    assert (c.seed, c.steps, c.inner.seed, c.inner.lr) == (3, 3, 7, 0.1)
    assert seeded_config(Outer(), 0) == Outer()


@pytest.mark.parametrize("bad, msg", [({"seeds": []}, "list at least one seed"),
                                      ({"seeds": [0, -1]}, r"seeds\[1\]: must be a non-negative int"),
                                      ({"seeds": [0, 0]}, "listed twice"),
                                      ({"seeded_variants": ["nope"]}, r"seeded_variants\[0\]: 'nope' is not in")])
def test_bad_seed_matrix_is_a_clear_error(inputs, bad, msg):
    from pipeline.config import ConfigError

    _toy_module()
    with pytest.raises(ConfigError, match=msg):
        _runner(inputs, **bad)


def test_jobs_in_worker_processes_give_the_same_models_as_one_process(inputs, monkeypatch, tmp_path):
    """quantize.n_workers spreads a family's jobs over spawned single-threaded processes; the packed
    models, their manifest entries and the MLflow runs are those of the in-process run."""
    import mlflow

    from pipeline.runner import FamilyRunner

    monkeypatch.chdir(inputs)
    outs = {}
    for n in (1, 2):
        p = yaml.safe_load((ROOT / "params.yaml").read_text())
        p["quantize"]["n_workers"] = n
        p["sampling"]["steps"] = 3
        p["model"]["backbones"] = ["unet"]
        p["families"] = ["naive"]
        for fam in ("fp4dit", "mpq", "dilatequant", "tmpq", "peers", "qdiff"):
            p.pop(fam)
        p["naive"].update(settings=["W8A8", "W4A4"], backbones=["unet"], seeds=[0, 1], calib_batches=1)
        path = tmp_path / f"params{n}.yaml"
        path.write_text(yaml.safe_dump(p))
        runner = FamilyRunner("naive", path, inputs / "fp", inputs / "calib", tmp_path / f"out{n}")
        assert runner.n_workers == n and runner.run() == []
        outs[n] = tmp_path / f"out{n}"
    m1, m2 = (read_json(outs[n] / "manifest.json")["models"] for n in (1, 2))
    assert [(m["setting"], m["seed"], m["status"]) for m in m1] == [(m["setting"], m["seed"], m["status"]) for m in m2]
    assert len(m1) == 4
    from safetensors import safe_open

    for m in m1:  # every tensor and the metadata (the header's metadata order is the writer's hash-map order)
        f1, f2 = (safe_open(str(outs[n] / m["path"] / "packed.safetensors"), "pt") for n in (1, 2))
        assert f1.metadata() == f2.metadata() and sorted(f1.keys()) == sorted(f2.keys())
        assert all(torch.equal(f1.get_tensor(k), f2.get_tensor(k)) for k in f1.keys()), m["path"]
        assert (outs[1] / m["path"] / "quant_spec.json").read_bytes() == (outs[2] / m["path"] / "quant_spec.json").read_bytes()
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.family = 'naive'", output_format="list")
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs)


class _Broken:
    def __init__(self, why):
        raise ValueError(why)


def test_a_worker_that_cannot_start_raises_instead_of_hanging():
    from pipeline.parallel import WorkerPool

    with pytest.raises(RuntimeError, match="could not start: ValueError: no model here"):
        with WorkerPool(2, _Broken, ("no model here",)) as pool:
            pool.map("anything", [(), ()])
    with pytest.raises(ValueError, match="n_workers: must be >= 1"):
        WorkerPool(0, _Broken, ())
