#!/usr/bin/env python
"""evaluate: score the FP models and every model the method families' manifests list, under one
protocol (same initial noise and labels, same sampler, same evaluators and reference set): FID,
conditional accuracy, CLIP score, HPSv2 (when configured), BitOPs, model bytes, seconds per image, and a
sample grid per model. Unchanged models are served from a content-addressed cache."""
from _common import main, parser, require


def run(args):
    from pipeline.config import DiffusionConfig, EvalConfig, ModelConfig, SamplingConfig, TrackingConfig, load_section

    cfg = load_section("eval", EvalConfig, args.params)
    diff_cfg = load_section("diffusion", DiffusionConfig, args.params)
    samp_cfg = load_section("sampling", SamplingConfig, args.params)
    model_cfg = load_section("model", ModelConfig, args.params)
    trk = load_section("tracking", TrackingConfig, args.params)
    require(args.data, "prepared dataset (stage prepare)")
    require(args.evaluators, "evaluators (stage train_evaluators)")
    for key in ("fid.inception_weights", "clip.model_dir", "hps.checkpoint"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name):
            require(getattr(getattr(cfg, section), name), f"eval.{key}")

    from pathlib import Path

    from pipeline.evaluation import discover_entries, evaluate_all
    from pipeline.validation import validate_params

    families = validate_params(args.params)["families"]

    entries, failed, tables = discover_entries(families, model_cfg.backbones, Path(args.fp), Path(args.quantized))
    for e in entries:
        require(e.quant_dir or e.fp_dir, f"model {e.label}")
    evaluate_all(cfg, diff_cfg, samp_cfg, trk, entries, failed, tables, Path(args.data), Path(args.evaluators),
                 Path(args.out))


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--data", default="data/dataset")
    p.add_argument("--fp", default="data/fp")
    p.add_argument("--evaluators", default="data/evaluators")
    p.add_argument("--quantized", default="data/quantized")
    p.add_argument("--out", default="data/eval")
    main(run, p)
