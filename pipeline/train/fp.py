"""Full-precision training of a class-conditional diffusion backbone with Lightning.

Objective: epsilon prediction (DDPM, Ho et al. 2020): for a clean batch x0, draw t ~ U{0..T-1} and
eps ~ N(0, I), form x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with diffusers' ``DDPMScheduler.add_noise``
(betas from :class:`pipeline.config.DiffusionConfig`) and minimise ||eps_theta(x_t, t, y) - eps||^2.

Optimisation: AdamW (lr, weight decay from :class:`pipeline.config.TrainRun`), linear warm-up over
``warmup_steps`` then cosine decay to zero at ``steps``. An exponential moving average (EMA) of the
weights is kept and is the model returned and saved. Its decay is warmed up as
min(ema_decay, (1 + n) / (10 + n)) after n updates (the usual schedule, so that the short runs used
here are not dominated by the random initialisation).

Conditioning: the DiT's diffusers label embedding drops labels to its null class with p = 0.1 in
train mode (classifier-free-guidance training); this is kept. UNet and PixArt see every label.

Data: an endless stream of random batches drawn from the in-memory tensors (a fresh seeded
permutation per pass). No augmentation: horizontal flips would change digit identity.
"""
from __future__ import annotations

import copy
import logging
import math
import sys
import time
import warnings
from typing import Iterator

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from pipeline.config import DiffusionConfig, TrainRun
from pipeline.models import DiffusionBackbone
from pipeline.sampling import make_training_scheduler
from pipeline.tracking import quiet_lightning

log = logging.getLogger("pipeline")
quiet_lightning()


class RandomBatches(IterableDataset):
    """Endless random batches ``(images, labels)`` from in-memory tensors.

    Indices come from consecutive seeded permutations of the dataset, so every image is seen once
    per pass; a dataset smaller than a batch is simply repeated.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"images and labels: lengths differ ({images.shape[0]} vs {labels.shape[0]})")
        if images.shape[0] == 0:
            raise ValueError("images: the training set is empty")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.images, self.labels = images, labels
        self.batch_size, self.seed = int(batch_size), int(seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed)
        n = self.images.shape[0]
        pending = torch.empty(0, dtype=torch.long)
        while True:
            while pending.numel() < self.batch_size:
                pending = torch.cat([pending, torch.randperm(n, generator=g)])
            idx, pending = pending[: self.batch_size], pending[self.batch_size :]
            yield self.images[idx], self.labels[idx]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warm-up to 1 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


class DiffusionTrainingModule(L.LightningModule):
    """Epsilon-prediction MSE training of ``backbone`` with an EMA copy (``self.ema``)."""

    def __init__(self, backbone: DiffusionBackbone, diffusion_cfg: DiffusionConfig, run_cfg: TrainRun):
        super().__init__()
        self.backbone = backbone
        self.ema = copy.deepcopy(backbone).requires_grad_(False).eval()
        self.diffusion_cfg = diffusion_cfg
        self.run_cfg = run_cfg
        self.noise_scheduler = make_training_scheduler(diffusion_cfg)
        self.num_timesteps = diffusion_cfg.num_train_timesteps
        self.ema_updates = 0

    def diffusion_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        t = torch.randint(0, self.num_timesteps, (b,), device=images.device)
        noise = torch.randn_like(images)
        noisy = self.noise_scheduler.add_noise(images, noise, t)
        return F.mse_loss(self.backbone(noisy, t, labels), noise)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = self.diffusion_loss(images, labels)
        self.log("train_loss", loss, prog_bar=True, on_step=True, batch_size=images.shape[0])
        if self.trainer is not None and self.trainer.optimizers:
            self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, batch_size=images.shape[0])
        return loss

    @torch.no_grad()
    def update_ema(self) -> None:
        self.ema_updates += 1
        n = self.ema_updates
        decay = min(self.run_cfg.ema_decay, (1.0 + n) / (10.0 + n))
        for e, p in zip(self.ema.parameters(), self.backbone.parameters()):
            e.lerp_(p.detach(), 1.0 - decay)
        for e, b in zip(self.ema.buffers(), self.backbone.buffers()):
            e.copy_(b)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.update_ema()

    def on_train_epoch_start(self) -> None:
        self.ema.eval()  # Lightning sets the whole module to train mode; the EMA copy never trains

    def configure_optimizers(self):
        cfg = self.run_cfg
        opt = torch.optim.AdamW(self.backbone.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, cfg.warmup_steps, cfg.steps)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


class _ProgressLog(L.Callback):
    """One log line every ~10 % of the steps (used when stderr is not a terminal)."""

    def __init__(self, total: int, name: str):
        self.total, self.name = total, name
        self.every = max(1, round(total / 10))
        self.start = time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == self.total:
            loss = outputs["loss"].item() if isinstance(outputs, dict) else float(outputs)
            log.info(
                "train %s: step %d/%d  loss %.4f  lr %.2e  %.0f s",
                self.name, step, self.total, loss, trainer.optimizers[0].param_groups[0]["lr"],
                time.time() - self.start,
            )


def train_backbone(
    backbone: DiffusionBackbone,
    images: torch.Tensor,
    labels: torch.Tensor,
    diffusion_cfg: DiffusionConfig,
    run_cfg: TrainRun,
    logger=None,
    progress: bool = True,
) -> DiffusionBackbone:
    """Train ``backbone`` (in place) for ``run_cfg.steps`` steps and return its EMA copy (eval mode).

    ``logger``: a Lightning logger (e.g. ``MLFlowLogger``) or None. ``progress``: a progress bar when
    stderr is a terminal, otherwise a log line (logger "pipeline") every ~10 % of the steps.
    """
    if not isinstance(backbone, DiffusionBackbone):
        raise TypeError(f"backbone: expected a DiffusionBackbone, got {type(backbone).__name__}")
    if tuple(images.shape[1:]) != tuple(backbone.sample_shape):
        raise ValueError(
            f"images: shape {tuple(images.shape[1:])} per image does not match the backbone's "
            f"sample_shape {backbone.sample_shape}"
        )
    if int(labels.max()) >= backbone.num_classes or int(labels.min()) < 0:
        raise ValueError(f"labels: must lie in 0..{backbone.num_classes - 1} (backbone.num_classes)")
    torch.manual_seed(run_cfg.seed)  # timesteps, noise and the DiT's label dropout
    backbone.train()  # a loaded backbone arrives in eval mode; the DiT's label dropout needs train mode
    module = DiffusionTrainingModule(backbone, diffusion_cfg, run_cfg)
    loader = DataLoader(
        RandomBatches(images.float(), labels.long(), run_cfg.batch_size, run_cfg.seed), batch_size=None
    )
    show_bar = progress and sys.stderr.isatty()
    callbacks = [_ProgressLog(run_cfg.steps, backbone.kind)] if progress and not show_bar else []
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=run_cfg.steps,
        # deterministic kernels wherever torch has one; "warn" (not True) so CUDA ops without one (e.g. the
        # UNet upsampling backward) warn instead of failing. On CPU every op used here is deterministic.
        deterministic="warn",
        logger=logger or False,
        enable_checkpointing=False,
        log_every_n_steps=10,
        enable_model_summary=False,
        enable_progress_bar=show_bar,
        callbacks=callbacks,
    )
    with warnings.catch_warnings():
        # an endless in-memory stream needs no worker processes and has no length
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*IterableDataset.*")
        warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # the EMA copy, on purpose
        trainer.fit(module, loader)
    ema = module.ema
    ema.requires_grad_(True)
    return ema.eval()
