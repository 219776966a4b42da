#!/usr/bin/env python
"""Quantization-core benchmark on the embedded UNet and DiT (measured in one run):

- fake-quant sampling time / FP sampling time (target <= 1.5x), for W8A8, W4A8, W3A8, W2A8 integer
  (naive PTQ spec) and FP4 (E2M1 weights per group of 128, FP8 per-token activations);
- packed bytes / theoretical bytes of the quantized layers (target <= 1.05).

Uses the trained models in data/fp/ when present (run `make repro` first), otherwise the params.yaml
architectures with random weights (timing and bytes do not depend on the weights).
"""
import copy
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from pipeline import models
    from pipeline.config import DiffusionConfig, ModelConfig, SamplingConfig, load_section, parse_setting
    from pipeline.methods.naive_ptq import NaivePTQConfig, naive_spec
    from pipeline.quant.packing import packed_bytes, save_quantized, theoretical_bytes
    from pipeline.quant.surgery import LayerQuant, QuantSpec, calibrate_activations, default_rules, quantize_model
    from pipeline.sampling import eval_labels, initial_noise, sample

    torch.manual_seed(0)
    params = ROOT / "params.yaml"
    model_cfg = load_section("model", ModelConfig, params)
    diff = load_section("diffusion", DiffusionConfig, params)
    samp = load_section("sampling", SamplingConfig, params)
    n, reps = 64, 3
    print(f"sampling {n} images x {samp.steps} {samp.scheduler} steps, best of {reps}; torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'backbone':8s} {'setting':8s} {'time ratio':>10s} {'packed/theoretical':>19s}")
    for b in model_cfg.backbones:
        fp_dir = ROOT / "data" / "fp" / b
        if fp_dir.exists():
            fp = models.load_backbone(fp_dir)
        else:
            fp = models.build_backbone(b, getattr(model_cfg, b), 8, 1, 10)
        fp.eval()
        noise, labels = initial_noise(n, fp.sample_shape, 0), eval_labels(n, fp.num_classes)

        def timed(m, noise=noise, labels=labels):
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                sample(m, noise, labels, diff, samp)
                best = min(best, time.perf_counter() - t0)
            return best

        t_fp = timed(fp)
        fp4 = QuantSpec(default=LayerQuant(w_bits=4, w_format="fp", w_granularity="group", group_size=128,
                                           a_bits=8, a_format="fp", a_mode="token", attn_bits=8),
                        rules=default_rules(8))
        specs = [(s, naive_spec(parse_setting(s), NaivePTQConfig())) for s in ("W8A8", "W4A8", "W3A8", "W2A8")]
        specs.append(("FP4", fp4))
        for name, spec in specs:
            q = copy.deepcopy(fp)
            quantize_model(q.net, spec, timesteps=None)
            x = torch.randn(32, *fp.sample_shape)
            t = torch.randint(0, diff.num_train_timesteps, (32,))
            y = torch.randint(0, fp.num_classes, (32,))
            with torch.no_grad():
                calibrate_activations(q.net, lambda q=q, x=x, t=t, y=y: q(x, t, y))
            ratio = timed(q) / t_fp
            with tempfile.TemporaryDirectory() as d:
                save_quantized(q.net, spec, d)
                bytes_ratio = packed_bytes(d) / theoretical_bytes(q.net)
            print(f"{b:8s} {name:8s} {ratio:10.2f} {bytes_ratio:19.3f}")
        print(f"{b:8s} {'FP':8s} {t_fp:9.2f}s (FP sampling time)")


if __name__ == "__main__":
    main()
