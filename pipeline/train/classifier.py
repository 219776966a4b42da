"""The digit classifier evaluator, trained on the reference data (no pretrained metric network is
available offline).

:class:`DigitClassifier` is a small CNN. Its penultimate embedding (``features``) is the default FID feature
space (:mod:`pipeline.metrics.fid`); its logits give the class-conditional accuracy of generated samples
(:mod:`pipeline.metrics.accuracy`). These numbers are pipeline-internal quality measures, not comparable
to published FID scores. Images follow :mod:`pipeline.images` (float [-1, 1] or uint8).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.images import check_images, match_channels, random_shift
from pipeline.train.common import check_training_inputs, cosine_lr, stratified_holdout

log = logging.getLogger("pipeline")

CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier.json"


class DigitClassifier(nn.Module):
    """Small CNN for [N, C, H, W] images in [-1, 1] (any H, W >= 8).

    conv3x3(C->w) - conv3x3 stride 2 (w->2w) - conv3x3 (2w->2w), GELU after each, adaptive average
    pool to 4x4, linear to ``embed_dim`` + GELU (the embedding returned by :meth:`features`), then a
    linear head to ``num_classes`` logits (:meth:`forward`). No batch norm, so train/eval behave
    the same and features do not depend on batch composition.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 8,
                 width: int = 16, embed_dim: int = 64):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels: must be 1 or 3, got {in_channels}")
        if image_size < 8:
            raise ValueError(f"image_size: must be >= 8, got {image_size}")
        if num_classes < 2:
            raise ValueError(f"num_classes: must be >= 2, got {num_classes}")
        self.config = dict(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                           width=width, embed_dim=embed_dim)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.image_size = image_size
        self.embed_dim = embed_dim
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GELU(),
        )
        self.embed = nn.Linear(2 * width * 16, embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.train_info: dict = {}

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, "images")
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1.0
        x = match_channels(x, self.in_channels)
        return x.to(self.embed.weight.dtype)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding [N, embed_dim]."""
        h = self.body(self._prepare(x))
        if h.shape[-2:] != (4, 4):  # 8x8 inputs are already 4x4 here (CPU adaptive pooling is slow)
            h = F.adaptive_avg_pool2d(h, 4)
        return F.gelu(self.embed(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [N, num_classes]."""
        return self.head(self.features(x))


@torch.no_grad()
def predict_labels(classifier: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Arg-max class of every image, in batches, on the classifier's device."""
    device = next(classifier.parameters()).device
    out = []
    for i in range(0, images.shape[0], batch_size):
        out.append(classifier(images[i:i + batch_size].to(device)).argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     steps: int = 1000, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                     holdout_fraction: float = 0.1, weight_decay: float = 1e-4,
                     width: int = 16, embed_dim: int = 64) -> DigitClassifier:
    """Train a :class:`DigitClassifier` with cross-entropy.

    Optimiser AdamW, linear warm-up over 5% of the steps then cosine decay; gradient-norm clip 1.0.
    Augmentation: random integer shifts of up to max(1, size // 8) pixels (no flips or rotations,
    which change digit identity). ``holdout_fraction`` of every class is held out; the held-out
    accuracy, the train time and the step count are stored in ``model.train_info`` (and logged).
    Runs on the device of ``images``. Returns the model in eval mode.
    """
    check_training_inputs(images, labels, num_classes, steps, batch_size, lr)
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction: must be in [0, 1), got {holdout_fraction}")
    t0 = time.perf_counter()
    device = images.device
    gen = torch.Generator().manual_seed(seed)
    x_all = images.float() if images.dtype == torch.uint8 else images
    if images.dtype == torch.uint8:
        x_all = x_all / 127.5 - 1.0
    tr_idx, ho_idx = stratified_holdout(labels, holdout_fraction, gen)
    x_tr, y_tr = x_all[tr_idx.to(device)], labels[tr_idx.to(device)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(images.shape[1], num_classes, min(images.shape[-2:]), width, embed_dim)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)
    max_shift = max(1, min(images.shape[-2:]) // 8)
    warmup = max(1, steps // 20)
    n = x_tr.shape[0]
    perm, pos = torch.randperm(n, generator=gen), 0
    for step in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + batch_size].to(device)
        pos += batch_size
        xb = random_shift(x_tr[idx], max_shift, gen)
        loss = F.cross_entropy(model(xb), y_tr[idx])
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    info = {"steps": steps, "train_seconds": round(time.perf_counter() - t0, 3),
            "final_loss": float(loss.detach()), "train_count": int(n)}
    if ho_idx.numel():
        pred = predict_labels(model, x_all[ho_idx.to(device)])
        info["holdout_accuracy"] = float((pred == labels[ho_idx.to(device)].cpu()).float().mean())
        info["holdout_count"] = int(ho_idx.numel())
    model.train_info = info
    log.info("digit classifier: %s", info)
    return model


def save_classifier(model: DigitClassifier, out_dir: str | Path) -> None:
    """``classifier.safetensors`` (weights) + ``classifier.json`` (architecture and train info)."""
    from pipeline.io import save_safetensors

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(state, str(out_dir / CLASSIFIER_WEIGHTS))
    from pipeline.io import TIMING_SUFFIX, split_timings

    meta, timing = split_timings({"config": model.config, "train_info": model.train_info})  # wall clock aside
    (out_dir / CLASSIFIER_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    (out_dir / f"{Path(CLASSIFIER_CONFIG).stem}{TIMING_SUFFIX}").write_text(json.dumps(timing, sort_keys=True) + "\n")


def load_classifier(path: str | Path, device: Optional[torch.device | str] = None) -> DigitClassifier:
    """Load a classifier saved by :func:`save_classifier` (eval mode, gradients off)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, w_file = path / CLASSIFIER_CONFIG, path / CLASSIFIER_WEIGHTS
    for f in (cfg_file, w_file):
        if not f.is_file():
            raise FileNotFoundError(f"load_classifier: {f} not found (expected a directory written by save_classifier)")
    meta = json.loads(cfg_file.read_text())
    model = DigitClassifier(**meta["config"])
    model.load_state_dict(load_file(str(w_file)))
    model.train_info = meta.get("train_info", {})
    model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model
