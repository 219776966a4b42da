#!/usr/bin/env python
"""FP fake-quant speed (FP4DiT rows) on the embedded DiT: per-image DDIM sampling time of an FP-grid model
(E2M1/E3M0 group-128 weights, online per-token FP activations, FP P) with the exponent read by
``torch.frexp`` (the original path), with the straight-through formulation and the float32 bit-field
exponent of ``pipeline.quant.primitives._rel_exponent`` (``reference_fp_path()``: the path before the
no-autograd fast path), and with the in-place no-autograd fast path (``_fp_quantize_inference`` /
``fp_quantize_token``, the default), and of the INT twin; checks that all FP paths give bit-identical samples.

Uses data/fp/dit when present, else the params.yaml architecture with seeded random weights (timing does
not depend on the weights). Run: OMP_NUM_THREADS=1 python bench/fp_fake_quant.py [n_images] [setting] [reps]
"""
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from pipeline import models
    from pipeline.config import DiffusionConfig, ModelConfig, SamplingConfig, load_section, parse_setting
    from pipeline.methods.fp4dit import FP4DiTConfig, fp4dit_spec
    from pipeline.quant import primitives
    from pipeline.quant.surgery import quant_state, quantize_model
    from pipeline.sampling import eval_labels, initial_noise, sample

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 250
    setting = parse_setting(sys.argv[2] if len(sys.argv) > 2 else "W4A6")
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    params = ROOT / "params.yaml"
    model_cfg = load_section("model", ModelConfig, params)
    diff = load_section("diffusion", DiffusionConfig, params)
    samp = load_section("sampling", SamplingConfig, params)
    fp_dir = ROOT / "data" / "fp" / "dit"

    def build(variant):
        bb = (models.load_backbone(fp_dir) if fp_dir.exists()
              else models.build_backbone("dit", model_cfg.dit, 8, 1, 10, seed=0))
        bb.eval()
        quantize_model(bb.net, fp4dit_spec(setting, FP4DiTConfig(**variant)))
        quant_state(bb.net, weight=True, act=True)
        return bb

    noise, labels = initial_noise(n, (1, 8, 8), 0), eval_labels(n, 10)

    fast = primitives._rel_exponent

    def frexp_only(r, e_top, exact_zero=True):
        _, k = torch.frexp(r)
        return (k - 1).clamp(min=1 - e_top, max=0)

    def run_frexp(m):
        primitives._rel_exponent = frexp_only
        try:
            with primitives.reference_fp_path():
                return sample(m, noise, labels, diff, samp)
        finally:
            primitives._rel_exponent = fast

    def run_reference(m):
        with primitives.reference_fp_path():
            return sample(m, noise, labels, diff, samp)

    def run_fast(m):
        return sample(m, noise, labels, diff, samp)

    fp_model, int_model = build({}), build({"grid": "int"})
    cases = {"frexp": (run_frexp, fp_model), "ref": (run_reference, fp_model), "new": (run_fast, fp_model),
             "int": (run_fast, int_model)}
    best = {k: float("inf") for k in cases}
    cpu = {k: float("inf") for k in cases}
    outs = {}
    for _ in range(reps):  # interleaved, best of ``reps`` each (robust to load from other processes)
        for k, (fn, m) in cases.items():
            t0, c0 = time.perf_counter(), time.process_time()
            outs[k] = fn(m)
            best[k] = min(best[k], time.perf_counter() - t0)
            cpu[k] = min(cpu[k], time.process_time() - c0)
    t_old, t_ref, t_new, t_int = (best[k] / n for k in ("frexp", "ref", "new", "int"))
    x_old, x_ref, x_new = outs["frexp"], outs["ref"], outs["new"]
    print(f"{setting.name}, {n} images x {samp.steps} steps, best of {reps}, torch threads {torch.get_num_threads()}")
    print(f"FP grid, frexp exponent           : {t_old:.4f} s/image")
    print(f"FP grid, bit-field exponent       : {t_ref:.4f} s/image  (x{t_old / t_ref:.2f})")
    print(f"FP grid, no-autograd fast path    : {t_new:.4f} s/image  (x{t_old / t_new:.2f}; "
          f"x{t_ref / t_new:.2f} over the bit-field exponent path)")
    print(f"INT grid                          : {t_int:.4f} s/image")
    print(f"process CPU time, best of {reps} (s/image): " + ", ".join(f"{k} {v / n:.4f}" for k, v in cpu.items())
          + f"; fast path x{cpu['ref'] / cpu['new']:.2f} over the bit-field exponent path")
    print(f"samples bit-identical: {torch.equal(x_old, x_ref) and torch.equal(x_ref, x_new)}")


if __name__ == "__main__":
    main()
