#!/usr/bin/env python
"""mpq_init: the calibration-based half of MPQ-DM / MPQ-DMv2 for one method x bit-setting item: pre-scale,
kurtosis-ranked mixed precision (OMQ search, or the binary residual), timestep-indexed activation
quantizers, LoRA (zero or SVD init). Writes an un-merged student checkpoint per backbone that the ``qat``
stage rebuilds exactly (so changing a QAT parameter never redoes this stage). Without ``--method`` the
item runs every method of the section at its setting (outputs in ``<out>/<method>/<backbone>``)."""
from _common import log_path, main, parser, require


def run(args):
    from pipeline.config import (ConfigError, DiffusionConfig, SamplingConfig, TrackingConfig, load_matrix,
                                 load_section, parse_setting, to_dict)

    cfg = load_matrix(args.section, args.params)
    diff_cfg = load_section("diffusion", DiffusionConfig, args.params)
    samp_cfg = load_section("sampling", SamplingConfig, args.params)
    trk = load_section("tracking", TrackingConfig, args.params)
    setting = parse_setting(args.setting, "--setting")

    from pipeline.methods import MethodContext, resolve_matrix

    from pipeline.methods import mpqdm

    jobs = []
    for m_name in ([args.method] if args.method else list(cfg.methods)):
        method, method_cfg = resolve_matrix(cfg, args.section, m_name)
        if method.fn is not mpqdm.quantize:
            raise ConfigError(f"--method: {method.name!r} is not an MPQ-DM family method "
                              f"({', '.join(mpqdm.VARIANTS)}); use stage quantize for it")
        backbones = [b for b in cfg.backbones if b in method.backbones]
        if not backbones:
            raise ConfigError(f"{args.section}.backbones: method {method.name!r} supports "
                              f"{list(method.backbones)}, none of which is listed ({cfg.backbones})")
        jobs.append((method, method_cfg, backbones, "" if args.method else method.name))
    for b in sorted({b for job in jobs for b in job[2]}):
        require(f"{args.fp}/{b}", f"FP {b} model (stage train_fp@{b})")
        require(f"{args.calib}/{b}", f"calibration set for {b} (stage calibrate@{b})")

    import logging
    import time

    import torch

    from pipeline import models
    from pipeline.calibration import load_calibration
    from pipeline.io import atomic_dir, write_json
    from pipeline.tracking import stage_run

    log = logging.getLogger("pipeline")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    calib_sets = {}
    with atomic_dir(args.out) as tmp:
        for method, method_cfg, backbones, sub in jobs:
            name = f"mpq_init@{method.name}-{setting.name}"
            for b in backbones:
                out_dir = tmp / sub / b if sub else tmp / b
                params = {"method": method.name, "setting": setting.name, "backbone": b,
                          "config": to_dict(method_cfg), "variant": method.variant}
                tags = {"backbone": b, "method": method.name, "setting": setting.name, "section": args.section,
                        "wbits": setting.wbits, "abits": setting.abits}
                with stage_run("mpq_init", params=params, experiment=trk.experiment, uri=trk.uri,
                               run_name=f"{name}@{b}", tags=tags, inputs=[f"{args.fp}/{b}", f"{args.calib}/{b}"],
                               log_file=log_path(f"{name}@{b}")) as run_:
                    t0 = time.time()
                    torch.manual_seed(method_cfg.seed)  # LoRA A's Kaiming init
                    backbone = models.load_backbone(f"{args.fp}/{b}", device=device)
                    if b not in calib_sets:
                        calib_sets[b] = load_calibration(f"{args.calib}/{b}")
                    calib = calib_sets[b]
                    ctx = MethodContext(device=device, run=run_, diffusion=diff_cfg, sampling=samp_cfg,
                                        backbone_name=b, variant=method.variant, workdir=out_dir,
                                        extra={"keep_lora": True})
                    log.info("%s@%s: %s", name, b, method.description)
                    result = method.fn(backbone, calib, setting, method_cfg, ctx)
                    seconds = time.time() - t0
                    meta = {"method": method.name, "setting": setting.name, "backbone": b,
                            "wbits": setting.wbits, "abits": setting.abits, "variant": method.variant,
                            "init_seconds": seconds, "calibration": calib.manifest.get("sha256"),
                            "info": result.info}
                    mpqdm.save_student(result.backbone.net, result.spec, out_dir, meta)
                    write_json(out_dir / "info.json", meta)
                    run_.log_metrics({"init_seconds": seconds, **{k: v for k, v in result.info.items()
                                                                  if isinstance(v, (int, float))}})
                    run_.log_artifact(out_dir / mpqdm.STRUCTURE_FILE)
                    log.info("%s@%s: done in %.1f s (avg weight bits %.3f, salient fraction %.3f)", name, b, seconds,
                             result.info["avg_weight_bits"], result.info["mean_salient_fraction"])


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--section", default="mpq")
    p.add_argument("--method", default=None, help="one method of the section (default: all of them)")
    p.add_argument("--setting", required=True)
    p.add_argument("--fp", default="data/fp")
    p.add_argument("--calib", default="data/calib")
    p.add_argument("--out", required=True)
    main(run, p)
