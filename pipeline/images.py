"""Image tensor conventions and helpers shared by the evaluator networks (:mod:`pipeline.train.classifier`,
:mod:`pipeline.train.tiny_clip`) and the metrics (:mod:`pipeline.metrics`).

Project-wide convention: float tensors in [-1, 1], shape [N, C, H, W], C = 1 or 3; uint8 images in
[0, 255] are accepted where noted. A 1-channel image given to a 3-channel network is repeated, a 3-channel
image given to a 1-channel network is averaged over channels (:func:`match_channels`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def check_images(images: torch.Tensor, name: str = "images") -> None:
    """Raise a clear error unless ``images`` is a 4-d [N, C, H, W] float or uint8 tensor."""
    if not torch.is_tensor(images):
        raise TypeError(f"{name}: expected a torch.Tensor [N, C, H, W], got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{name}: expected shape [N, C, H, W], got {tuple(images.shape)}")
    if not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise TypeError(f"{name}: expected float images in [-1, 1] or uint8 in [0, 255], got dtype {images.dtype}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"{name}: expected 1 or 3 channels, got {images.shape[1]}")


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (clamped) or uint8 [0, 255] -> float32 in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return ((images.float().clamp(-1.0, 1.0) + 1.0) * 0.5)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (clamped) or uint8 -> uint8 [0, 255], rounded like a saved 8-bit PNG."""
    if images.dtype == torch.uint8:
        return images
    return torch.round(to_unit_float(images) * 255.0).to(torch.uint8)


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Repeat a gray image to ``channels`` or average a colour image down to one channel."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1:
        return images.expand(-1, channels, -1, -1)
    if channels == 1:
        if images.dtype == torch.uint8:
            return torch.round(images.float().mean(dim=1, keepdim=True)).to(torch.uint8)
        return images.mean(dim=1, keepdim=True)
    raise ValueError(f"images: cannot convert {c} channels to {channels}")


def random_shift(x: torch.Tensor, max_shift: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Shift each image by an independent integer offset in [-max_shift, max_shift] (edge pixels
    replicated into the gap: the digits' border is background)."""
    if max_shift <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    gen_device = generator.device if generator is not None else x.device
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator, device=gen_device).to(x.device)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator, device=gen_device).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]
