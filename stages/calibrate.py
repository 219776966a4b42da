#!/usr/bin/env python
"""calibrate: run the FP sampler and record the model inputs (x_t, t, labels) along the trajectories
at the selected steps (uniform over the steps, Q-Diffusion style, or random), streamed to disk as they are
sampled. Every method reads the same file."""
from _common import log_path, main, parser, require


def run(args):
    from pipeline.config import (BACKBONES, CalibrateConfig, ConfigError, DiffusionConfig, SamplingConfig,
                                 TrackingConfig, load_section, to_dict)

    if args.backbone not in BACKBONES:
        raise ConfigError(f"--backbone: unknown backbone {args.backbone!r} (allowed values: {', '.join(BACKBONES)})")
    cfg = load_section("calibrate", CalibrateConfig, args.params)
    diff_cfg = load_section("diffusion", DiffusionConfig, args.params)
    samp_cfg = load_section("sampling", SamplingConfig, args.params)
    trk = load_section("tracking", TrackingConfig, args.params)
    if cfg.n_timesteps > samp_cfg.steps:
        raise ConfigError(f"calibrate.n_timesteps: {cfg.n_timesteps} is more than sampling.steps ({samp_cfg.steps})")
    require(args.fp, f"FP {args.backbone} model (stage train_fp@{args.backbone})")

    import logging
    import time

    import torch

    from pipeline import models
    from pipeline.calibration import collect_calibration
    from pipeline.io import atomic_dir
    from pipeline.tracking import stage_run

    log = logging.getLogger("pipeline")
    params = {"calibrate": to_dict(cfg), "sampling": to_dict(samp_cfg), "diffusion": to_dict(diff_cfg)}
    name = f"calibrate@{args.backbone}"
    with stage_run("calibrate", params=params, experiment=trk.experiment, uri=trk.uri, run_name=name,
                   tags={"backbone": args.backbone}, inputs=[args.fp], log_file=log_path(name)) as run_:
        t0 = time.time()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        backbone = models.load_backbone(args.fp, device=device)
        with atomic_dir(args.out) as tmp:  # streamed to disk as it is sampled (memory: one batch)
            manifest = collect_calibration(backbone, cfg, diff_cfg, samp_cfg, out_dir=tmp).manifest
        run_.log_metrics({"n_inputs": manifest["n_inputs"], "calibrate_seconds": time.time() - t0})
        log.info("%s: %d inputs (%d samples x %d steps) in %.1f s", name, manifest["n_inputs"],
                 cfg.n_samples, len(manifest["selected_steps"]), time.time() - t0)


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--backbone", required=True)
    p.add_argument("--fp", required=True)
    p.add_argument("--out", required=True)
    main(run, p)
