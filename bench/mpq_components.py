#!/usr/bin/env python
"""Which MPQ-DM component moves the result: OMQ and TRD switched on one at a time over the LoRA-QAT base.

The ``mpq`` family's rows differ from EfficientDM (its LoRA-QAT base: no OMQ, zero-init LoRA, no relation
loss) by two components at once: OMQ (pre-scale + mixed-precision groups) and TRD (time-smoothed relation
distillation). This bench runs the 2 x 2 of them (plus, with ``--v2``, MPQ-DMv2's components over MPQ-DM)
through the family's own ``quantize`` and ``finetune`` with the params.yaml options, each for the method
seeds given (the runner's :func:`pipeline.runner.seeded_config`: another calibration draw, QAT trajectory
set and LoRA init per seed), and prints the held-out eps-MSE against the FP model along 16 FP DDIM
trajectories (noise seed 10 000 + ``--seed``, disjoint from the QAT trajectories and the evaluation noise)
after the first phase and after QAT, mean and range over the seeds.

Uses data/fp/unet and data/calib/unet from ``make repro``:

    OMP_NUM_THREADS=1 python bench/mpq_components.py --settings W2A4 W4A4 --seeds 0 1 2
"""
import argparse
import dataclasses
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = {"salient": "none", "lora_init": "zero", "relation": "none"}
CELLS = {
    "efficientdm": BASE,
    "+omq": {**BASE, "salient": "extra_bit"},
    "+trd": {**BASE, "relation": "trd"},
    "mpqdm (+omq +trd)": {**BASE, "salient": "extra_bit", "relation": "trd"},
}
V2_CELLS = {
    "mpqdm +residual": {"salient": "residual", "lora_init": "zero", "relation": "trd"},
    "mpqdm +svd init": {"salient": "extra_bit", "lora_init": "svd", "relation": "trd"},
    "mpqdm +memory": {"salient": "extra_bit", "lora_init": "zero", "relation": "memory"},
    "mpqdm2": {"salient": "residual", "lora_init": "svd", "relation": "memory"},
}


def main() -> None:
    import torch

    from _setup import load_run

    from pipeline.config import parse_setting
    from pipeline.methods import MethodContext
    from pipeline.runner import seeded_config
    from pipeline.train.qat import distillation_error

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=["W2A4", "W4A4"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="method seeds")
    ap.add_argument("--v2", action="store_true", help="also MPQ-DMv2's components over MPQ-DM")
    ap.add_argument("--only-v2", action="store_true", help="only MPQ-DMv2's components over MPQ-DM")
    ap.add_argument("--data-root", type=Path, default=ROOT / "data")
    ap.add_argument("--heldout", type=int, default=16, help="held-out trajectories")
    ap.add_argument("--seed", type=int, default=1, help="held-out noise offset (QAT's own check uses 0)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    settings = [parse_setting(s, "--settings") for s in args.settings]
    fp, calib, diff, samp, fam, base_cfg = load_run(args.data_root, "unet", "mpq")
    cells = {} if args.only_v2 else dict(CELLS)
    if args.v2 or args.only_v2:
        cells.update(V2_CELLS)

    print(f"held-out eps-MSE vs FP on {args.heldout} trajectories (noise seed {10_000 + args.seed}); "
          f"method seeds {args.seeds}; QAT {base_cfg.qat.epochs} epochs x {samp.steps} steps\n", flush=True)
    for setting in settings:
        print(f"## {setting.name}")
        print(f"{'cell':22s} {'after init':>11s} {'after QAT':>11s} {'QAT range':>21s} {'s/job':>6s}")
        for name, switches in cells.items():
            inits, finals, secs = [], [], []
            for seed in args.seeds:
                cfg = seeded_config(dataclasses.replace(base_cfg, **switches), seed)
                t0 = time.time()
                torch.manual_seed(0)
                student = copy.deepcopy(fp)
                ctx = MethodContext(diffusion=diff, sampling=samp, backbone_name="unet")
                res = fam.quantize(student, calib, setting, cfg, ctx)
                student = res.backbone
                inits.append(distillation_error(student, fp, diff, samp, n=args.heldout, seed=args.seed))
                fam.finetune(student, fp, setting, cfg, ctx)
                finals.append(distillation_error(student, fp, diff, samp, n=args.heldout, seed=args.seed))
                secs.append(time.time() - t0)
            mean = sum(finals) / len(finals)
            print(f"{name:22s} {sum(inits) / len(inits):11.5f} {mean:11.5f} "
                  f"[{min(finals):.5f}, {max(finals):.5f}] {sum(secs) / len(secs):6.0f}", flush=True)
        print()


if __name__ == "__main__":
    main()
