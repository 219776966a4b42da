#!/usr/bin/env python
"""qat: LoRA quantization-aware fine-tuning of one MPQ-DM family item by trajectory distillation (Lightning,
logged to this stage's MLflow run), then LoRA merge and real low-bit packing. Reads the ``qat`` params
section; the student comes from the ``mpq_init`` checkpoint, so changing a QAT parameter re-runs only this."""
from _common import log_path, main, parser, require


def run(args):
    from pipeline.config import (ConfigError, DiffusionConfig, SamplingConfig, TrackingConfig, load_matrix,
                                 load_section, parse_setting, read_params, to_dict)

    mpq = load_matrix(args.section, args.params)
    diff_cfg = load_section("diffusion", DiffusionConfig, args.params)
    samp_cfg = load_section("sampling", SamplingConfig, args.params)
    trk = load_section("tracking", TrackingConfig, args.params)
    setting = parse_setting(args.setting, "--setting")
    if args.method and args.method not in mpq.methods:
        raise ConfigError(f"--method: {args.method!r} is not listed in {args.section}.methods ({mpq.methods})")

    from pathlib import Path

    from pipeline.config import from_dict
    from pipeline.train.qat import QATConfig

    raw = read_params(args.params)
    if "qat" not in raw:
        raise ConfigError(f"{Path(args.params).name}: missing section 'qat'")
    try:
        cfg = from_dict(QATConfig, raw["qat"], "qat")
    except ConfigError as exc:
        raise ConfigError(f"{Path(args.params).name}: {exc}") from None
    from pipeline.methods import get_method

    jobs = []
    for m_name in ([args.method] if args.method else list(mpq.methods)):
        method = get_method(m_name)
        backbones = [b for b in mpq.backbones if b in method.backbones]
        if not backbones:
            raise ConfigError(f"{args.section}.backbones: method {method.name!r} supports "
                              f"{list(method.backbones)}, none of which is listed ({mpq.backbones})")
        sub = "" if args.method else method.name
        for b in backbones:
            require(f"{args.fp}/{b}", f"FP {b} model (stage train_fp@{b})")
            require(Path(args.init) / sub / b, f"MPQ student checkpoint for {b} (stage mpq_init, {m_name} {setting.name})")
        jobs.append((method, backbones, sub))

    import logging
    import time

    import torch

    from pipeline import models
    from pipeline.io import atomic_dir, read_json, write_json
    from pipeline.methods.mpqdm import load_student
    from pipeline.quant.packing import merge_lora, save_quantized
    from pipeline.tracking import stage_run, tracking_uri
    from pipeline.train.qat import distillation_error, run_qat

    log = logging.getLogger("pipeline")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with atomic_dir(args.out) as tmp:
        for method, backbones, sub in jobs:
            name = f"qat@{method.name}-{setting.name}"
            for b in backbones:
                init_dir = Path(args.init) / sub / b
                out_dir = tmp / sub / b
                init_info = read_json(init_dir / "info.json", "mpq_init info")
                if init_info.get("setting") != setting.name or init_info.get("method") != method.name:
                    raise ConfigError(f"--init: {init_dir} holds {init_info.get('method')}/{init_info.get('setting')}, "
                                      f"expected {method.name}/{setting.name}")
                params = {"method": method.name, "setting": setting.name, "backbone": b, "qat": to_dict(cfg),
                          "sampling": to_dict(samp_cfg)}
                tags = {"backbone": b, "method": method.name, "setting": setting.name, "section": args.section,
                        "wbits": setting.wbits, "abits": setting.abits}
                with stage_run("qat", params=params, experiment=trk.experiment, uri=trk.uri, run_name=f"{name}@{b}",
                               tags=tags, inputs=[f"{args.fp}/{b}", str(init_dir)],
                               log_file=log_path(f"{name}@{b}")) as run_:
                    from lightning.pytorch.loggers import MLFlowLogger

                    t0 = time.time()
                    teacher = models.load_backbone(f"{args.fp}/{b}", device=device)
                    student = models.load_backbone(f"{args.fp}/{b}", device=device)
                    _, spec, meta = load_student(student.net, init_dir)
                    relation = meta.get("variant", {}).get("relation", "trd")
                    n_check = cfg.check_samples
                    before = distillation_error(student, teacher, diff_cfg, samp_cfg, n=n_check) if n_check else None
                    logger = MLFlowLogger(run_id=run_.run_id, tracking_uri=tracking_uri(trk.uri))
                    log.info("%s@%s: %d trajectories x %d steps, batch %d, relation %s", name, b, cfg.epochs,
                             samp_cfg.steps, cfg.batch_size, relation)
                    summary = run_qat(student, teacher, diff_cfg, samp_cfg, cfg, relation=relation, logger=logger)
                    after = distillation_error(student, teacher, diff_cfg, samp_cfg, n=n_check) if n_check else None
                    merge_lora(student.net)
                    history = summary.pop("history")
                    info = {"method": method.name, "setting": setting.name, "backbone": b, "wbits": setting.wbits,
                            "abits": setting.abits, "variant": meta.get("variant"), "init": meta.get("info", {}),
                            "qat": summary, "eps_mse_before": before, "eps_mse_after": after,
                            "total_seconds": time.time() - t0,
                            "init_seconds": float(meta.get("init_seconds", 0.0)), "qat_seconds": summary["qat_seconds"]}
                    save_quantized(student.net, spec, out_dir, extra_meta={k: v for k, v in info.items() if k != "init"})
                    write_json(out_dir / "info.json", info)
                    write_json(out_dir / "history.json", {"updates": history})
                    run_.log_metrics({"qat_seconds": summary["qat_seconds"], "updates": summary["updates"],
                                      **({"eps_mse_before": before, "eps_mse_after": after} if n_check else {})})
                    log.info("%s@%s: %.1f s QAT, held-out eps-MSE %s -> %s", name, b, summary["qat_seconds"],
                             before, after)


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--section", default="mpq")
    p.add_argument("--method", default=None, help="one method of the section (default: all of them)")
    p.add_argument("--setting", required=True)
    p.add_argument("--fp", default="data/fp")
    p.add_argument("--init", required=True, help="mpq_init output of this item")
    p.add_argument("--out", required=True)
    main(run, p)
