"""Quantization-aware fine-tuning by trajectory distillation (EfficientDM / MPQ-DM / MPQ-DMv2 QAT), in Lightning.

Data-free: every "epoch" is one batch of DDIM trajectories drawn by the FP teacher through the project's one
sampling loop (:func:`pipeline.sampling.sample` with a ``step_hook``). At every step the hook

1. runs the teacher on its own x_t (no grad) and keeps ε_fp and its last decoder features,
2. runs the student (fake-quantized, LoRA) on the same x_t, with grad,
3. loss = mean (ε_q − ε_fp)² + ``relation_weight`` · relation loss (TRD or MTRD, :mod:`pipeline.train.relation`),
4. takes one AdamW update (1 update per step, MPQ-DM), then the loop advances x_t with the *teacher's* ε
   (a caching wrapper hands the teacher's ε of step 2 to the loop, so the teacher runs once per step).

Parameter groups (MPQ-DM ``train_ourdm.py``): LoRA A/B — learning rate ``lora_lr``, or, when null, the
scale-aware rate ``lora_lr_scale`` × mean weight step Δ of the layer (EfficientDM; MPQ-DM sums its three
group means, we take the mean over all channels; the 1-bit binary channels of a W2 layer have no Δ and are
left out), one group per layer, times :func:`lora_step_match` for SVD-initialised factors (ours);
weight-quantizer Δ, z, the binary group's μ, α and the residual α (``weight_quant_lr``); activation-quantizer
Δ_t, z_t (``act_quant_lr``). Linear decay to 0 over all updates, no warm-up. Reductions: means instead of MPQ-DM's sums (so the defaults do not depend on the image size);
the relation weight absorbs the difference.

Features: forward hooks on one module of teacher and student found by name (``feature_module``; null = the
last ``up_blocks.<i>`` of a UNet — the output of the last decoder block, before ``conv_norm_out`` — or the
last ``transformer_blocks.<i>`` of a DiT / PixArt, tokens used as pixels). No diffusers internals imported.
"""
from __future__ import annotations

import logging
import math
import re
import time
import warnings
from typing import Optional

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.train.configs import QATConfig  # noqa: F401  (public here too)
from pipeline.train.relation import build_relation_loss

log = logging.getLogger("pipeline")
_FEATURE_PATTERNS = (r"(.*\.)?up_blocks\.(\d+)", r"(.*\.)?transformer_blocks\.(\d+)")


# ------------------------------------------------------------------------------------------------
# features
# ------------------------------------------------------------------------------------------------
def find_feature_module(net: nn.Module, name: Optional[str] = None) -> str:
    """Name of the module whose output feeds the relation loss (see module doc)."""
    names = [n for n, _ in net.named_modules()]
    if name is not None:
        if name not in names:
            raise ValueError(f"feature_module: {name!r} is not a module of the model (e.g. {names[-1]!r})")
        return name
    for pattern in _FEATURE_PATTERNS:
        hits = [(int(m.group(2)), n) for n in names if (m := re.fullmatch(pattern, n))]
        if hits:
            return max(hits)[1]
    raise ValueError("feature_module: no 'up_blocks.<i>' (UNet) or 'transformer_blocks.<i>' (DiT) module found; "
                     "set qat.feature_module to the name of the last decoder block")


class FeatureTap:
    """Forward hook keeping the latest output (first tensor of a tuple) of one named module."""

    def __init__(self, net: nn.Module, name: str):
        self.value: Optional[torch.Tensor] = None
        self.handle = net.get_submodule(name).register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        if hasattr(out, "sample") and not isinstance(out, torch.Tensor):
            out = out.sample
        self.value = out

    def pop(self) -> torch.Tensor:
        v, self.value = self.value, None
        if v is None:
            raise RuntimeError("FeatureTap: the feature module did not run during the forward")
        return v

    def remove(self) -> None:
        self.handle.remove()


class CachedTeacher(nn.Module):
    """The teacher as the sampling loop sees it: returns the ε the step hook already computed for exactly
    this (x_t, t, labels), so the teacher runs once per step."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher
        self.cache = None

    @property
    def scheduler_config(self):
        """The teacher's own sampler settings (a model loaded from a diffusers directory), for the loop."""
        return getattr(self.teacher, "scheduler_config", None)

    def forward(self, x, t, labels=None):
        c = self.cache
        if c is not None and c[0].shape == x.shape and torch.equal(c[0], x) and torch.equal(c[1], t):
            return c[2]
        with torch.no_grad():
            return self.teacher(x, t, labels)


# ------------------------------------------------------------------------------------------------
# parameter groups
# ------------------------------------------------------------------------------------------------
def _mean_weight_step(layer) -> float:
    steps = [q.scale.detach().abs().reshape(-1)[q.channel_mask.reshape(-1)] if (
        q.channel_mask is not None and q.scale.numel() == q.channel_mask.numel()) else q.scale.detach().abs().reshape(-1)
        for q in layer.weight_quantizers if hasattr(q, "scale")]
    if not steps:
        return 0.0
    return float(torch.cat(steps).float().mean())


def lora_step_match(layer) -> float:
    """LoRA learning-rate factor that gives non-zero-initialised factors (MPQ-DMv2's SVD init) the same
    relative step as MPQ-DM's Kaiming-A / zero-B start: rms(Kaiming-uniform A) / rms([A, B]). Adam moves
    every factor entry by about lr per update, so the change of B·A per update grows with the factor
    magnitudes; SVD factors of the quantization error are several times larger than a Kaiming A, which
    made the same learning rate several times more aggressive (our measurement; see the module doc).
    1 for a zero-initialised B."""
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    if not bool(b.any()):
        return 1.0
    fan_in = a[0].numel()
    kaiming_rms = 1.0 / math.sqrt(3.0 * fan_in)  # Kaiming-uniform(a=√5): bound 1/√fan_in
    rms = torch.cat([a.reshape(-1), b.reshape(-1)]).float().pow(2).mean().sqrt().item()
    return min(1.0, kaiming_rms / max(rms, 1e-12))


def parameter_groups(net: nn.Module, cfg: QATConfig) -> tuple[list, dict]:
    """AdamW groups (LoRA per layer, weight quantizers, activation quantizers) and a count summary.
    Freezes everything else."""
    from pipeline.quant.surgery import activation_quantizers, quant_layers

    for p in net.parameters():
        p.requires_grad_(False)
    groups, lora_params, wq_params, aq_params = [], 0, [], []
    for _, layer in quant_layers(net):
        if layer.lora_A is not None:
            lr = cfg.lora_lr if cfg.lora_lr is not None else cfg.lora_lr_scale * _mean_weight_step(layer)
            if cfg.match_lora_step:
                lr *= lora_step_match(layer)
            ps = [layer.lora_A, layer.lora_B]
            for p in ps:
                p.requires_grad_(True)
            groups.append({"params": ps, "lr": lr, "weight_decay": cfg.weight_decay, "name": "lora"})
            lora_params += sum(p.numel() for p in ps)
        for q in layer.weight_quantizers:
            wq_params += [p for p in q.parameters(recurse=False)]
        if layer.residual is not None:
            wq_params.append(layer.residual.alpha)
    seen = set()
    for _, q in activation_quantizers(net):
        for p in q.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                aq_params.append(p)
    for name, ps, lr in (("weight_quant", wq_params, cfg.weight_quant_lr), ("act_quant", aq_params, cfg.act_quant_lr)):
        if ps:
            for p in ps:
                p.requires_grad_(True)
            groups.append({"params": ps, "lr": lr, "weight_decay": 0.0, "name": name})
    summary = {"lora_params": lora_params, "weight_quant_params": sum(p.numel() for p in wq_params),
               "act_quant_params": sum(p.numel() for p in aq_params)}
    if not groups:
        raise ValueError("QAT: the student has nothing to train (no LoRA, no learnable quantizers)")
    return groups, summary


# ------------------------------------------------------------------------------------------------
# Lightning module
# ------------------------------------------------------------------------------------------------
class TrajectorySeeds(torch.utils.data.Dataset):
    """Item e: (initial noise, labels) of trajectory batch e (seed + e), identical on every machine."""

    def __init__(self, epochs: int, batch_size: int, sample_shape, num_classes: int, seed: int):
        self.epochs, self.batch_size, self.shape = epochs, batch_size, tuple(sample_shape)
        self.num_classes, self.seed = num_classes, seed

    def __len__(self) -> int:
        return self.epochs

    def __getitem__(self, e: int):
        from pipeline.sampling import initial_noise

        noise = initial_noise(self.batch_size, self.shape, self.seed + e)
        g = torch.Generator().manual_seed(self.seed + e)
        labels = torch.randint(0, self.num_classes, (self.batch_size,), generator=g)
        return noise, labels


class TrajectoryDistillation(L.LightningModule):
    """Student ← teacher distillation along the teacher's sampling trajectories (see module doc).

    ``relation``: "trd" | "memory" | "none" (the method variant's relation loss)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, diffusion, sampling, cfg: QATConfig,
                 relation: str = "trd"):
        super().__init__()
        self.automatic_optimization = False
        self.student = student
        self.teacher = CachedTeacher(teacher.requires_grad_(False).eval())
        self.diffusion_cfg, self.sampling_cfg, self.cfg = diffusion, sampling, cfg
        self.relation = build_relation_loss(relation if cfg.relation_weight != 0 else "none", cfg.trd_window,
                                            cfg.memory_length, cfg.temperature, cfg.memory_decay)
        self.relation_kind = relation
        feat = find_feature_module(student.net, cfg.feature_module)
        self.feature_name = feat
        self._taps = None
        self.groups, self.param_summary = parameter_groups(student.net, cfg)
        self.total_updates = cfg.epochs * sampling.steps
        self.history: list = []
        self.curve: list = []  # (update, held-out ε-MSE) when cfg.curve_every > 0

    def _ensure_taps(self):
        if self._taps is None and self.relation is not None:
            self._taps = (FeatureTap(self.teacher.teacher.net, self.feature_name),
                          FeatureTap(self.student.net, self.feature_name))

    def remove_taps(self) -> None:
        if self._taps is not None:
            for tap in self._taps:
                tap.remove()
            self._taps = None

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.groups)
        total = self.total_updates
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))
        return [opt], [{"scheduler": sched, "interval": "step"}]

    def relation_weight(self, features: torch.Tensor, eps: torch.Tensor) -> float:
        """``cfg.relation_weight``, or MPQ-DM's 100 · P / (C·H·W) when null (see :class:`QATConfig`)."""
        if self.cfg.relation_weight is not None:
            return self.cfg.relation_weight
        from pipeline.train.relation import pixel_features

        pixels = pixel_features(features).shape[1]
        return 100.0 * pixels / eps[0].numel()

    def distill_step(self, step_index: int, t: torch.Tensor, x_t: torch.Tensor, labels: torch.Tensor) -> dict:
        """One update on the teacher's x_t (the sampling loop's ``step_hook``)."""
        self._ensure_taps()
        opt = self.optimizers()
        sched = self.lr_schedulers()
        with torch.no_grad():
            eps_fp = self.teacher.teacher(x_t, t, labels)
        self.teacher.cache = (x_t, t, eps_fp)
        feat_fp = self._taps[0].pop() if self._taps else None
        with torch.enable_grad():
            eps_q = self.student(x_t, t, labels)
            task = F.mse_loss(eps_q, eps_fp)
            loss = task
            rel = None
            if self.relation is not None:
                feat_q = self._taps[1].pop()
                # under guidance the tapped features hold both branches ([x; x], timesteps [t; t])
                t_feat = t if feat_q.shape[0] == t.shape[0] else t.repeat(feat_q.shape[0] // t.shape[0])
                rel = self.relation(t_feat, feat_fp, feat_q)
                if rel is not None:
                    loss = loss + self.relation_weight(feat_q, eps_q) * rel
            opt.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            opt.step()
        sched.step()
        out = {"loss": float(loss.detach()), "eps_mse": float(task.detach()),
               "relation": float(rel.detach()) if rel is not None else float("nan")}
        self.history.append(out)
        n = len(self.history)
        # one optimizer update per sampling step: log by update, not by Lightning batch (= trajectory)
        if self.logger is not None and (n % self.cfg.log_every_n_steps == 0 or n == self.total_updates):
            metrics = {"qat/loss": out["loss"], "qat/eps_mse": out["eps_mse"],
                       "qat/lr_lora": opt.param_groups[0]["lr"]}
            if rel is not None:
                metrics["qat/relation"] = out["relation"]
            self.logger.log_metrics(metrics, step=n)
        if self.cfg.curve_every and (n % self.cfg.curve_every == 0 or n == self.total_updates):
            self.heldout_check(n)
        return out

    def heldout_check(self, n: int, logger=None) -> float:
        """Held-out ε-MSE after ``n`` updates (read-only: no RNG, no parameter touched), logged and kept."""
        err = distillation_error(self.student, self.teacher.teacher, self.diffusion_cfg, self.sampling_cfg,
                                 n=self.cfg.curve_samples)
        self.curve.append((n, err))
        lg = logger if logger is not None else (self.logger if self._trainer is not None else None)
        if lg:
            lg.log_metrics({"qat/heldout_eps_mse": err}, step=n)
        return err

    def training_step(self, batch, batch_idx):
        from pipeline.sampling import sample

        noise, labels = batch
        self.student.eval()  # no dropout / DiT label dropout: both models must see the real labels
        self.teacher.eval()
        if self.relation is not None:
            self.relation.start_trajectory()  # TRD: new windows; MTRD: the timestep memory is kept
        sample(self.teacher, noise, labels, self.diffusion_cfg, self.sampling_cfg, step_hook=self.distill_step,
               decode=False)
        self.teacher.cache = None
        return None


class _ProgressLog(L.Callback):
    def __init__(self, total_epochs: int):
        self.total, self.start = total_epochs, time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        h = pl_module.history[-pl_module.sampling_cfg.steps:]
        if h:
            log.info("qat: trajectory %d/%d  eps_mse %.5f  relation %.5f  %.0f s", batch_idx + 1, self.total,
                     sum(r["eps_mse"] for r in h) / len(h), sum(r["relation"] for r in h if r["relation"] == r["relation"])
                     / max(1, sum(1 for r in h if r["relation"] == r["relation"])), time.time() - self.start)


@torch.no_grad()
def distillation_error(student, teacher, diffusion, sampling, n: int = 32, seed: int = 0) -> float:
    """Mean ε-MSE of the student against the teacher along the teacher's trajectories from fixed noise
    (a held-out check, not used for training)."""
    from pipeline.sampling import initial_noise, sample

    dev = next(teacher.parameters()).device
    noise = initial_noise(n, teacher.sample_shape, 10_000 + seed).to(dev)
    labels = (torch.arange(n) % teacher.num_classes).to(dev)
    errs = []

    def hook(i, t, x, y):
        errs.append(float(F.mse_loss(student(x, t, y), teacher(x, t, y))))

    was = student.training
    student.eval()
    sample(teacher, noise, labels, diffusion, sampling, step_hook=hook, decode=False)
    student.train(was)
    return sum(errs) / len(errs)


def run_qat(student, teacher, diffusion, sampling, cfg: QATConfig, relation: str = "trd", logger=None,
            progress: bool = True) -> dict:
    """Fine-tune ``student`` (a DiffusionBackbone whose net holds the MPQ student) in place against the FP
    ``teacher``. Returns a summary: seconds, updates, parameter counts, losses per update."""
    torch.manual_seed(cfg.seed)
    module = TrajectoryDistillation(student, teacher, diffusion, sampling, cfg, relation)
    data = TrajectorySeeds(cfg.epochs, cfg.batch_size, teacher.sample_shape, teacher.num_classes, cfg.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)
    trainer = L.Trainer(accelerator="auto", devices=1, max_epochs=1, logger=logger or False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        log_every_n_steps=cfg.log_every_n_steps, callbacks=[_ProgressLog(cfg.epochs)] if progress else [],
                        num_sanity_val_steps=0, deterministic="warn")
    t0 = time.time()
    if cfg.curve_every:
        module.heldout_check(0, logger)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")
        warnings.filterwarnings("ignore", ".*training_step.*returned.*None.*")
        trainer.fit(module, loader)
    seconds = time.time() - t0
    module.remove_taps()
    for p in student.parameters():
        p.requires_grad_(False)
    student.eval()
    h = module.history
    steps = sampling.steps
    first = h[:steps]
    last = h[-steps:]
    extra = {"curve": list(module.curve)} if cfg.curve_every else {}
    return {**extra, "qat_seconds": seconds, "updates": len(h), "relation": module.relation_kind if module.relation else "none",
            "feature_module": module.feature_name, **module.param_summary,
            "eps_mse_first_epoch": sum(r["eps_mse"] for r in first) / max(len(first), 1),
            "eps_mse_last_epoch": sum(r["eps_mse"] for r in last) / max(len(last), 1),
            "history": h}
