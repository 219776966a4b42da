#!/usr/bin/env python
"""Where FP4DiT's FP grids win or lose against INT at equal bits: weights and activations separated.

The FP4DiT cross (``fp4dit`` family) changes the weight grid and the activation number format together
(FP cells: ExMy weights and ExMy activations; INT cells: INT weights and symmetric INT activations). This
bench crosses them apart, with round-to-nearest (no AdaRound, so only the formats differ) and FP4DiT's
spec otherwise (group-128 weights, online per-token activations, Q/K/V and P as the family quantizes them,
the family's exclusion list):

- weights only (activations FP): E2M1 (+ E3M0 FFN-1) vs INT asym vs INT sym;
- activations only (weights FP): FP ExMy (A4 E2M1, A6 E2M3, A8 E3M4) vs symmetric INT, per token;
- every weight grid x activation format at the setting.

Metric: held-out eps-MSE of the quantized model against the FP model along 16 FP DDIM trajectories
(:func:`pipeline.train.qat.distillation_error`, noise seed 10 000 + ``--seed``; disjoint from the
calibration and evaluation noise), and per layer the relative weight error ||W - Q(W)||^2 / ||W||^2
(mean over the quantized layers) with the weights' excess kurtosis (heavy tails favour FP grids).

Uses data/fp/<backbone> from ``make repro``:

    OMP_NUM_THREADS=1 python bench/fp_int_grids.py --backbone dit --settings W4A4 W4A6 W4A8
"""
import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WEIGHT_GRIDS = ("fp", "int-asym", "int-sym")
ACT_FORMATS = {"fp": "fp", "int": "int-sym"}  # activation format -> the cross grid whose activations it uses


def mixed_spec(setting, cfg, wgrid: str, aformat: str):
    """FP4DiT's spec (nearest rounding, per-token activations) with the weight fields of grid ``wgrid`` and
    the activation / attention fields of the cross cell whose activations are ``aformat``."""
    from pipeline.methods.fp4dit import CROSS_GRIDS, fp4dit_spec
    from pipeline.quant.surgery import LayerQuant, QuantSpec

    base = {"act_mode": "token", "adaround": False}
    ws = fp4dit_spec(setting, dataclasses.replace(cfg, **base, **CROSS_GRIDS[wgrid]))
    as_ = fp4dit_spec(setting, dataclasses.replace(cfg, **base, **CROSS_GRIDS[ACT_FORMATS[aformat]]))
    weight_fields = {f.name for f in dataclasses.fields(LayerQuant) if f.name.startswith("w_") or f.name == "group_size"}
    fields = {f.name: getattr(ws.default if f.name in weight_fields else as_.default, f.name)
              for f in dataclasses.fields(LayerQuant)}
    return QuantSpec(default=LayerQuant(**fields), rules=list(ws.rules))


def weight_stats(net) -> dict:
    """Mean relative weight error of the wrapped layers and the mean excess kurtosis of their weights."""
    import torch

    from pipeline.quant.surgery import quant_layers

    rel, kurt = [], []
    with torch.no_grad():
        for _, layer in quant_layers(net):
            if not layer.weight_quant:
                continue
            w = layer.weight.detach().float()
            q = layer.quantized_weight().detach().float()
            rel.append(float(((w - q) ** 2).sum() / (w ** 2).sum().clamp_min(1e-30)))
            z = (w - w.mean()) / w.std().clamp_min(1e-30)
            kurt.append(float((z ** 4).mean() - 3.0))
    return {"rel_w_err": sum(rel) / max(1, len(rel)), "kurtosis": sum(kurt) / max(1, len(kurt)), "layers": len(rel)}


def main() -> None:
    import torch

    from _setup import load_run

    from pipeline.config import parse_setting
    from pipeline.quant.surgery import quant_state, quantize_model
    from pipeline.train.qat import distillation_error

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", choices=["dit", "pixart"], default="dit")
    ap.add_argument("--settings", nargs="+", default=["W4A4", "W4A6", "W4A8"])
    ap.add_argument("--data-root", type=Path, default=ROOT / "data")
    ap.add_argument("--heldout", type=int, default=16, help="held-out trajectories")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    settings = [parse_setting(s, "--settings") for s in args.settings]
    fp, calib, diff, samp, _, cfg = load_run(args.data_root, args.backbone, "fp4dit")

    def score(setting, wgrid, aformat, weight_on, act_on):
        torch.manual_seed(0)
        student = copy.deepcopy(fp)
        quantize_model(student.net, mixed_spec(setting, cfg, wgrid, aformat), timesteps=calib.timesteps)
        quant_state(student.net, weight=weight_on, act=act_on)
        student.eval()
        t0 = time.time()
        with torch.no_grad():
            err = distillation_error(student, fp, diff, samp, n=args.heldout, seed=args.seed)
        ws = weight_stats(student.net) if weight_on else {}
        return err, ws, time.time() - t0

    print(f"backbone {args.backbone}; held-out eps-MSE vs FP on {args.heldout} trajectories "
          f"(seed {10_000 + args.seed}), round to nearest, per-token activations\n", flush=True)
    for setting in settings:
        print(f"## {setting.name}")
        print(f"{'weights':10s} {'activations':12s} {'eps-MSE':>10s} {'rel W err':>10s} {'W kurtosis':>10s}")
        rows = []
        for w in WEIGHT_GRIDS:  # weights only
            err, ws, _ = score(setting, w, "fp", True, False)
            rows.append((w, "FP32", err, ws))
        for a in ACT_FORMATS:  # activations only
            err, _, _ = score(setting, "fp", a, False, True)
            rows.append(("FP32", a, err, {}))
        for w in WEIGHT_GRIDS:
            for a in ACT_FORMATS:
                err, ws, _ = score(setting, w, a, True, True)
                rows.append((w, a, err, ws))
        for w, a, err, ws in rows:
            extra = f" {ws['rel_w_err']:10.5f} {ws['kurtosis']:10.2f}" if ws else ""
            print(f"{w:10s} {a:12s} {err:10.6f}{extra}", flush=True)
        print()


if __name__ == "__main__":
    main()
