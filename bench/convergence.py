#!/usr/bin/env python
"""Convergence of the two training budgets of the default run, measured on the embedded models:

(a) MPQ-DMv2 QAT (``mpq.qat.epochs``; updates = epochs x sampling.steps) at W2A4 and W4A4 on the UNet,
(b) FP4DiT block-wise AdaRound (``fp4dit.recon.iters``) at W4A6 on the DiT.

Each budget is a separate run (the LR decay of QAT and the beta schedule of AdaRound depend on the total,
so the end of a short run is not a point of a long run's curve). Metric: held-out eps-MSE of the quantized
model against the FP model on fixed trajectories (:func:`pipeline.train.qat.distillation_error`, seed
10 000, disjoint from the QAT training seeds and the calibration seed). The largest budget also runs with
the in-training curve on (``qat.curve_every`` / ``recon.curve_every``), logged to MLflow under ``--uri``.

Flattening rule: the chosen budget is the smallest whose held-out metric is within 2 % of the best
budget's. Uses data/fp/<backbone> and data/calib/<backbone> when present (``make repro``), otherwise
trains them here (params.yaml settings, or ``--train-steps``) into ``--cache``.

    OMP_NUM_THREADS=1 python bench/convergence.py --part qat --budgets 1 2 4 8 16
    OMP_NUM_THREADS=1 python bench/convergence.py --part recon --budgets 40 80 160 320 640
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fp_and_calib(backbone: str, data_root: Path, cache: Path, train_steps):
    from pipeline import data, models
    from pipeline.calibration import collect_calibration, load_calibration, save_calibration
    from pipeline.config import (CalibrateConfig, DiffusionConfig, ModelConfig, PrepareConfig, SamplingConfig,
                                 TrainFPConfig, load_section)

    params = ROOT / "params.yaml"
    for root in (data_root, cache):
        if (root / "fp" / backbone).exists() and (root / "calib" / backbone).exists():
            return models.load_backbone(root / "fp" / backbone), load_calibration(root / "calib" / backbone)
    from pipeline.train.fp import train_backbone

    pcfg = load_section("prepare", PrepareConfig, params)
    x, y, names = data.load_images(pcfg)
    x, y, _, _ = data.split_reference(x, y, pcfg.reference_fraction, pcfg.seed)
    bb_cfg = getattr(load_section("model", ModelConfig, params), backbone)
    run = getattr(load_section("train_fp", TrainFPConfig, params), backbone)
    if train_steps:
        run.steps = train_steps
    diff = load_section("diffusion", DiffusionConfig, params)
    fp = models.build_backbone(backbone, bb_cfg, pcfg.image_size, pcfg.channels, len(names), seed=run.seed)
    fp = train_backbone(fp, x, y, diff, run, progress=False)
    calib = collect_calibration(fp, load_section("calibrate", CalibrateConfig, params), diff,
                                load_section("sampling", SamplingConfig, params))
    models.save_backbone(fp, cache / "fp" / backbone)
    save_calibration(calib, cache / "calib" / backbone)
    return fp, calib


def flatten_point(rows):
    best = min(r["heldout"] for r in rows)
    return next(r["budget"] for r in rows if r["heldout"] <= 1.02 * best)


def main() -> None:
    import mlflow
    import torch
    from lightning.pytorch.loggers import MLFlowLogger

    from pipeline.config import DiffusionConfig, SamplingConfig, MATRIX_KEYS, from_dict, load_section, parse_setting, read_params
    from pipeline.methods import MethodContext, get_family
    from pipeline.train.qat import distillation_error

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["qat", "recon"], required=True)
    ap.add_argument("--budgets", type=int, nargs="+", required=True, help="QAT epochs or AdaRound iters")
    ap.add_argument("--settings", nargs="+", default=None)
    ap.add_argument("--data-root", type=Path, default=ROOT / "data")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/conv_cache"))
    ap.add_argument("--train-steps", type=int, default=None, help="FP training steps when no model is found")
    ap.add_argument("--uri", default="sqlite:////tmp/conv_mlflow.db")
    ap.add_argument("--heldout", type=int, default=16, help="held-out trajectories")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    params = read_params(ROOT / "params.yaml")
    diff = load_section("diffusion", DiffusionConfig, ROOT / "params.yaml")
    samp = load_section("sampling", SamplingConfig, ROOT / "params.yaml")
    mlflow.set_tracking_uri(args.uri)
    mlflow.set_experiment("convergence")
    backbone = "unet" if args.part == "qat" else "dit"
    fam = get_family("mpq" if args.part == "qat" else "fp4dit")
    cfg = from_dict(fam.config_cls, {k: v for k, v in params[fam.name].items() if k not in MATRIX_KEYS}, fam.name)
    cfg = fam.config_for("mpqdm2" if args.part == "qat" else "fp4dit", cfg)
    settings = args.settings or (["W2A4", "W4A4"] if args.part == "qat" else ["W4A6"])
    fp, calib = fp_and_calib(backbone, args.data_root, args.cache, args.train_steps)
    fp.eval()
    results = {}
    for s in settings:
        setting = parse_setting(s)
        rows = []
        init = None
        if args.part == "qat":
            init = copy.deepcopy(fp)
            torch.manual_seed(0)
            fam.quantize(init, calib, setting, cfg, MethodContext(backbone_name=backbone))
        for i, b in enumerate(args.budgets):
            last = i == len(args.budgets) - 1
            with mlflow.start_run(run_name=f"{args.part}/{s}/{b}") as run:
                ctx = MethodContext(diffusion=diff, sampling=samp, backbone_name=backbone)
                t0 = time.time()
                if args.part == "qat":
                    from pipeline.train.qat import run_qat

                    qcfg = copy.deepcopy(cfg.qat)
                    qcfg.epochs, qcfg.curve_every, qcfg.curve_samples = b, (samp.steps if last else 0), args.heldout
                    student = copy.deepcopy(init)
                    logger = MLFlowLogger(run_id=run.info.run_id, tracking_uri=args.uri)
                    summ = run_qat(student, fp, diff, samp, qcfg, relation=cfg.relation,
                                   logger=logger, progress=False)
                    curve = summ.get("curve")
                else:
                    rcfg = copy.deepcopy(cfg)
                    rcfg.recon.iters = b
                    rcfg.recon.curve_every = max(1, b // 8) if last else 0
                    student = copy.deepcopy(fp)
                    ctx.run = type("R", (), {"run_id": run.info.run_id, "uri": args.uri})()
                    res = fam.quantize(student, calib, setting, rcfg, ctx)
                    student = res.backbone if hasattr(res, "backbone") else student
                    curve = None
                sec = time.time() - t0
                held = distillation_error(student, fp, diff, samp, n=args.heldout)
                mlflow.log_metrics({"heldout_eps_mse": held, "seconds": sec, "budget": b})
            rows.append({"budget": b, "heldout": held, "seconds": sec, "curve": curve})
            print(f"{args.part} {s} budget {b:6d}: held-out eps-MSE {held:.5f}  {sec:7.1f} s", flush=True)
        results[s] = {"rows": rows, "flattens_at": flatten_point(rows)}
    unit = "epochs (x %d updates)" % samp.steps if args.part == "qat" else "iters"
    print(f"\n{args.part}: budget ({unit}) -> held-out eps-MSE vs FP ({args.heldout} trajectories), wall s")
    for s, r in results.items():
        print(f"  {s}: " + "  ".join(f"{x['budget']}: {x['heldout']:.5f} ({x['seconds']:.0f} s)" for x in r["rows"])
              + f"   -> flattens at {r['flattens_at']} (first within 2 % of the best)")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
