"""``python -m pipeline.deploy --fp data/fp/unet --quantized data/quantized/naive/<job> --out data/deploy/<name>``:
export one quantized model to ONNX (ONNX Runtime target) and measure it (pipeline.deploy.measure.deploy_row)."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.deploy", description=__doc__)
    ap.add_argument("--fp", required=True, help="the saved FP model folder (data/fp/<backbone>)")
    ap.add_argument("--quantized", required=True, help="a quantized model folder (packed.safetensors + quant_spec.json)")
    ap.add_argument("--out", required=True, help="output folder (quantized/, fp32/, measure.json)")
    ap.add_argument("--calib", default=None, help="calibration folder: denoiser max |deployed - fake-quant| on its inputs")
    ap.add_argument("--images", type=int, default=16, help="images sampled by both models for the PSNR (0 = none)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per batch size")
    ap.add_argument("--params", default="params.yaml", help="params file for the diffusion / sampling sections")
    args = ap.parse_args(argv)
    if args.images < 0:
        ap.error(f"--images must be >= 0, got {args.images}")
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    import pipeline  # noqa: F401  (the CPU numerics pin)
    from pipeline.deploy.measure import deploy_row
    from pipeline.deploy.runtime import require_onnxruntime

    require_onnxruntime()
    try:
        out = deploy_row(args.fp, args.quantized, args.out, calib_dir=args.calib, images=args.images,
                         repeats=args.repeats, params=args.params)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
