#!/usr/bin/env python
"""evaluate: score the FP models and every quantized model under one protocol (same initial noise
and labels, same sampler, same evaluators and reference set): FID, conditional accuracy, CLIP score,
HPSv2 (when configured), BitOPs, model bytes, seconds per image, and a sample grid per model."""
from _common import log_path, main, parser, require

# params section of each quantizing stage -> where its models are (see dvc.yaml)
LAYOUTS = {"quantize": "data/quantized/{method}/{setting}/{backbone}",
           "fp4dit": "data/fp4dit/{setting}/{method}/{backbone}",
           "mpq": "data/qat/{setting}/{method}/{backbone}"}


def run(args):
    from pipeline.config import (DiffusionConfig, EvalConfig, ModelConfig, SamplingConfig,
                                 TrackingConfig, load_matrix, load_section, read_params,
                                 to_dict)

    cfg = load_section("eval", EvalConfig, args.params)
    diff_cfg = load_section("diffusion", DiffusionConfig, args.params)
    samp_cfg = load_section("sampling", SamplingConfig, args.params)
    load_section("model", ModelConfig, args.params)
    for section in LAYOUTS:
        load_matrix(section, args.params)
    trk = load_section("tracking", TrackingConfig, args.params)
    for path, what in [(args.data, "prepared dataset (stage prepare)"),
                       (args.evaluators, "evaluators (stage train_evaluators)")]:
        require(path, what)
    if cfg.fid.inception_weights:
        require(cfg.fid.inception_weights, "eval.fid.inception_weights")
    if cfg.clip.model_dir:
        require(cfg.clip.model_dir, "eval.clip.model_dir")
    if cfg.hps.checkpoint:
        require(cfg.hps.checkpoint, "eval.hps.checkpoint")

    import logging
    import shutil
    from pathlib import Path

    import torch

    from pipeline.evaluation import Evaluator, code_hash, entry_key, planned_entries, save_grid
    from pipeline.io import atomic_dir, read_json, tree_hash, write_json
    from pipeline.tracking import stage_run

    log = logging.getLogger("pipeline")
    params = read_params(args.params)
    entries = planned_entries(params, Path(args.fp), LAYOUTS)
    for e in entries:
        require(e.fp_dir, f"FP model {e.backbone}")
        if e.quant_dir is not None:
            require(e.quant_dir, f"quantized model {e.label}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    context = {"eval": to_dict(cfg), "sampling": to_dict(samp_cfg), "diffusion": to_dict(diff_cfg),
               "evaluators": tree_hash(args.evaluators), "data": tree_hash(args.data),
               "code": code_hash(Path(__file__).resolve().parents[1])}
    out = Path(args.out)
    old_cache = out / "cache"
    stage_params = {"eval": to_dict(cfg), "sampling": to_dict(samp_cfg), "n_models": len(entries)}
    with stage_run("evaluate", params=stage_params, experiment=trk.experiment, uri=trk.uri,
                   inputs=[args.data, args.evaluators], log_file=log_path("evaluate")) as run_:
        import mlflow

        evaluator = None
        rows = []
        with atomic_dir(out) as tmp:
            (tmp / "cache").mkdir()
            (tmp / "grids").mkdir()
            for i, e in enumerate(entries, 1):
                key = entry_key(e, context)
                cached = old_cache / f"{key}.json"
                if cached.exists() and (old_cache / f"{key}.png").exists():
                    row = read_json(cached)
                    shutil.copy(cached, tmp / "cache" / cached.name)
                    shutil.copy(old_cache / f"{key}.png", tmp / "cache" / f"{key}.png")
                    log.info("[%d/%d] %s: cached (FID %.3f, acc %.3f)", i, len(entries), e.label,
                             row["fid"], row["accuracy"])
                else:
                    if evaluator is None:
                        evaluator = Evaluator(cfg, diff_cfg, samp_cfg, Path(args.data), Path(args.evaluators), device)
                    row, images = evaluator.evaluate(e)
                    row["key"] = key
                    grid = images[: cfg.grid_size * cfg.grid_size]
                    save_grid(grid, tmp / "cache" / f"{key}.png", nrow=cfg.grid_size)
                    write_json(tmp / "cache" / f"{key}.json", row)
                    with mlflow.start_run(run_name=f"evaluate@{e.label}", nested=True,
                                          tags={"stage": "evaluate", "backbone": e.backbone, "method": e.method,
                                                "setting": e.setting, "eval_key": key}):
                        mlflow.log_params({"backbone": e.backbone, "method": e.method, "setting": e.setting,
                                           "n_samples": cfg.n_samples})
                        mlflow.log_metrics({k: float(v) for k, v in row.items()
                                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
                        mlflow.log_artifact(str(tmp / "cache" / f"{key}.png"), "samples")
                    log.info("[%d/%d] %s: FID %.3f, accuracy %.3f, CLIP %.2f, %.4f s/image", i, len(entries),
                             e.label, row["fid"], row["accuracy"], row["clip_score"], row["sec_per_image"])
                shutil.copy(tmp / "cache" / f"{key}.png", tmp / "grids" / f"{e.slug}.png")
                rows.append(row)
            write_json(tmp / "results.json", {"rows": rows})
        run_.log_artifact(out / "results.json")


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--data", default="data/dataset")
    p.add_argument("--fp", default="data/fp")
    p.add_argument("--evaluators", default="data/evaluators")
    p.add_argument("--out", default="data/eval")
    main(run, p)
