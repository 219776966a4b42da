#!/usr/bin/env python
"""quantize: one item of the method x bit-setting matrix. Quantizes every backbone listed in
``quantize.backbones`` with the method, on the shared calibration file, and stores each result as
real packed low-bit weights plus its quantization spec."""
from _common import log_path, main, parser, require


def run(args):
    from pipeline.config import (ConfigError, DiffusionConfig, QuantizeConfig, SamplingConfig, TrackingConfig,
                                 from_dict, load_section, parse_setting, read_params, to_dict)

    cfg = load_section("quantize", QuantizeConfig, args.params)
    diff_cfg = load_section("diffusion", DiffusionConfig, args.params)
    samp_cfg = load_section("sampling", SamplingConfig, args.params)
    trk = load_section("tracking", TrackingConfig, args.params)
    setting = parse_setting(args.setting, "--setting")

    from pipeline.methods import MethodContext, get_method

    try:
        method = get_method(args.method)
    except KeyError as exc:
        raise ConfigError(f"--method: {exc.args[0]}") from None
    section = read_params(args.params)["quantize"].get(method.config_section, {})
    method_cfg = from_dict(method.config_cls, section, f"quantize.{method.config_section}")
    backbones = [b for b in cfg.backbones if b in method.backbones]
    if not backbones:
        raise ConfigError(f"quantize.backbones: method {method.name!r} supports {list(method.backbones)}, "
                          f"none of which is listed ({cfg.backbones})")
    for b in backbones:
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
    name = f"quantize@{method.name}-{setting.name}"
    with atomic_dir(args.out) as tmp:
        for b in backbones:
            params = {"method": method.name, "setting": setting.name, "backbone": b,
                      "config": to_dict(method_cfg)}
            tags = {"backbone": b, "method": method.name, "setting": setting.name,
                    "wbits": setting.wbits, "abits": setting.abits}
            with stage_run("quantize", params=params, experiment=trk.experiment, uri=trk.uri,
                           run_name=f"{name}@{b}", tags=tags, inputs=[f"{args.fp}/{b}", f"{args.calib}/{b}"],
                           log_file=log_path(f"{name}@{b}")) as run_:
                t0 = time.time()
                backbone = models.load_backbone(f"{args.fp}/{b}", device=device)
                calib = load_calibration(f"{args.calib}/{b}")
                ctx = MethodContext(device=device, run=run_, diffusion=diff_cfg, sampling=samp_cfg,
                                    backbone_name=b, workdir=tmp / b)
                log.info("%s@%s: quantizing with %s", name, b, method.description)
                result = method.fn(backbone, calib, setting, method_cfg, ctx)
                seconds = time.time() - t0
                meta = {"method": method.name, "setting": setting.name, "backbone": b,
                        "wbits": setting.wbits, "abits": setting.abits, "quantize_seconds": seconds,
                        "calibration": calib.manifest.get("sha256"), "info": result.info}
                save_quantized(result.backbone.net, result.spec, tmp / b, extra_meta=meta)
                write_json(tmp / b / "info.json", meta)
                run_.log_metrics({"quantize_seconds": seconds, **{k: v for k, v in result.info.items()
                                                                   if isinstance(v, (int, float))}})
                run_.log_artifact(tmp / b / "quant_spec.json")
                log.info("%s@%s: done in %.1f s", name, b, seconds)


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--method", required=True)
    p.add_argument("--setting", required=True)
    p.add_argument("--fp", default="data/fp")
    p.add_argument("--calib", default="data/calib")
    p.add_argument("--out", required=True)
    main(run, p)
