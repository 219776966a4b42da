#!/usr/bin/env python
"""export: quantized models that run for real. Every export.rows entry (backbone/family/variant/setting, method
seed 0; variant 'best' = the family's best there) is exported to an ONNX graph from the packed model's own
integer codes, scales and zero points and run in ONNX Runtime's integer kernels; its images from the evaluation
noise are compared with the fake-quant images the table scored (PSNR, FID), and its speed and peak memory are
measured against PyTorch float32 and the same graph in float32 (pipeline/deploy/stage.py)."""
from _common import main, parser, require


def run(args):
    from pipeline.config import (DiffusionConfig, EvalConfig, ExportConfig, ModelConfig, ReportConfig, SamplingConfig,
                                 TrackingConfig, load_section)
    from pipeline.validation import validate_params

    families = validate_params(args.params)["families"]  # export.rows checked against the families: exit 2
    cfg = load_section("export", ExportConfig, args.params)
    eval_cfg = load_section("eval", EvalConfig, args.params)
    report_cfg = load_section("report", ReportConfig, args.params)
    diff_cfg = load_section("diffusion", DiffusionConfig, args.params)
    samp_cfg = load_section("sampling", SamplingConfig, args.params)
    model_cfg = load_section("model", ModelConfig, args.params)
    trk = load_section("tracking", TrackingConfig, args.params)
    for path, what in ((args.data, "prepared dataset (stage prepare)"), (args.fp, "FP models (stage train_fp)"),
                       (args.calib, "calibration sets (stage calibrate)"),
                       (args.evaluators, "evaluators (stage train_evaluators)"),
                       (args.quantized, "quantized models (stage quantize)"),
                       (f"{args.eval}/results.json", "evaluation results (stage evaluate)")):
        require(path, what)

    from pathlib import Path

    from pipeline.deploy.stage import export_all

    export_all(cfg, eval_cfg, report_cfg, diff_cfg, samp_cfg, trk, families, model_cfg.backbones, Path(args.data),
               Path(args.fp), Path(args.calib), Path(args.evaluators), Path(args.quantized), Path(args.eval),
               Path(args.out))


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--data", default="data/dataset")
    p.add_argument("--fp", default="data/fp")
    p.add_argument("--calib", default="data/calib")
    p.add_argument("--evaluators", default="data/evaluators")
    p.add_argument("--quantized", default="data/quantized")
    p.add_argument("--eval", default="data/eval")
    p.add_argument("--out", default="data/export")
    main(run, p)
