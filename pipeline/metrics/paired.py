"""Paired fidelity to the FP model: every model samples from the same initial noise and labels as the
FP model of its backbone, so image i of a quantized model and image i of the FP model are the same
"request". Distances between the pairs are a low-noise signal (no reference set, no distribution
estimate) — what diffusion-quantization toolkits report as PSNR / SSIM / LPIPS against the 16-bit model.

Per sample (arrays of length N, so the report can bootstrap them together with FID):

- ``psnr``: 10·log10(1 / MSE) with images mapped to [0, 1] (MSE floored at 1e-10, i.e. at most 100 dB);
- ``ssim``: torchmetrics' SSIM (data range 1, Gaussian window). The usual σ = 1.5 window (11 taps) is
  wider than an 8×8 image, so σ = min(1.5, side / 8) (ours: σ = 1 at 8 px, the standard window from
  12 px up);
- ``feat_dist``: L2 distance between the evaluator's features (the FID feature extractor) of the pair,
  divided by the mean L2 norm of the FP features — a perceptual distance in the space FID uses,
  comparable across backbones (0 = identical features).
"""
from __future__ import annotations

import torch

PAIRED_METRICS = ("psnr", "ssim", "feat_dist")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.detach().float().clamp(-1, 1) + 1) / 2).cpu()


def _check_pair(images: torch.Tensor, reference: torch.Tensor) -> None:
    if images.shape != reference.shape:
        raise ValueError(f"paired metrics: images {tuple(images.shape)} and FP images {tuple(reference.shape)} "
                         "differ in shape (both must come from the same noise and labels)")
    if images.dim() != 4:
        raise ValueError(f"paired metrics: expected [N, C, H, W] images, got shape {tuple(images.shape)}")


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR (dB) of images in [-1, 1] against their pairs."""
    _check_pair(images, reference)
    mse = (_unit(images) - _unit(reference)).pow(2).flatten(1).mean(1).double()
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).float()


def ssim_sigma(height: int, width: int) -> float:
    return min(1.5, min(height, width) / 8)


def ssim(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-sample SSIM of images in [-1, 1] against their pairs (window: :func:`ssim_sigma`)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair(images, reference)
    sigma = ssim_sigma(images.shape[-2], images.shape[-1])
    out = structural_similarity_index_measure(_unit(images).double(), _unit(reference).double(), data_range=1.0,
                                              sigma=sigma, reduction="none")
    return out.float()


def feature_distance(features: torch.Tensor, reference_features: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 distance between paired features, relative to the mean FP feature norm."""
    if features.shape != reference_features.shape:
        raise ValueError(f"feature_distance: shapes {tuple(features.shape)} and {tuple(reference_features.shape)} "
                         "differ")
    f, r = features.double(), reference_features.double()
    scale = r.norm(dim=1).mean().clamp_min(1e-12)
    return ((f - r).norm(dim=1) / scale).float()


def paired_metrics(images: torch.Tensor, reference: torch.Tensor, features: torch.Tensor,
                   reference_features: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{psnr, ssim, feat_dist}``: per-sample tensors of length N."""
    return {"psnr": psnr(images, reference), "ssim": ssim(images, reference),
            "feat_dist": feature_distance(features, reference_features)}
