#!/usr/bin/env python
"""Cost and sanity of the Q-Diffusion family (pipeline/methods/qdiff.py) on the default-size UNet of
params.yaml (freshly initialised weights: no `dvc repro` needed; a sanity check, not a result): per row the
quantize time and the relative L2 error of eps vs FP on 128 held-out trajectory inputs (calibration set drawn
with another seed), next to naive round-to-nearest at the same bits.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/qdiff_cost.py [--settings W4A8,W8A8] [--variants qdiff,...]
        [--recon-iters N] [--act-iters N] [--act-lr LR] [--backbone unet]
"""
import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from pipeline import models
    from pipeline.calibration import collect_calibration
    from pipeline.config import CalibrateConfig, DiffusionConfig, ModelConfig, SamplingConfig, load_section, parse_setting
    from pipeline.methods import MethodContext, get_family
    from pipeline.methods.naive_ptq import NaivePTQConfig
    from pipeline.methods.qdiff import QDiffConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default="W4A8,W8A8")
    ap.add_argument("--variants", default="qdiff,qdiff_no_split,brecq_w")
    ap.add_argument("--recon-iters", type=int, default=None)
    ap.add_argument("--act-iters", type=int, default=None)
    ap.add_argument("--act-lr", type=float, default=None)
    ap.add_argument("--backbone", default="unet")
    args = ap.parse_args()
    params = ROOT / "params.yaml"
    mc = load_section("model", ModelConfig, params)
    diff, samp = load_section("diffusion", DiffusionConfig, params), load_section("sampling", SamplingConfig, params)
    calib_cfg = load_section("calibrate", CalibrateConfig, params)
    kind = args.backbone
    fp = models.build_backbone(kind, getattr(mc, kind), 8, 1, 10, seed=0).eval()
    t0 = time.time()
    calib = collect_calibration(fp, calib_cfg, diff, samp)
    held = collect_calibration(fp, dataclasses.replace(calib_cfg, seed=calib_cfg.seed + 100, n_samples=16), diff, samp)
    print(f"{kind}: {calib.x.shape[0]} calibration inputs ({time.time() - t0:.1f} s)", flush=True)
    x, t, y = held.x[:128], held.t[:128], held.labels[:128]
    with torch.no_grad():
        ref = fp(x, t, y)

    def rel(bb):
        with torch.no_grad():
            return float((bb(x, t, y) - ref).norm() / ref.norm())

    qcfg = QDiffConfig()
    if args.recon_iters is not None:
        qcfg.recon = dataclasses.replace(qcfg.recon, iters=args.recon_iters)
    if args.act_iters is not None:
        qcfg.act_recon = dataclasses.replace(qcfg.act_recon, iters=args.act_iters)
    if args.act_lr is not None:
        qcfg.act_recon = dataclasses.replace(qcfg.act_recon, act_quant_lr=args.act_lr)
    naive, qdiff = get_family("naive"), get_family("qdiff")
    total = 0.0
    for s in args.settings.split(","):
        setting = parse_setting(s)
        res = naive.quantize(copy.deepcopy(fp), calib, setting, NaivePTQConfig(), MethodContext())
        print(f"{kind} {s:5s} naive          rel_err {rel(res.backbone):.4f}", flush=True)
        for v in args.variants.split(","):
            t0 = time.time()
            res = qdiff.quantize(copy.deepcopy(fp), calib, setting, qdiff.config_for(v, qcfg), MethodContext())
            sec = time.time() - t0
            total += sec
            i = res.info
            print(f"{kind} {s:5s} {v:14s} rel_err {rel(res.backbone):.4f}  quantize {sec:5.1f} s  "
                  f"(recon {i['recon_seconds']:.1f} s, act {i.get('act_recon_seconds', 0.0):.1f} s; unit error "
                  f"{i['recon_error_rtn']:.4g} -> {i['recon_error']:.4g})", flush=True)
    print(f"total quantize {total:.1f} s (recon.iters {qcfg.recon.iters}, act_recon.iters {qcfg.act_recon.iters})")


if __name__ == "__main__":
    main()
