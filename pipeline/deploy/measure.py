"""Measuring an exported model against the model it came from, on the same machine in the same process.

- :func:`call_seconds`: median seconds per call of a denoiser at a batch size (after warm-up calls).
- :func:`denoiser_fidelity`: max |deployed − fake-quant| of the denoiser output on given inputs.
- :func:`image_fidelity`: both models sample from the same noise through :func:`pipeline.sampling.sample`;
  per-image PSNR of the deployed images against the fake-quant images.
- :func:`deploy_row`: load a saved FP model and quantized model folder, export it, export the FP model
  too (the "ORT float32" reference: the same exporter, no quantized layers), and measure all of the above;
  writes ``measure.json`` beside the export.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch


def call_seconds(fn: Callable, args: tuple, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn(*args)`` over ``repeats`` calls after ``warmup`` calls."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(*args)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def denoiser_fidelity(reference, deployed, x: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor]) -> dict:
    """{"max_abs": max |deployed − reference|, "ref_max_abs": max |reference|} of the predictions on (x, t, labels)."""
    with torch.no_grad():
        ref = reference(x, t, labels)
        out = deployed(x, t, labels)
    return {"max_abs": float((out - ref).abs().max()), "ref_max_abs": float(ref.abs().max())}


def image_fidelity(reference, deployed, n: int, diffusion, sampling, seed: int = 0, timesteps=None) -> dict:
    """Sample ``n`` images with both models from the same noise, labels and sampler seed; per-image PSNR
    (dB, capped at 100 for identical images) of the deployed images against the reference's."""
    from pipeline.metrics.paired import psnr
    from pipeline.sampling import eval_labels, initial_noise, sample

    noise = initial_noise(n, tuple(reference.sample_shape), seed)
    labels = None if reference.conditioning == "none" else eval_labels(n, reference.num_classes)
    t0 = time.perf_counter()
    ref = sample(reference, noise, labels, diffusion, sampling, seed=seed, timesteps=timesteps)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = sample(deployed, noise, labels, diffusion, sampling, seed=seed, timesteps=timesteps)
    t_dep = time.perf_counter() - t0
    p = psnr(out, ref)
    return {"psnr_mean_db": float(p.mean()), "psnr_min_db": float(p.min()), "images": n,
            "sampling_seconds": {"fake_quant": t_ref, "deployed": t_dep},
            "max_abs_image": float((out - ref).abs().max())}


def deploy_row(fp_dir, quant_dir, out_dir, *, calib_dir=None, images: int = 16, batches=(1, 8), repeats: int = 5,
               params: Optional[str] = "params.yaml", threads: Optional[int] = None) -> dict:
    """Export the quantized model of ``quant_dir`` (and its FP model ``fp_dir``) under ``out_dir`` and measure
    it: seconds per denoiser call at each batch in ``batches`` with one timestep per call, as a sampling step
    has (PyTorch float32 eager, ORT float32 graph, deployed graph, PyTorch fake-quant), a whole sampling run of ``images`` images (fake-quant vs deployed),
    bytes, and fidelity (denoiser max |Δ| on calibration inputs when ``calib_dir`` is given; image PSNR).
    The sampler settings come from ``params`` (its ``diffusion`` / ``sampling`` sections; None = defaults).
    Writes ``out_dir/measure.json`` (atomically) and returns it."""
    from pipeline.config import DiffusionConfig, SamplingConfig, load_section
    from pipeline.deploy.onnx_export import example_inputs, export_onnx
    from pipeline.deploy.runtime import deployed_backbone
    from pipeline.evaluation import ModelEntry, load_entry, model_timesteps
    from pipeline.sampling import timestep_values

    fp_dir, quant_dir, out_dir = Path(fp_dir), Path(quant_dir), Path(out_dir)
    for key, p in (("fp", fp_dir), ("quantized", quant_dir)):
        if not p.is_dir():
            raise FileNotFoundError(f"deploy: --{key} {p} is not a folder")
    if params is not None and Path(params).is_file():
        diffusion = load_section("diffusion", DiffusionConfig, params)
        sampling = load_section("sampling", SamplingConfig, params)
    else:
        diffusion, sampling = DiffusionConfig(), SamplingConfig()
    entry = ModelEntry("model", "q", "q", "q", fp_dir, quant_dir)
    fake = load_entry(entry, "cpu")
    fp = load_entry(ModelEntry("model", "fp", "fp", "FP32", fp_dir), "cpu")
    info = export_onnx(fake, out_dir / "quantized")
    fp_info = export_onnx(fp, out_dir / "fp32")
    dep = deployed_backbone(out_dir / "quantized", fake, threads=threads)
    ort_fp = deployed_backbone(out_dir / "fp32", fp, threads=threads)
    timings = {}
    steps = model_timesteps(entry) or timestep_values(diffusion, sampling, getattr(fake, "scheduler_config", None))
    for b in batches:  # one timestep per call, as in a sampling step (the middle step of the model's schedule)
        args = example_inputs(fake, b, seed=1, timestep=steps[len(steps) // 2])
        timings[str(b)] = {name: call_seconds(m, args, repeats) for name, m in
                           (("torch_fp32", fp), ("torch_fake_quant", fake), ("ort_fp32", ort_fp), ("deployed", dep))}
    result = {"fp": str(fp_dir), "quantized": str(quant_dir), "executes": info["executes"],
              "executes_label": info["executes_label"],
              "bytes": {"deployed": sum(info["bytes"].values()), "ort_fp32": sum(fp_info["bytes"].values())},
              "call_seconds": timings}
    if calib_dir is not None:
        from pipeline.calibration import load_calibration

        calib = load_calibration(calib_dir)
        n = min(64, calib.x.shape[0])
        result["denoiser"] = denoiser_fidelity(fake, dep, calib.x[:n], calib.t[:n],
                                               None if calib.labels is None else calib.labels[:n])
    if images:
        result["images"] = image_fidelity(fake, dep, images, diffusion, sampling, timesteps=model_timesteps(entry))
    tmp = out_dir / "measure.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out_dir / "measure.json")
    return result
