"""End to end: the real `dvc repro` in a temporary copy of the repository on a miniature params file,
then the summary table, the MLflow runs, a no-op second repro and a bit-setting sweep."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def miniature(params: dict) -> dict:
    p = json.loads(json.dumps(params))
    p["sampling"]["steps"] = 5
    p["model"]["unet"]["unet"] = {"block_out_channels": [16, 32], "layers_per_block": 1,
                                  "attention_levels": [False, True], "norm_num_groups": 8}
    p["model"]["dit"]["dit"] = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "patch_size": 2}
    p["model"]["pixart"]["pixart"] = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16,
                                      "patch_size": 2, "caption_channels": 16, "caption_length": 2}
    for b in ("unet", "dit", "pixart"):
        p["train_fp"][b].update(steps=30, batch_size=32, warmup_steps=5)
    p["train_evaluators"].update(classifier_steps=60, clip_steps=40, batch_size=64)
    p["calibrate"].update(n_samples=16, n_timesteps=3, batch_size=16)
    p["naive"].update(settings=["W8A8", "W4A4"], calib_batches=1, seeds=[0, 1])  # two method seeds per row
    p["fp4dit"].update(variants=["fp4dit", "int-asym_tok_ada"], settings=["W4A8"], seeds=[0], seeded_variants=None)
    p["fp4dit"]["recon"].update(iters=3, batch_size=8)
    p["mpq"].update(variants=["mpqdm", "mpqdm2"], settings=["W3A4"], seeds=[0], seeded_variants=None, lora_rank=2, calib_inputs=16,
                    act_calib_batches=1, act_mse_samples=256, omq_fractions=[0.0, 0.1])
    p["mpq"]["qat"].update(epochs=1, batch_size=4, check_samples=0)
    p["dilatequant"].update(variants=["dilatequant", "full_qat"], settings=["W4A8"], seeds=[0], seeded_variants=None,
                            calib_batches=1, act_mse_samples=256)
    p["dilatequant"]["bkd"].update(iters=2, batch_size=8, error_inputs=16)
    p["peers"].update(settings=["W8A8"])
    # a new family added the documented way: its module (copied below), its section, one list entry
    p["families"].append("toy")
    p["toy"] = {"variants": ["toy_rtn"], "settings": ["W4A8"], "backbones": ["unet"], "keep_first_last_bits": 8}
    p["search"].update(w_bits=[4, 8], a_bits=[4, 8], n_groups=3, budget_bits=8, population_size=4, n_trials=6,
                       batch_size=2, calib_batches=1)
    p["search"]["proxy"].update(n_samples=8, holdout_samples=16)
    p["tmpq"].update(settings=["W4A4"], seeds=[0])
    p["qdiff"].update(variants=["qdiff"], settings=["W4A8"], seeds=[0], seeded_variants=None, calib_batches=1,
                      act_mse_samples=256)
    p["qdiff"]["recon"].update(iters=2, batch_size=8)
    p["qdiff"]["act_recon"].update(iters=1, batch_size=8, error_inputs=16)
    p["eval"].update(n_samples=40, batch_size=40, grid_size=4, floor_real_splits=2)
    p["report"].update(bootstrap=50)
    # exported and run in ONNX Runtime: a W8A8 UNet, the best FP4DiT DiT row (FP weights: the float fallback),
    # a W4A4 UNet (4-bit activation codes in uint8)
    p["export"].update(rows=["unet/naive/naive/W8A8", "dit/fp4dit/best/W4A8", "unet/naive/naive/W4A4"],
                       batches=[1, 2], repeats=2, calib_inputs=8)
    return p


def _run(cmd, cwd, env, timeout=900):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def copy_checkout(dst: Path) -> None:
    """The working tree's tracked and untracked-not-ignored files, without reports/ and dvc.lock: what a
    fresh clone holds before its first run."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file() and not f.startswith(("reports/", "dvc.lock")):
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def make_repo(dst: Path, workers: int = 2):
    """A fresh clone in ``dst``: the working tree (no reports/, no dvc.lock), the toy family, the miniature
    params (``workers`` processes for the quantize jobs, the search and the evaluation), git + dvc initialised. Returns the
    environment to run dvc in."""
    copy_checkout(dst)
    shutil.copy2(ROOT / "tests" / "fixtures" / "toy_family.py", dst / "pipeline" / "methods" / "toy_family.py")
    params = miniature(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["eval"]["n_workers"] = params["search"]["n_workers"] = params["quantize"]["n_workers"] = workers
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.invalid")
    env.pop("MLFLOW_TRACKING_URI", None)
    _run(["git", "init", "-q"], dst, env)
    if not (dst / ".dvc").exists():
        _run(["dvc", "init", "-q"], dst, env)
    _run(["git", "add", "-A"], dst, env)
    _run(["git", "commit", "-qm", "e2e"], dst, env)
    return env


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    dst = tmp_path_factory.mktemp("e2e") / "repo"
    env = make_repo(dst)
    r = _run(["dvc", "repro"], dst, env)
    # the first run's outputs, before later tests change params
    return dst, env, r, (dst / "reports" / "summary.json").read_bytes()


def test_repro_writes_summary_for_every_model(repo):
    dst, *_ = repo
    summary = json.loads((dst / "reports" / "summary.json").read_text())
    for b in ("unet", "dit"):
        for m in ("fp/fp/FP32", "naive/naive/W8A8", "naive/naive/W4A4"):
            row = summary[f"{b}/{m}"]
            assert row["fid"] >= 0 and 0 <= row["accuracy"] <= 1 and row["bitops_g"] > 0
        extra = (["fp4dit/fp4dit/W4A8", "fp4dit/int-asym_tok_ada/W4A8"] if b == "dit"
                 else ["mpq/mpqdm/W3A4", "mpq/mpqdm2/W3A4", "toy/toy_rtn/W4A8"])
        extra += ["dilatequant/dilatequant/W4A8", "dilatequant/full_qat/W4A8", "peers/quanto/W8A8",
                  "peers/torchao/W8A8"]
        if b == "unet":  # TMPQ-DM: the searched configuration (3 of 5 steps) and the uniform reference; Q-Diffusion
            extra += ["tmpq/tmpq/W4A4", "tmpq/uniform/W4A4", "qdiff/qdiff/W4A8"]
        for m in extra:
            row = summary[f"{b}/{m}"]
            assert row["fid"] >= 0 and 0 <= row["accuracy"] <= 1 and row["bitops_g"] > 0
        # fewer bits, fewer BitOPs and smaller files
        assert summary[f"{b}/naive/naive/W4A4"]["bitops_g"] < summary[f"{b}/naive/naive/W8A8"]["bitops_g"] < \
            summary[f"{b}/fp/fp/FP32"]["bitops_g"]
        assert summary[f"{b}/naive/naive/W4A4"]["model_mb"] < summary[f"{b}/fp/fp/FP32"]["model_mb"]
        # two method seeds: the row is their mean, with a bootstrap interval around it
        w4 = summary[f"{b}/naive/naive/W4A4"]
        assert w4["n_seeds"] == 2 and w4["fid_lo"] <= w4["fid"] <= w4["fid_hi"] and "psnr" in w4
        assert f"noise_floor/{b}/fp_other_noise" in summary
        # the peer tools' coverage: quanto converts Linear and Conv2d, torchao Linear only
        assert summary[f"{b}/peers/quanto/W8A8"]["coverage"] == 1.0
        assert 0 < summary[f"{b}/peers/torchao/W8A8"]["coverage"] < 1
    assert "noise_floor/real_vs_real" in summary
    # the text-conditioned backbone: FP, the naive baseline and the FP4DiT pair, each scored with CLIP too
    for m in ("fp/fp/FP32", "naive/naive/W4A4", "fp4dit/fp4dit/W4A8", "fp4dit/int-asym_tok_ada/W4A8"):
        row = summary[f"pixart/{m}"]
        assert row["fid"] >= 0 and 0 <= row["accuracy"] <= 1 and row["bitops_g"] > 0 and "clip_score" in row
    assert "unet/fp4dit/fp4dit/W4A8" not in summary and "pixart/mpq/mpqdm/W3A4" not in summary
    claims = json.loads((dst / "reports" / "claims.json").read_text())["claims"]
    assert any(c.get("metrics", {}).get("fid", {}).get("verdict") for c in claims)
    md = (dst / "reports" / "results.md").read_text()
    assert "### unet" in md and "### Toy vs naive" in md and "### FP4DiT cross, online per-token" in md
    assert "### FP4DiT cross, online per-token activations (PixArt, text-conditioned)" in md
    assert any(c["backbone"] == "pixart" and c.get("metrics") for c in claims)
    assert "## Paper claims" in md and "## Noise floor" in md
    search = summary["search/unet"]
    assert search["n_trials"] == 6 and search["front_size"] >= 1 and search["comparisons"]
    assert summary["unet/tmpq/tmpq/W4A4"]["bitops_g"] <= summary["unet/tmpq/uniform/W4A4"]["bitops_g"] * (1 + 1e-9)
    assert "## TMPQ-DM search" in md
    for f in ("fid_vs_wbits.png", "fid_vs_bitops.png", "claims.png", "samples_unet.png", "samples_dit.png",
              "samples_pixart.png", "search_unet.png"):
        assert (dst / "reports" / "plots" / f).stat().st_size > 0
    assert (dst / "data" / "quantized" / "naive" / "W4A4" / "naive" / "unet" / "seed0" / "packed.safetensors").exists()
    manifest = json.loads((dst / "data" / "quantized" / "toy" / "manifest.json").read_text())
    assert [m["status"] for m in manifest["models"]] == ["ok"]


def test_a_second_clean_run_reproduces_summary_exactly(repo, tmp_path):
    """Same params and seeds, a new clone from scratch: summary.json byte for byte (timings live in
    timings.json, the one output allowed to differ) — with one process where the first run used two for
    the quantize jobs, the search and the evaluation (the results do not depend on the worker count)."""
    *_, first = repo
    dst = tmp_path / "repo"
    env = make_repo(dst, workers=1)
    _run(["dvc", "repro"], dst, env)
    second = (dst / "reports" / "summary.json").read_bytes()
    if second != first:
        a, b = json.loads(first), json.loads(second)
        diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
        pytest.fail(f"summary.json differs between two clean runs: {diff}")
    rows = {k for k in json.loads(first) if not k.startswith(("claims/", "noise_floor/", "search/", "deploy/"))}
    timed = {k.split("#")[0] for k in json.loads((dst / "reports" / "timings.json").read_text())}
    assert timed == rows
    # dvc.lock: every output and every dependency hashes the same bytes in both clean runs. The only
    # difference allowed is the one this test makes on purpose: the n_workers params (and the validate
    # stamps of their sections, which record them)
    a, b = (_lock_hashes(d / "dvc.lock") for d in (repo[0], dst))
    assert a.keys() == b.keys()
    differ = sorted(k for k in a if a[k] != b[k])
    assert differ == [k for k in differ if k[1] in _WORKER_STAMPS or k[1] == "params"], differ


_WORKER_STAMPS = ("data/params", "data/params/quantize.json", "data/params/search.json", "data/params/eval.json")


def _lock_hashes(lock: Path) -> dict:
    """(stage, path) -> md5 of every dep and out in a dvc.lock, and (stage, "params") -> its params."""
    out = {}
    for stage, d in yaml.safe_load(lock.read_text())["stages"].items():
        for kind in ("deps", "outs"):
            for e in d.get(kind, []):
                out[(stage, e["path"])] = e.get("md5")
        out[(stage, "params")] = json.dumps(d.get("params", {}), sort_keys=True)
    return out


def test_export_stage_runs_the_rows_in_onnxruntime(repo):
    """The export rows: integer kernels for W8A8, the best FP4DiT variant picked from the results, images of the
    deployed model against the fake-quant images the table scored, the report's table, column and plot."""
    dst, *_ = repo
    rows = json.loads((dst / "data" / "export" / "rows.json").read_text())["rows"]
    assert [r["row"] for r in rows] == ["unet/naive/naive/W8A8", "dit/fp4dit/best/W4A8", "unet/naive/naive/W4A4"]
    summary = json.loads((dst / "reports" / "summary.json").read_text())
    best = min(("fp4dit", "int-asym_tok_ada"), key=lambda v: summary[f"dit/fp4dit/{v}/W4A8"]["fid"])
    assert rows[1]["model"] == f"dit/fp4dit/{best}/W4A8#seed0"
    w8 = rows[0]
    assert w8["executes"] == {"int8": 1.0} and w8["bytes"]["deployed"] < w8["bytes"]["ort_fp32"]
    f = w8["fidelity"]
    assert f["images"] == 40 and f["psnr_mean_db"] >= 40 and f["psnr_min_db"] >= 30, f
    assert abs(f["deployed"]["fid"] - summary["unet/naive/naive/W8A8"]["fid"]) < 0.05 * f["deployed"]["fid"]
    assert summary["deploy/unet/naive/naive/W8A8"]["executes_int8"] == 1.0
    md = (dst / "reports" / "results.md").read_text()
    assert "## Running for real: exported to ONNX Runtime" in md and "| int8 100 % |" in md
    timing = json.loads((dst / "reports" / "deploy_timings.json").read_text())
    assert set(timing) == {r["row"] for r in rows}
    assert all(t["call_seconds"]["2"]["deployed"] > 0 and t["peak_rss_mib"]["deployed"] > 0 for t in timing.values())
    assert (dst / "reports" / "plots" / "deploy_speed.timing.png").stat().st_size > 0


def test_every_stage_is_an_mlflow_run(repo):
    import mlflow

    dst, *_ = repo
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{dst}/mlflow.db")
    exp = client.get_experiment_by_name("diffusion-quant")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    stages = {r.data.tags.get("stage") for r in runs}
    assert stages >= {"prepare", "train_fp", "train_evaluators", "calibrate", "quantize", "evaluate", "export",
                      "report"}
    q = [r for r in runs if r.data.tags.get("stage") == "quantize" and r.data.tags.get("family") == "naive"]
    assert len(q) == 12 and all({"backbone", "family", "variant", "setting", "git_commit", "params_hash"}
                               <= set(r.data.tags) for r in q)
    assert all(r.info.status == "FINISHED" for r in runs)
    train = [r for r in runs if r.data.tags.get("stage") == "train_fp"]
    assert any(k.startswith("train_loss") for r in train for k in r.data.metrics)  # Lightning logged into the run
    from pipeline import cpu_numerics

    pinned = ",".join(f"{k}={v}" for k, v in cpu_numerics().items())
    assert all(r.data.tags.get("cpu_numerics") == pinned for r in train)  # the kernels every stage ran with
    mpq = [r for r in runs if r.data.tags.get("stage") == "quantize" and r.data.tags.get("family") == "mpq"]
    assert len(mpq) == 2 and all(r.data.metrics.get("finetune_seconds", 0) > 0 for r in mpq)


def test_second_repro_is_a_noop(repo):
    dst, env, *_ = repo
    r = _run(["dvc", "repro"], dst, env)
    assert "Running stage" not in r.stdout


def test_sweep_with_exp_run_reruns_only_what_changed(repo):
    dst, env, *_ = repo
    _run(["git", "add", "-A"], dst, env)
    _run(["git", "commit", "-qm", "lock"], dst, env)
    # an export row whose setting the sweep drops is refused before any compute, naming the key
    bad = subprocess.run(["dvc", "exp", "run", "-S", "naive.settings=[W8A8,W2A8]"], cwd=dst, env=env,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "export.rows[2]: 'unet/naive/naive/W4A4': setting 'W4A4' is not in naive.settings" \
        in bad.stdout + bad.stderr
    assert "Running stage 'quantize" not in bad.stdout
    r = _run(["dvc", "exp", "run", "-S", "naive.settings=[W8A8,W2A8]",
              "-S", "export.rows=[unet/naive/naive/W8A8,dit/fp4dit/best/W4A8]"], dst, env)
    ran = {line.split("'")[1] for line in r.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"validate", "quantize@naive", "evaluate", "export", "report"}, r.stdout
    # the export rows are cached by content: both were exported by the first run
    assert r.stdout.count("cached (") >= 2 or "cached (" in (dst / "data" / "logs" / "export.log").read_text()
    summary = json.loads((dst / "reports" / "summary.json").read_text())
    assert "unet/naive/naive/W2A8" in summary and "unet/naive/naive/W4A4" not in summary
    shown = _run(["dvc", "exp", "show", "--no-pager", "--md"], dst, env).stdout
    assert "W2A8" in shown or "fid" in shown


def test_bad_value_fails_repro_before_any_compute(tmp_path):
    """On a fresh clone, a bad value in any section stops `dvc repro` at the validate stage."""
    dst = tmp_path / "repo"
    copy_checkout(dst)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["naive"]["settings"] = ["W8A8", "W99A8"]
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    r = subprocess.run(["dvc", "repro"], cwd=dst, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "naive.settings[1]: unsupported bit setting 'W99A8'" in r.stdout + r.stderr
    assert not (dst / "data" / "dataset").exists() and not (dst / "data" / "fp").exists()


# -------------------------------------------------------------------------------------------------------------
# real-model sources: tiny random-weight diffusers pipelines of the five kinds (pipeline/tiny_pipelines.py, saved
# with save_pretrained) in the backbone slots, each through validate -> train_fp (load) -> calibrate -> quantize
# (naive + a family) -> evaluate -> report, on a prepared dataset of 3x16x16 images (what the pipelines decode to)
# -------------------------------------------------------------------------------------------------------------
SOURCE_RUNS = {
    "text_and_class": {"unet": "sd", "dit": "dit", "pixart": "pixart"},
    "latent_vq": {"unet": "ldm"},
    "pixel": {"unet": "ddpm"},
}
GUIDED = {"sd": 7.5, "dit": 4.0, "pixart": 4.5}
FAMILY_FOR = {"sd": "mpq", "dit": "fp4dit", "pixart": "fp4dit", "ldm": "dilatequant", "ddpm": "qdiff"}


def _image_folder(root: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, c in enumerate(("red", "blue")):
        (root / c).mkdir(parents=True)
        for i in range(24):
            a = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            a[..., 2 * k] = 255
            Image.fromarray(a).save(root / c / f"{i}.png")


def source_params(params: dict, slots: dict) -> dict:
    p = miniature(params)
    p["model"]["backbones"] = list(slots)
    for slot, kind in slots.items():
        p["model"][slot].update(source=f"models/{kind}", guidance_scale=GUIDED.get(kind, 1.0),
                                prompts="models/prompts.txt" if kind in ("sd", "pixart") else None)
    p["prepare"].update(source="images", image_size=16, channels=3)
    p["sampling"].update(scheduler="own", steps=4)
    fams = sorted({FAMILY_FOR[k] for k in slots.values()})
    p["families"] = ["naive", *fams]
    p["naive"].update(settings=["W8A8"], seeds=[0], backbones=list(slots))
    for f in fams:
        p[f]["backbones"] = [s for s, k in slots.items() if FAMILY_FOR[k] == f]
        p[f]["settings"] = ["W4A8"]
    p["mpq"].update(variants=["mpqdm2"])
    p["fp4dit"].update(variants=["fp4dit"])
    p["dilatequant"].update(variants=["dilatequant_no_tpq"])
    p["search"]["backbones"] = [next(iter(slots))]  # skipped: tmpq is not listed
    p["eval"].update(n_samples=16, batch_size=16, grid_size=2)
    p["export"]["rows"] = [f"{slot}/naive/naive/W8A8" for slot in slots]  # each kind runs in ONNX Runtime
    return p


@pytest.mark.parametrize("run", sorted(SOURCE_RUNS))
def test_pipeline_directories_go_through_every_stage(run, tmp_path):
    from pipeline import tiny_pipelines

    slots = SOURCE_RUNS[run]
    dst = tmp_path / "repo"
    env = make_repo(dst, workers=1)
    for kind in slots.values():
        tiny_pipelines.save(kind, dst / "models" / kind)
    tiny_pipelines.write_prompts(dst / "models" / "prompts.txt")
    _image_folder(dst / "images")
    params = source_params(yaml.safe_load((dst / "params.yaml").read_text()), slots)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["dvc", "repro"], dst, env)
    summary = json.loads((dst / "reports" / "summary.json").read_text())
    for slot, kind in slots.items():
        fp = summary[f"{slot}/fp/fp/FP32"]
        naive = summary[f"{slot}/naive/naive/W8A8"]
        fam = FAMILY_FOR[kind]
        variant = params[fam]["variants"][0]
        row = summary[f"{slot}/{fam}/{variant}/W4A8"]
        # (FP4DiT keeps the embeddings and the final layer in FP, which dominate a tiny model's BitOPs)
        assert fp["fid"] >= 0 and naive["psnr"] > 20 and max(row["bitops_g"], naive["bitops_g"]) < fp["bitops_g"]
        assert "accuracy" not in naive  # labels are prompts, 1000 DiT classes or none: not the dataset's classes
        assert ("clip_score" in naive) == (kind in ("sd", "pixart"))
        assert (dst / "reports" / "plots" / f"samples_{slot}.png").stat().st_size > 0
        meta = json.loads((dst / "data" / "fp" / slot / "backbone.json").read_text())
        assert meta["class_name"] == {"sd": "UNet2DConditionModel", "dit": "DiTTransformer2DModel",
                                      "pixart": "PixArtTransformer2DModel"}.get(kind, "UNet2DModel")
        assert ("autoencoder" in meta) == (kind != "ddpm")
    assert (dst / "data" / "search" / next(iter(slots)) / "skipped.json").exists()
