#!/usr/bin/env python
"""search: TMPQ-DM's joint timestep + per-layer bit search (Optuna) on one backbone, resumable (the study is
replayed from a score cache); writes the Pareto front (front.json / front.md / front.png), every trial
(trials.csv), and the score cache and study journal (side files DVC does not hash) to ``--out`` (see
:mod:`pipeline.search`). A run whose ``tmpq`` family does not list the backbone (e.g. a preset of a model
TMPQ-DM does not report on) writes only ``skipped.json``: nothing reads a search there."""
from _common import main, parser, require


def run(args):
    from pipeline.config import DiffusionConfig, SamplingConfig, SearchConfig, TrackingConfig, load_section

    cfg = load_section("search", SearchConfig, args.params)
    diffusion = load_section("diffusion", DiffusionConfig, args.params)
    sampling = load_section("sampling", SamplingConfig, args.params)
    tracking = load_section("tracking", TrackingConfig, args.params)
    if args.backbone not in cfg.backbones:
        from pipeline.config import ConfigError

        raise ConfigError(f"search.backbones: {args.backbone!r} is not listed ({', '.join(cfg.backbones)})")
    from pipeline.config import read_params

    raw = read_params(args.params)
    if "tmpq" not in raw.get("families", []) or args.backbone not in (raw.get("tmpq") or {}).get("backbones", []):
        from pathlib import Path

        from pipeline.io import atomic_dir, write_json

        if Path(args.out).is_dir() and any(Path(args.out).iterdir()):  # an earlier study is kept, not deleted
            print(f"search@{args.backbone}: skipped (tmpq does not run on it); {args.out} kept as it was")
            return
        with atomic_dir(args.out) as tmp:
            write_json(tmp / "skipped.json", {"backbone": args.backbone,
                                              "reason": "the tmpq family does not run on this backbone"})
        print(f"search@{args.backbone}: skipped (tmpq is not listed in families, or not on {args.backbone})")
        return
    if sampling.scheduler != "ddim":
        from pipeline.config import ConfigError

        raise ConfigError(f"sampling.scheduler: the TMPQ-DM search samples timestep subsequences with DDIM, "
                          f"got {sampling.scheduler!r}")
    require(args.fp, f"FP {args.backbone} model (stage train_fp@{args.backbone})")
    require(args.calib, f"calibration set for {args.backbone} (stage calibrate@{args.backbone})")
    import torch

    from pipeline.search import run_search

    device = "cuda" if torch.cuda.is_available() else "cpu"
    doc = run_search(args.backbone, cfg, diffusion, sampling, tracking, args.fp, args.calib, args.out, device)
    print(f"search@{args.backbone}: {doc['n_trials']} trials, front of {len(doc['front'])} points, "
          f"{doc['seconds']:.0f} s")


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--backbone", required=True)
    p.add_argument("--fp", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--out", required=True)
    main(run, p)
