#!/usr/bin/env python
"""train_fp: train one class-conditional FP backbone with Lightning (or take a local diffusers pipeline or
model directory when ``model.<backbone>.source`` is set: its text encoder runs once per line of
``model.<backbone>.prompts`` here) and save it with diffusers' save_pretrained."""
from _common import log_path, main, parser, require


def run(args):
    from pipeline.config import (BACKBONES, ConfigError, DiffusionConfig, ModelConfig, TrackingConfig,
                                 TrainFPConfig, load_section, to_dict)

    if args.backbone not in BACKBONES:
        raise ConfigError(f"--backbone: unknown backbone {args.backbone!r} (allowed values: {', '.join(BACKBONES)})")
    model_cfg = load_section("model", ModelConfig, args.params)
    train_cfg = load_section("train_fp", TrainFPConfig, args.params)
    diff_cfg = load_section("diffusion", DiffusionConfig, args.params)
    trk = load_section("tracking", TrackingConfig, args.params)
    bb_cfg = getattr(model_cfg, args.backbone)
    run_cfg = getattr(train_cfg, args.backbone)
    require(args.data, "prepared dataset (stage prepare)")
    if bb_cfg.source:
        require(bb_cfg.source, f"model.{args.backbone}.source")
        from pipeline.hub import check_pipeline_dir, is_pipeline_dir

        if is_pipeline_dir(bb_cfg.source):  # the pieces, before any weights are read
            check_pipeline_dir(bb_cfg.source, bb_cfg.prompts, bb_cfg.guidance_scale, prefix=f"model.{args.backbone}")

    import logging
    import time

    from pipeline import data, models
    from pipeline.io import atomic_dir
    from pipeline.tracking import stage_run, tracking_uri

    log = logging.getLogger("pipeline")
    params = {"model": to_dict(bb_cfg), "train_fp": to_dict(run_cfg), "diffusion": to_dict(diff_cfg)}
    name = f"train_fp@{args.backbone}"
    with stage_run("train_fp", params=params, experiment=trk.experiment, uri=trk.uri, run_name=name,
                   tags={"backbone": args.backbone, "method": "fp", "setting": "FP32"},
                   inputs=[args.data], log_file=log_path(name)) as run_:
        t0 = time.time()
        if bb_cfg.source:
            from pipeline.hub import load_source

            log.info("%s: using the local checkpoint %s (no training)", name, bb_cfg.source)
            backbone = load_source(bb_cfg.source, bb_cfg.prompts, bb_cfg.guidance_scale, prefix=f"model.{args.backbone}")
        else:
            from lightning.pytorch.loggers import MLFlowLogger

            from pipeline.train.fp import train_backbone

            meta = data.load_meta(args.data)
            x, y = data.load_split(args.data, "train")
            backbone = models.build_backbone(args.backbone, bb_cfg, meta["image_size"], meta["channels"],
                                             len(meta["class_names"]), seed=run_cfg.seed)
            n_params = sum(p.numel() for p in backbone.parameters())
            log.info("%s: %d parameters, %d steps at batch %d", name, n_params, run_cfg.steps, run_cfg.batch_size)
            run_.log_metrics({"n_params": n_params})
            logger = MLFlowLogger(run_id=run_.run_id, tracking_uri=tracking_uri(trk.uri))
            backbone = train_backbone(backbone, x, y, diff_cfg, run_cfg, logger=logger)
            backbone.set_guidance(bb_cfg.guidance_scale)
        with atomic_dir(args.out) as tmp:
            models.save_backbone(backbone, tmp)
        run_.log_metrics({"train_seconds": time.time() - t0})
        log.info("%s: done in %.0f s", name, time.time() - t0)


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--backbone", required=True)
    p.add_argument("--data", default="data/dataset")
    p.add_argument("--out", required=True)
    main(run, p)
