#!/usr/bin/env python
"""Quantized models that run for real: ONNX Runtime execution of the exported graph (pipeline.deploy).

Part 1, real size (``--layers`` DiT-XL/2 blocks at random init: width 1152, 16 heads x 72, patch 2 on 32x32x4
latents = 256 tokens, 1000 classes, every block with block 0's timestep + class embedder as in a converted
checkpoint; the embedded models are too small for integer kernels to pay off):
naive W8A8 and weight-only W4 (``W4A16``, every layer at 4 bits: ``keep_first_last_bits=4``), quantized with
``pipeline.api.quantize`` on a tiny calibration set, exported with ``pipeline.deploy.export_onnx``. Prints
seconds per denoiser call at each ``--batches`` size for PyTorch float32 eager, PyTorch fake-quant, the FP32
graph in ORT (same exporter, no quantized layers) and the deployed graphs (also W8A8 with timestep-indexed
activation scales, to price their execution), the W8A8 / ORT-FP32 speed ratio
(goal: >= 2x faster at batch 8), the W4 artifact bytes / FP32 artifact bytes (goal: <= 0.16), the share of
weights each executes class covers, and the peak RSS of one batch-8 call in a fresh process per model
(PyTorch float32 eager vs each ORT graph; imports included).

Part 2, the default run's exported rows (``--data data``, after ``make repro``): the export stage's results
(``data/export``: ``export.rows`` in params.yaml): what each row executes, its bytes, deployed-vs-fake-quant
image PSNR on the evaluation noise (goal: >= 40 dB at W8A8), FID of the deployed images, the denoiser's max
|difference| on calibration inputs, and the stage's speed-ups and peak memory.

    python bench/deploy.py                       # part 1
    python bench/deploy.py --data data           # parts 1 and 2
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import _setup  # noqa: F401  (puts the repository on sys.path)


def real_size(layers: int, batches: list, reps: int, out: Path) -> dict:
    import torch

    from pipeline.api import quantize
    from pipeline.calibration import collect_calibration
    from pipeline.config import CalibrateConfig, DiffusionConfig, SamplingConfig
    from pipeline.deploy.measure import call_seconds
    from pipeline.deploy.onnx_export import example_inputs, export_onnx
    from pipeline.deploy.runtime import deployed_backbone

    fp = _real_size_model(layers)
    n_params = sum(p.numel() for p in fp.parameters())
    print(f"DiT-XL/2 block stack: {layers} blocks, {n_params / 1e6:.1f} M parameters, 256 tokens, "
          f"{torch.get_num_threads()} threads", flush=True)
    calib = collect_calibration(fp, CalibrateConfig(n_samples=2, n_timesteps=2, batch_size=2), DiffusionConfig(),
                                SamplingConfig(steps=2))
    t0 = time.perf_counter()
    q8 = quantize(fp, "naive", "W8A8", calib, calib_batches=1).backbone
    q4 = quantize(fp, "naive", "W4A16", calib, calib_batches=1, keep_first_last_bits=4).backbone
    qt = _tpq_twin(fp, calib)
    print(f"quantized W8A8, W4A16 and W8A8-TPQ in {time.perf_counter() - t0:.0f} s", flush=True)
    infos, runs = {}, {}
    for name, bb in (("fp32", fp), ("W8A8", q8), ("W4A16", q4), ("W8A8-TPQ", qt)):
        t0 = time.perf_counter()
        infos[name] = export_onnx(bb, out / name)
        runs[name] = deployed_backbone(out / name, bb)
        print(f"exported {name} in {time.perf_counter() - t0:.0f} s: {infos[name]['executes_label']}", flush=True)
    res = {"layers": layers, "params_m": n_params / 1e6, "threads": torch.get_num_threads(), "calls": {}}
    for b in batches:  # one timestep per call, as in a sampling step (calibration's first timestep)
        args = example_inputs(fp, b, seed=1, timestep=int(calib.timesteps[0]))
        row = {"torch_fp32": call_seconds(fp, args, reps), "ort_fp32": call_seconds(runs["fp32"], args, reps),
               "ort_W8A8": call_seconds(runs["W8A8"], args, reps), "ort_W4A16": call_seconds(runs["W4A16"], args, reps),
               "ort_W8A8-TPQ": call_seconds(runs["W8A8-TPQ"], args, reps),
               "torch_fake_quant_W8A8": call_seconds(q8, args, max(1, reps // 2))}
        res["calls"][str(b)] = row
        print(f"batch {b}: " + ", ".join(f"{k} {v:.3f} s" for k, v in row.items()), flush=True)
        print(f"  W8A8 deployed vs ORT float32: {row['ort_fp32'] / row['ort_W8A8']:.2f}x faster; "
              f"vs PyTorch float32 eager: {row['torch_fp32'] / row['ort_W8A8']:.2f}x; "
              f"vs PyTorch fake-quant: {row['torch_fake_quant_W8A8'] / row['ort_W8A8']:.2f}x", flush=True)
        print(f"  timestep-indexed activation scales (the step's row gathered in the graph, integer kernels): "
              f"{row['ort_W8A8-TPQ'] / row['ort_W8A8']:.2f}x the static W8A8 time, "
              f"{row['ort_W8A8-TPQ'] / row['ort_fp32']:.2f}x the ORT float32 time", flush=True)
        with torch.no_grad():
            ref = q8(*args)
            d8 = float((runs["W8A8"](*args) - ref).abs().max())
        print(f"  W8A8 deployed vs fake-quant denoiser max |diff| {d8:.2e} (outputs up to {float(ref.abs().max()):.2f})",
              flush=True)
    size = {k: sum(v["bytes"].values()) for k, v in infos.items()}
    res["bytes"] = size
    res["executes"] = {k: v["executes_label"] for k, v in infos.items()}
    print("artifact bytes: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in size.items()))
    print(f"W4A16 / FP32 bytes: {size['W4A16'] / size['fp32']:.3f} (goal <= 0.16); "
          f"W8A8 / FP32: {size['W8A8'] / size['fp32']:.3f}")
    for k in ("W8A8", "W4A16"):
        lb = infos[k]["layer_bytes"]
        print(f"  {k} quantized layers only: {lb['stored'] / 2**20:.1f} MiB stored vs {lb['fp32'] / 2**20:.1f} MiB "
              f"float32 ({lb['stored'] / lb['fp32']:.3f}); the rest (embeddings, norms, biases) stays float32")
    peaks = {"torch_fp32": peak_mib(f"torch:{layers}")}
    peaks.update({f"ort_{k}": peak_mib(f"ort:{out / k}") for k in infos})
    res["peak_rss_mib"] = peaks
    print("peak RSS of one batch-8 call in a fresh process (imports included): "
          + ", ".join(f"{k} {v:.0f} MiB" for k, v in peaks.items()), flush=True)
    return res


def _tpq_twin(fp, calib):
    """Naive W8A8 with one activation scale per sampling timestep (``a_mode="timestep"``, as TPQ / MPQ-DM):
    the same layers and weights as the static W8A8 model, so the time difference is the cost of executing
    timestep-indexed scales."""
    import copy

    from pipeline.config import BitSetting
    from pipeline.methods.naive_ptq import NaivePTQConfig, naive_spec
    from pipeline.quant.surgery import calibrate_on, quant_state, quantize_model

    qt = copy.deepcopy(fp)
    spec = naive_spec(BitSetting(8, 8), NaivePTQConfig()).with_fields(a_mode="timestep")
    quantize_model(qt.net, spec, timesteps=calib.timesteps)
    calibrate_on(qt, calib, batches=1, seed=0)
    quant_state(qt.net, weight=True, act=True)
    return qt


def _real_size_model(layers: int):
    """The float32 DiT-XL/2 block stack of part 1 (seed 0, embedders tied as in a converted checkpoint)."""
    from pipeline import models
    from pipeline.config import BackboneModel, DiTArch

    cfg = BackboneModel(dit=DiTArch(num_layers=layers, num_attention_heads=16, attention_head_dim=72, patch_size=2))
    fp = models.build_backbone("dit", cfg, 32, 4, 1000, seed=0).eval()
    _tie_embedders(fp)
    return fp


def _tie_embedders(fp) -> None:
    """Give every block block 0's timestep + class embedder, as a converted DiT-XL/2 checkpoint has them:
    diffusers' DiT keeps one copy per block, and its conversion script copies the original model's single
    t_embedder / y_embedder into each (the exporter stores identical tensors once)."""
    import torch

    blocks = fp.net.transformer_blocks
    with torch.no_grad():
        for blk in blocks[1:]:
            blk.norm1.emb.load_state_dict(blocks[0].norm1.emb.state_dict())


def _child_peak(layers: str) -> None:
    """Child process: build the float32 DiT-XL/2 block stack (seed 0), run one batch-8 call and print the
    process's peak RSS (MiB; ``pipeline.deploy.measure.vm_hwm_mib``)."""
    import torch

    from pipeline.deploy.measure import vm_hwm_mib

    fp = _real_size_model(int(layers))
    with torch.no_grad():
        fp(torch.randn(8, 4, 32, 32), torch.full((8,), 500), torch.zeros(8, dtype=torch.long))
    print(f"PEAK_MIB {vm_hwm_mib():.1f}")


def peak_mib(spec: str) -> float:
    """Peak RSS (MiB) of a fresh process making one batch-8 call (imports included): ``ort:<export dir>``
    (``pipeline.deploy.measure.peak_rss_mib``) or ``torch:<layers>`` (:func:`_child_peak`)."""
    import subprocess

    import torch

    kind, _, arg = spec.partition(":")
    if kind == "ort":
        from pipeline.deploy.measure import peak_rss_mib

        return peak_rss_mib(spec, 8, torch.get_num_threads())
    out = subprocess.run([sys.executable, __file__, "--child-peak", arg], capture_output=True, text=True, check=True)
    return float(next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("PEAK_MIB")))


def default_rows(export_dir: Path) -> dict:
    """Print the export stage's rows (``data/export``, written by ``make repro``): what runs, bytes,
    deployed-vs-fake-quant fidelity (goal: image PSNR >= 40 dB at W8A8) and the stage's speed-ups."""
    from pipeline.report import read_export_index

    rows = read_export_index(export_dir)
    if not rows:
        print(f"no export stage output under {export_dir} (run `make repro` first)")
    for d in rows:
        f, b, t = d["fidelity"], d["bytes"], d.get("timing", {})
        goal = ""
        if d["model"].split("#")[0].endswith("/W8A8"):
            goal = " (goal >= 40 dB: " + ("met" if f["psnr_mean_db"] >= 40 else "NOT met") + ")"
        sp, peak = t.get("speedup", {}), t.get("peak_rss_mib", {})
        print(f"{d['row']} -> {d['model']}: {d['executes_label']}; graph {b['deployed'] / 1e6:.2f} MB = "
              f"{b['deployed'] / b['ort_fp32']:.3f}x the FP32 graph; images PSNR vs fake-quant {f['psnr_mean_db']:.1f} "
              f"dB mean, {f['psnr_min_db']:.1f} dB min over {f['images']}{goal}; FID deployed "
              f"{f['deployed']['fid']:.3f} vs fake-quant {f['fake_quant'].get('fid') or float('nan'):.3f}; denoiser "
              f"max |diff| {f['denoiser_max_abs']:.2e} (outputs up to {f['denoiser_ref_max_abs']:.2f})"
              + (f"; batch {sp['batch']}: {sp['vs_ort_fp32']:.2f}x the FP32 graph, {sp['vs_torch_fp32']:.2f}x "
                 f"PyTorch float32, {sp['vs_torch_fake_quant']:.2f}x fake-quant; sampling "
                 f"{sp['sampling_vs_torch_fake_quant']:.2f}x fake-quant; peak RSS deployed {peak['deployed']:.0f} "
                 f"MiB vs PyTorch float32 {peak['torch_fp32']:.0f} MiB" if sp else ""), flush=True)
    return {d["row"]: d for d in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--data", type=Path, default=None, help="a finished run's data/ folder (part 2)")
    ap.add_argument("--skip-real-size", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="write the numbers here")
    ap.add_argument("--child-peak", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import pipeline  # noqa: F401  (CPU numerics pin)

    if args.child_peak:
        return _child_peak(args.child_peak)
    from pipeline.deploy.runtime import require_onnxruntime

    require_onnxruntime()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_real_size:
            out["real_size"] = real_size(args.layers, args.batches, args.reps, Path(tmp) / "real")
        if args.data is not None:
            out["rows"] = default_rows(args.data / "export")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
