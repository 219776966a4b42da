"""Calibration data: the FP model's own inputs along its sampling trajectories.

Q-Diffusion's recipe: run the FP sampler, record the model inputs (x_t, t, conditioning) at every step,
keep ``n_timesteps`` steps spread uniformly over the trajectory (``selection: uniform``) or drawn at
random (``selection: random``, DilateQuant / EDA-DM style), for all ``n_samples`` trajectories.
The file also records every timestep the sampler visits, which timestep-indexed activation
quantizers need to size their parameter tables.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .io import file_hash, read_json, write_json


@dataclass
class CalibrationSet:
    x: torch.Tensor  # [N, C, H, W] noisy inputs x_t
    t: torch.Tensor  # [N] integer timesteps
    labels: torch.Tensor  # [N] class labels
    step_index: torch.Tensor  # [N] index of the sampling step (0 = noisiest)
    timesteps: list[int]  # every timestep the sampler visits, noisy end first
    manifest: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batches(self, batch_size: int, device=None, shuffle: bool = False, seed: int = 0,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (x, t, labels) batches; ``limit`` caps the number of batches."""
        n = len(self)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        count = 0
        for i in range(0, n, batch_size):
            if limit is not None and count >= limit:
                return
            idx = order[i : i + batch_size]
            yield (self.x[idx].to(device), self.t[idx].to(device), self.labels[idx].to(device))
            count += 1

    def subset(self, n: int, seed: int = 0) -> "CalibrationSet":
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return CalibrationSet(self.x[idx], self.t[idx], self.labels[idx], self.step_index[idx],
                              list(self.timesteps), dict(self.manifest))


def select_steps(n_steps: int, n_select: int, selection: str, seed: int) -> list[int]:
    """Indices of the sampling steps to keep (0 = noisiest)."""
    if n_select > n_steps:
        raise ValueError(f"n_timesteps ({n_select}) must not exceed the number of sampling steps ({n_steps})")
    if selection == "uniform":
        stride = n_steps / n_select
        return sorted({min(n_steps - 1, int(i * stride)) for i in range(n_select)})
    if selection == "random":
        g = torch.Generator().manual_seed(seed)
        return sorted(torch.randperm(n_steps, generator=g)[:n_select].tolist())
    raise ValueError(f"selection: {selection!r} is not one of uniform, random")


@torch.no_grad()
def collect_calibration(backbone, cfg, diffusion, sampling) -> CalibrationSet:
    """Sample ``cfg.n_samples`` FP trajectories and keep the inputs at the selected steps."""
    from .sampling import initial_noise, sample, timestep_values

    keep = set(select_steps(sampling.steps, cfg.n_timesteps, cfg.selection, cfg.seed))
    xs, ts, ys, ss = [], [], [], []

    def record(step_index, t, x_t, labels):
        if step_index in keep:
            xs.append(x_t.detach().cpu().clone())
            ts.append(t.detach().cpu().long().clone())
            ys.append(labels.detach().cpu().clone())
            ss.append(torch.full((x_t.shape[0],), step_index, dtype=torch.long))

    device = next(backbone.parameters()).device
    noise = initial_noise(cfg.n_samples, backbone.sample_shape, cfg.seed)
    labels = torch.randint(0, backbone.num_classes, (cfg.n_samples,),
                           generator=torch.Generator().manual_seed(cfg.seed + 1))
    for i in range(0, cfg.n_samples, cfg.batch_size):
        sample(backbone, noise[i : i + cfg.batch_size].to(device), labels[i : i + cfg.batch_size].to(device),
               diffusion, sampling, step_hook=record, decode=False)
    timesteps = [int(v) for v in timestep_values(diffusion, sampling, getattr(backbone, "scheduler_config", None))]
    manifest = {
        "seed": cfg.seed,
        "n_samples": cfg.n_samples,
        "sampling_steps": sampling.steps,
        "scheduler": sampling.scheduler,
        "selection": cfg.selection,
        "selected_steps": sorted(keep),
        "timesteps": timesteps,
    }
    return CalibrationSet(torch.cat(xs), torch.cat(ts), torch.cat(ys), torch.cat(ss), timesteps, manifest)


def save_calibration(calib: CalibrationSet, out_dir: str | Path) -> dict:
    from pipeline.io import save_safetensors

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "calib.safetensors"
    save_safetensors({"x": calib.x.contiguous(), "t": calib.t.contiguous(), "labels": calib.labels.contiguous(),
               "step_index": calib.step_index.contiguous()}, str(path))
    manifest = dict(calib.manifest)
    manifest.update({"n_inputs": len(calib), "sha256": file_hash(path), "sample_shape": list(calib.x.shape[1:])})
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def load_calibration(path: str | Path) -> CalibrationSet:
    """Load a calibration set, checking it against its manifest."""
    from safetensors.torch import load_file

    path = Path(path)
    manifest = read_json(path / "manifest.json", "calibration manifest")
    data_file = path / "calib.safetensors"
    if not data_file.exists():
        raise FileNotFoundError(f"calibration data not found: {data_file}")
    if manifest.get("sha256") and file_hash(data_file) != manifest["sha256"]:
        raise ValueError(f"calibration data {data_file} does not match its manifest hash (corrupt or edited)")
    try:
        t = load_file(str(data_file))
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"calibration data {data_file} is corrupt: {exc}") from None
    return CalibrationSet(t["x"], t["t"], t["labels"], t["step_index"], list(manifest["timesteps"]), manifest)
