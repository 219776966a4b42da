"""Measuring an exported model against the model it came from, on the same machine in the same process.

- :func:`call_seconds`: median seconds per call of a denoiser at a batch size (after warm-up calls).
- :func:`denoiser_fidelity`: max |deployed − fake-quant| of the denoiser output on given inputs.
- :func:`image_fidelity`: both models sample from the same noise through :func:`pipeline.sampling.sample`;
  per-image PSNR of the deployed images against the fake-quant images.
- :func:`peak_rss_mib`: peak resident memory of a fresh process that loads one model (an exported graph in
  ONNX Runtime, or a saved FP model in PyTorch) and makes one denoiser call (``python -m
  pipeline.deploy.measure --child-peak SPEC BATCH THREADS``).
- :func:`deploy_row`: load a saved FP model and quantized model folder, export it, export the FP model
  too (the "ORT float32" reference: the same exporter, no quantized layers), and measure all of the above;
  writes ``measure.json`` beside the export.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
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


def measure_speed(fake, fp, quant_dir: Path, fp32_dir: Path, fp_dir: Optional[Path], *, batches=(1, 8),
                  repeats: int = 5, threads: Optional[int] = None, diffusion=None, sampling=None, timesteps=None,
                  sampling_run: bool = True) -> dict:
    """Wall clock of the four ways to run one model, on ``threads`` intra-op threads (None: every core):
    PyTorch float32 eager (``fp``), PyTorch fake-quant (``fake``), the FP32 graph (``fp32_dir``) and the
    deployed graph (``quant_dir``) in ONNX Runtime. Seconds per denoiser call at each batch (one timestep per
    call, the schedule's middle step, as a sampling step has), a whole sampling run of ``max(batches)`` images
    (``sampling_run``), the peak RSS of a fresh process making one call at that batch (when ``fp_dir``, the
    saved FP model, is given), and the speed-ups at the largest batch."""
    import os

    from pipeline.config import DiffusionConfig, SamplingConfig
    from pipeline.sampling import eval_labels, initial_noise, sample, timestep_values

    from .onnx_export import example_inputs
    from .runtime import deployed_backbone

    diffusion, sampling = diffusion or DiffusionConfig(), sampling or SamplingConfig()
    threads = int(threads or os.cpu_count() or 1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    n = max(batches)
    try:
        models = {"torch_fp32": fp, "torch_fake_quant": fake,
                  "ort_fp32": deployed_backbone(fp32_dir, fp, threads=threads),
                  "deployed": deployed_backbone(quant_dir, fake, threads=threads)}
        steps = timesteps or timestep_values(diffusion, sampling, getattr(fake, "scheduler_config", None))
        calls = {}
        for b in batches:
            args = example_inputs(fake, b, seed=1, timestep=steps[len(steps) // 2])
            calls[str(b)] = {k: call_seconds(m, args, repeats) for k, m in models.items()}
        runs = {}
        if sampling_run:
            noise = initial_noise(n, tuple(fake.sample_shape), 0)
            labels = None if fake.conditioning == "none" else eval_labels(n, fake.num_classes)
            with torch.no_grad():
                for k, m in models.items():
                    t0 = time.perf_counter()
                    sample(m, noise, labels, diffusion, sampling, timesteps=timesteps)
                    runs[k] = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    big = calls[str(n)]
    out = {"threads": threads, "call_seconds": calls,
           "speedup": {"batch": n, "vs_ort_fp32": big["ort_fp32"] / big["deployed"],
                       "vs_torch_fp32": big["torch_fp32"] / big["deployed"],
                       "vs_torch_fake_quant": big["torch_fake_quant"] / big["deployed"]}}
    if runs:
        out["sampling_seconds"] = {"images": n, **runs}
        out["speedup"]["sampling_vs_torch_fake_quant"] = runs["torch_fake_quant"] / runs["deployed"]
    if fp_dir is not None:
        out["peak_rss_mib"] = {"torch_fp32": peak_rss_mib(f"fp:{fp_dir}", n, threads),
                               "ort_fp32": peak_rss_mib(f"ort:{fp32_dir}", n, threads),
                               "deployed": peak_rss_mib(f"ort:{quant_dir}", n, threads)}
    return out


def deploy_row(fp_dir, quant_dir, out_dir, *, calib_dir=None, images: int = 16, batches=(1, 8), repeats: int = 5,
               params: Optional[str] = "params.yaml", threads: Optional[int] = None) -> dict:
    """Export the quantized model of ``quant_dir`` (and its FP model ``fp_dir``) under ``out_dir`` and measure
    it: seconds per denoiser call at each batch in ``batches`` with one timestep per call, as a sampling step
    has (PyTorch float32 eager, ORT float32 graph, deployed graph, PyTorch fake-quant), a whole sampling run of ``images`` images (fake-quant vs deployed),
    bytes, and fidelity (denoiser max |Δ| on calibration inputs when ``calib_dir`` is given; image PSNR).
    The sampler settings come from ``params`` (its ``diffusion`` / ``sampling`` sections; None = defaults).
    Writes ``out_dir/measure.json`` (atomically) and returns it."""
    from pipeline.config import DiffusionConfig, SamplingConfig, load_section
    from pipeline.deploy.onnx_export import export_onnx
    from pipeline.deploy.runtime import deployed_backbone
    from pipeline.evaluation import ModelEntry, load_entry, model_timesteps

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
    timings = measure_speed(fake, fp, out_dir / "quantized", out_dir / "fp32", None, batches=batches,
                            repeats=repeats, threads=threads, diffusion=diffusion, sampling=sampling,
                            timesteps=model_timesteps(entry), sampling_run=False)["call_seconds"]
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


def vm_hwm_mib() -> float:
    """This process's own peak resident memory (Linux ``VmHWM``), MiB. (``ru_maxrss`` of a child would carry
    the parent's peak across fork + exec.)"""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def _child_peak(spec: str, batch: int, threads: int) -> float:
    """Load the model of ``spec`` (``ort:<export dir>`` or ``fp:<saved FP model dir>``), make one call at
    ``batch`` with one timestep, return the peak RSS (MiB)."""
    import pipeline  # noqa: F401  (the CPU numerics pin)

    torch.set_num_threads(threads)
    kind, _, arg = spec.partition(":")
    if kind == "ort":
        from .runtime import OrtDenoiser

        info = json.loads((Path(arg) / "deploy.json").read_text())
        run = OrtDenoiser(Path(arg) / "model.onnx", threads=threads)
        x = torch.randn([batch] + info["sample_shape"])
        run(x, torch.full((batch,), 500), torch.zeros(batch, dtype=torch.long) if "labels" in run.inputs else None)
    elif kind == "fp":
        from pipeline.evaluation import ModelEntry, load_entry

        fp = load_entry(ModelEntry("model", "fp", "fp", "FP32", Path(arg)), "cpu")
        labels = None if fp.conditioning == "none" else torch.zeros(batch, dtype=torch.long)
        with torch.no_grad():
            fp(torch.randn((batch,) + tuple(fp.sample_shape)), torch.full((batch,), 500), labels)
    else:
        raise ValueError(f"peak memory: spec must be ort:<dir> or fp:<dir>, got {spec!r}")
    return vm_hwm_mib()


def peak_rss_mib(spec: str, batch: int, threads: int = 1) -> float:
    """Peak RSS (MiB, imports included) of a fresh process running :func:`_child_peak`."""
    import os

    root = str(Path(__file__).resolve().parents[2])  # this checkout's package, wherever the child starts
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    out = subprocess.run([sys.executable, "-m", "pipeline.deploy.measure", "--child-peak", spec, str(batch),
                          str(threads)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"peak memory of {spec}: child process failed:\n{out.stderr[-2000:]}")
    return float(next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("PEAK_MIB")))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child-peak":
        print(f"PEAK_MIB {_child_peak(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])):.1f}")
    else:
        raise SystemExit("usage: python -m pipeline.deploy.measure --child-peak ort:<dir>|fp:<dir> BATCH THREADS")
