#!/usr/bin/env python
"""Cost and sanity of the peer tools (pipeline/methods/peers.py) on the default-size models of params.yaml
(freshly initialised weights: no `dvc repro` needed): per row the family's quantize time (peer + coverage +
emulation + saving), coverage, relative L2 error of one forward vs FP on calibration inputs (through what the
evaluate stage loads), the tool's file size, and the time to sample N images (DDIM, params' steps) with the
reloaded model next to the FP model's.

    PYTHONPATH=. python bench/peers_cost.py [--settings W8A8,W4A8,W4A32] [--n 250]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from pipeline import models
    from pipeline.calibration import collect_calibration
    from pipeline.config import (CalibrateConfig, DiffusionConfig, ModelConfig, SamplingConfig, load_section,
                                 parse_setting)
    from pipeline.evaluation import ModelEntry, load_entry
    from pipeline.methods import MethodContext, get_family
    from pipeline.methods.peers import PEERS, PeersConfig
    from pipeline.runner import _save_packed
    from pipeline.sampling import eval_labels, initial_noise, sample

    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default="W8A8,W4A8,W4A32")
    ap.add_argument("--n", type=int, default=250, help="images sampled per model (0 = skip sampling)")
    args = ap.parse_args()
    params = ROOT / "params.yaml"
    mc = load_section("model", ModelConfig, params)
    diff, samp = load_section("diffusion", DiffusionConfig, params), load_section("sampling", SamplingConfig, params)
    calib_cfg = load_section("calibrate", CalibrateConfig, params)
    fam, cfg = get_family("peers"), PeersConfig()
    total = 0.0
    for kind in ("unet", "dit"):
        root = Path(tempfile.mkdtemp())
        models.save_backbone(models.build_backbone(kind, getattr(mc, kind), 8, 1, 10, seed=0).eval(), root / "fp")
        fp = models.load_backbone(root / "fp")
        calib = collect_calibration(fp, calib_cfg, diff, samp)
        x, t, y = next(iter(calib.batches(64, "cpu", shuffle=True, seed=1)))
        with torch.no_grad():
            ref = fp(x, t, y)
        noise, labels = initial_noise(args.n, fp.sample_shape, 0), eval_labels(args.n, fp.num_classes)

        def sampling_seconds(bb, noise=noise, labels=labels):
            if not args.n:
                return float("nan")
            t0 = time.time()
            with torch.no_grad():
                sample(bb, noise, labels, diff, samp)
            return time.time() - t0

        print(f"{kind}: FP sampling {args.n} images {sampling_seconds(fp):.1f} s", flush=True)
        for peer in PEERS:
            for s in args.settings.split(","):
                setting = parse_setting(s)
                try:
                    fam.check_setting(setting, fam.config_for(peer, cfg))
                except ValueError as exc:
                    print(f"{kind} {peer:8s} {s:6s} refused: {exc}")
                    continue
                d = root / f"{peer}_{s}"
                d.mkdir()
                t0 = time.time()
                res = fam.quantize(fp, calib, setting, cfg, MethodContext(device="cpu", variant={"peer": peer}, workdir=d))
                _save_packed(res.backbone.net, res.spec, d, {})
                seconds = time.time() - t0
                total += seconds
                bb = load_entry(ModelEntry(kind, "peers", peer, s, root / "fp", d), "cpu")
                with torch.no_grad():
                    rel = float((bb(x, t, y) - ref).norm() / ref.norm())
                print(f"{kind} {peer:8s} {s:6s} quantize {seconds:5.2f} s  coverage {res.info['coverage']:.4f}  "
                      f"rel_err {rel:.4f}  file {res.info['peer_bytes'] / 2**20:.2f} MB  "
                      f"sampling {sampling_seconds(bb):.1f} s", flush=True)
    print(f"family quantize total {total:.1f} s")


if __name__ == "__main__":
    main()
