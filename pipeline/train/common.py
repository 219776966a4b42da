"""Training helpers shared by the evaluator networks (:mod:`pipeline.train.classifier`,
:mod:`pipeline.train.tiny_clip`): input checks, a stratified hold-out split and the warm-up + cosine
learning-rate schedule."""
from __future__ import annotations

import math

import torch

from pipeline.images import check_images


def stratified_holdout(labels: torch.Tensor, fraction: float, generator: torch.Generator):
    """Indices (train, holdout): ``fraction`` of every class held out (at least one per class
    with two or more members)."""
    train_idx, hold_idx = [], []
    labels_cpu = labels.cpu()
    for c in torch.unique(labels_cpu).tolist():
        idx = torch.nonzero(labels_cpu == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        k = int(round(fraction * idx.numel()))
        if fraction > 0 and idx.numel() >= 2:
            k = max(k, 1)
        hold_idx.append(idx[:k])
        train_idx.append(idx[k:])
    return torch.cat(train_idx), torch.cat(hold_idx)


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    """Learning rate at ``step``: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def check_training_inputs(images, labels, num_classes, steps, batch_size, lr):
    """Raise a clear error for images / labels / hyper-parameters a trainer cannot use."""
    check_images(images)
    if not torch.is_tensor(labels) or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels: expected an int64 tensor [N] with N = {images.shape[0]}, got "
                         f"{getattr(labels, 'shape', type(labels))}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels: values must lie in 0..{num_classes - 1}, got "
                         f"{int(labels.min())}..{int(labels.max())}")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("lr", lr)):
        if v <= 0:
            raise ValueError(f"{name}: must be > 0, got {v}")
