#!/usr/bin/env python
"""quantize: one item of a quantization matrix. Quantizes every backbone listed in the section's
``backbones`` (that the method supports) on the shared calibration file, and stores each result as
real packed low-bit weights plus its quantization spec and an info.json.

``--section`` names the params section holding the matrix (``quantize``, the method x setting
matrix, by default). Without ``--method`` the item runs every method of the section at its bit
setting (method families whose DVC matrix is over settings only, so ablation variants share one
process instead of paying ~10 s of imports each); outputs then go to ``<out>/<method>/<backbone>``."""
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

    names = [args.method] if args.method else list(cfg.methods)
    jobs = []  # (method, options, backbones, output folder)
    for name in names:
        method, method_cfg = resolve_matrix(cfg, args.section, name)
        backbones = [b for b in cfg.backbones if b in method.backbones]
        if not backbones:
            raise ConfigError(f"{args.section}.backbones: method {method.name!r} supports "
                              f"{list(method.backbones)}, none of which is listed ({cfg.backbones})")
        jobs.append((method, method_cfg, backbones, name if not args.method else ""))
    for b in sorted({b for job in jobs for b in job[2]}):
        require(f"{args.fp}/{b}", f"FP {b} model (stage train_fp@{b})")
        require(f"{args.calib}/{b}", f"calibration set for {b} (stage calibrate@{b})")

    import logging
    import time

    import torch

    from pipeline import models
    from pipeline.calibration import load_calibration
    from pipeline.io import atomic_dir, write_json
    from pipeline.quant.packing import save_quantized
    from pipeline.tracking import stage_run

    log = logging.getLogger("pipeline")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    calib_sets = {}
    with atomic_dir(args.out) as tmp:
        for method, method_cfg, backbones, sub in jobs:
            name = f"{args.section}@{method.name}-{setting.name}"
            for b in backbones:
                out_dir = tmp / sub / b if sub else tmp / b
                params = {"method": method.name, "setting": setting.name, "backbone": b,
                          "config": to_dict(method_cfg), "variant": method.variant}
                tags = {"backbone": b, "method": method.name, "setting": setting.name, "section": args.section,
                        "wbits": setting.wbits, "abits": setting.abits}
                with stage_run(args.section, params=params, experiment=trk.experiment, uri=trk.uri,
                               run_name=f"{name}@{b}", tags=tags, inputs=[f"{args.fp}/{b}", f"{args.calib}/{b}"],
                               log_file=log_path(f"{name}@{b}")) as run_:
                    t0 = time.time()
                    backbone = models.load_backbone(f"{args.fp}/{b}", device=device)
                    if b not in calib_sets:
                        calib_sets[b] = load_calibration(f"{args.calib}/{b}")
                    calib = calib_sets[b]
                    ctx = MethodContext(device=device, run=run_, diffusion=diff_cfg, sampling=samp_cfg,
                                        backbone_name=b, variant=method.variant, workdir=out_dir)
                    log.info("%s@%s: %s", name, b, method.description)
                    result = method.fn(backbone, calib, setting, method_cfg, ctx)
                    seconds = time.time() - t0
                    meta = {"method": method.name, "setting": setting.name, "backbone": b,
                            "wbits": setting.wbits, "abits": setting.abits, "quantize_seconds": seconds,
                            "calibration": calib.manifest.get("sha256"), "info": result.info}
                    save_quantized(result.backbone.net, result.spec, out_dir, extra_meta=meta)
                    write_json(out_dir / "info.json", meta)
                    run_.log_metrics({"quantize_seconds": seconds, **{k: v for k, v in result.info.items()
                                                                       if isinstance(v, (int, float))}})
                    run_.log_artifact(out_dir / "quant_spec.json")
                    log.info("%s@%s: done in %.1f s", name, b, seconds)


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--section", default="quantize")
    p.add_argument("--method", default=None, help="one method of the section (default: all of them)")
    p.add_argument("--setting", required=True)
    p.add_argument("--fp", default="data/fp")
    p.add_argument("--calib", default="data/calib")
    p.add_argument("--out", required=True)
    main(run, p)
