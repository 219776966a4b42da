"""ONE sampling loop over diffusers schedulers, shared by calibration, QAT and evaluation.

For a model the pipeline trains itself, the forward process (betas) comes from
:class:`pipeline.config.DiffusionConfig` and the sampler from :class:`pipeline.config.SamplingConfig`.
A model loaded from a diffusers directory brings its own ``scheduler_config`` (betas, prediction type,
clipping, timestep spacing): ``sampling.scheduler: own`` samples with exactly the scheduler its diffusers
pipeline uses, and ``ddim`` / ``ddpm`` / ``dpm`` swap the class while keeping the model's settings
(diffusers' ``from_config``); ``sampling.steps`` and ``sampling.eta`` apply to both. Initial noise is
drawn on a CPU generator so every model, method and machine starts sample ``i`` from the same ``x_T``
(FP and quantized images are paired), scaled by the scheduler's ``init_noise_sigma``.

Choices for the self-trained models where the configs are silent:

* ``timestep_spacing="trailing"`` for every sampler: the first step starts at t = T-1 (pure noise),
  which the "leading" default of DDIM skips (Lin et al. 2024, "Common Diffusion Noise Schedules and
  Sample Steps are Flawed").
* DDIM/DDPM clip the predicted x0 to [-1, 1] (the data range), diffusers' default.
* DDIM uses ``set_alpha_to_one=True`` (the last step lands on the clean image).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from pipeline.config import DiffusionConfig, SamplingConfig

StepHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
SCHEDULERS = ("ddim", "ddpm", "dpm", "own")
_CLASSES = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "dpm": "DPMSolverMultistepScheduler"}


def _betas_kwargs(diffusion: DiffusionConfig) -> dict:
    return dict(
        num_train_timesteps=diffusion.num_train_timesteps,
        beta_schedule=diffusion.beta_schedule,
        beta_start=diffusion.beta_start,
        beta_end=diffusion.beta_end,
        prediction_type="epsilon",
    )


def make_training_scheduler(diffusion: DiffusionConfig):
    """The DDPM forward process (``add_noise``) matching :func:`make_scheduler`'s betas."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**_betas_kwargs(diffusion))


def make_scheduler(diffusion: DiffusionConfig, sampling: SamplingConfig, own: Optional[dict] = None):
    """A diffusers scheduler for ``sampling.scheduler`` with ``sampling.steps`` timesteps set. ``own``: the
    model directory's ``scheduler_config`` (module docstring); None for the self-trained models."""
    if sampling.scheduler not in SCHEDULERS:
        raise ValueError(f"sampling.scheduler: {sampling.scheduler!r} is not allowed (allowed values: "
                         f"{', '.join(SCHEDULERS)})")
    sched = _own_scheduler(own, sampling) if own is not None else _embedded_scheduler(diffusion, sampling)
    total = int(sched.config.num_train_timesteps)
    if not 0 < sampling.steps <= total:
        raise ValueError(f"sampling.steps: must be in 1..{total} (the model's num_train_timesteps), "
                         f"got {sampling.steps}")
    sched.set_timesteps(sampling.steps)
    return sched


def _own_scheduler(own: dict, sampling: SamplingConfig):
    import diffusers

    name = own.get("_class_name") if sampling.scheduler == "own" else _CLASSES[sampling.scheduler]
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"scheduler_config: unknown diffusers scheduler class {name!r}")
    return cls.from_config(own)


def _embedded_scheduler(diffusion: DiffusionConfig, sampling: SamplingConfig):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    kw = _betas_kwargs(diffusion)
    if sampling.scheduler == "ddim":
        return DDIMScheduler(**kw, clip_sample=True, set_alpha_to_one=True, timestep_spacing="trailing")
    if sampling.scheduler == "ddpm":
        return DDPMScheduler(**kw, clip_sample=True, timestep_spacing="trailing")
    if sampling.scheduler == "dpm":
        return DPMSolverMultistepScheduler(**kw, algorithm_type="dpmsolver++", solver_order=2,
                                           timestep_spacing="trailing")
    raise ValueError("sampling.scheduler: 'own' samples with a model directory's scheduler_config; the "
                     "self-trained models have none (use ddim, ddpm or dpm)")


def check_timesteps(timesteps, total: int, sampling: SamplingConfig) -> list[int]:
    """A custom timestep subsequence, validated: integers in [0, total) (the scheduler's num_train_timesteps),
    strictly decreasing (noisy end first), sampled with DDIM."""
    ts = [int(t) for t in timesteps]
    if not ts:
        raise ValueError("timesteps: must hold at least one timestep")
    bad = [t for t in ts if not 0 <= t < total]
    if bad:
        raise ValueError(f"timesteps: {bad} outside 0..{total - 1} (the model's num_train_timesteps)")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps: must be strictly decreasing (noisy end first), got {ts}")
    if sampling.scheduler != "ddim":
        raise ValueError(f"timesteps: a custom timestep subsequence needs sampling.scheduler 'ddim' "
                         f"(TMPQ-DM samples with DDIM), got {sampling.scheduler!r}")
    return ts


class _SubsequenceDDIM:
    """DDIM stepping along an arbitrary timestep subsequence ``t_0 > t_1 > ... > t_{K-1}``.

    diffusers' DDIM derives the previous timestep as ``t - T // num_inference_steps`` (uniform gaps).
    With ``num_inference_steps = 1`` that index is negative, so the step takes its "previous" alpha from
    ``final_alpha_cumprod``; setting that to ``alphas_cumprod[t_{i+1}]`` before each step (1.0 after the
    last, ``set_alpha_to_one``) runs diffusers' own update for any gap, eta > 0 included. On the stock
    schedule it is the stock sampler bit for bit when ``steps`` divides T (tested); otherwise diffusers
    steps to ``t - T // steps``, one off the trailing schedule's next timestep, and this class to the
    next timestep itself."""

    def __init__(self, sched, timesteps: list[int]):
        self.sched = sched
        self.timesteps = torch.tensor(timesteps, dtype=torch.long)
        self._final = sched.final_alpha_cumprod
        self._next = {t: n for t, n in zip(timesteps, timesteps[1:])}

    def scale_model_input(self, x, t):
        return self.sched.scale_model_input(x, t)

    def step(self, eps, t, x, **kw):
        nxt = self._next.get(int(t))
        self.sched.num_inference_steps = 1
        self.sched.final_alpha_cumprod = self._final if nxt is None else self.sched.alphas_cumprod[nxt]
        return self.sched.step(eps, t, x, **kw)


def timestep_values(diffusion: DiffusionConfig, sampling: SamplingConfig, own: Optional[dict] = None) -> list[int]:
    """The sampler's timesteps, noisy end first (``own``: a model directory's scheduler_config)."""
    return [int(t) for t in make_scheduler(diffusion, sampling, own).timesteps]


def initial_noise(n: int, sample_shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal ``x_T`` [n, *sample_shape] from a seeded CPU generator (identical everywhere)."""
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn((int(n), *(int(s) for s in sample_shape)), generator=g, dtype=torch.float32)


def eval_labels(n: int, num_classes: int) -> torch.Tensor:
    """Balanced labels ``i % num_classes`` (int64 [n])."""
    if num_classes < 1:
        raise ValueError(f"num_classes: must be >= 1, got {num_classes}")
    return torch.arange(int(n), dtype=torch.long) % int(num_classes)


def _step_kwargs(sched, sampling: SamplingConfig, gen: torch.Generator) -> dict:
    """``eta`` and the noise generator, for the schedulers whose ``step`` takes them (as diffusers'
    pipelines decide, by the signature)."""
    import inspect

    params = inspect.signature(sched.step).parameters
    kw: dict = {}
    if "eta" in params:
        kw["eta"] = sampling.eta
    if "generator" in params:
        kw["generator"] = gen
    return kw


def sample(
    backbone: torch.nn.Module,
    noise: torch.Tensor,
    labels: Optional[torch.Tensor],
    diffusion: DiffusionConfig,
    sampling: SamplingConfig,
    step_hook: Optional[StepHook] = None,
    progress: bool = False,
    seed: int = 0,
    timesteps: Optional[Sequence[int]] = None,
    decode: bool = True,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Run the reverse process from ``noise`` -> images in [-1, 1] (on the backbone's device).

    ``step_hook(step_index, t [B], x_t, labels)`` runs before the model predicts at each step; the
    model call itself runs under ``torch.no_grad()`` (a hook may enable grad for its own work).
    The backbone is put in eval mode for the loop (diffusers' DiT would otherwise drop labels) and
    its previous mode is restored afterwards. ``seed`` drives the extra noise of stochastic samplers
    (DDPM, DDIM with eta > 0) so their runs are repeatable too; ``generator`` (a CPU generator) replaces
    it, e.g. to continue the stream ``noise`` was drawn from, as a diffusers pipeline does. ``timesteps``:
    run DDIM on this subsequence (strictly decreasing) instead of the ``sampling.steps`` timesteps
    (TMPQ-DM's reduced schedules); ``step_index`` then counts along it. The model's own scheduler
    (``backbone.scheduler_config``) is used when it has one. A latent model's result is decoded by its
    autoencoder (``decode=False`` returns the final latents instead, unclamped).
    """
    if noise.ndim != 4:
        raise ValueError(f"noise: expected [B, C, H, W], got shape {tuple(noise.shape)}")
    if labels is not None and labels.shape[0] != noise.shape[0]:
        raise ValueError(f"labels: expected {noise.shape[0]} labels (one per noise sample), got {labels.shape[0]}")
    try:
        device = next(backbone.parameters()).device
    except StopIteration:
        device = noise.device
    own = getattr(backbone, "scheduler_config", None)
    sched = make_scheduler(diffusion, sampling, own)
    if timesteps is not None:
        sched = _SubsequenceDDIM(sched, check_timesteps(timesteps, int(sched.config.num_train_timesteps), sampling))
    x = noise.to(device=device, dtype=torch.float32)
    sigma = float(getattr(sched, "init_noise_sigma", 1.0))
    if sigma != 1.0:
        x = x * sigma
    labels = labels.to(device) if labels is not None else None
    gen = generator if generator is not None else torch.Generator(device="cpu").manual_seed(int(seed))
    step_kw = _step_kwargs(sched.sched if isinstance(sched, _SubsequenceDDIM) else sched, sampling, gen)
    timesteps = sched.timesteps
    it = enumerate(timesteps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(list(it), desc="sampling", leave=False)
    was_training = backbone.training
    backbone.eval()
    try:
        for i, t in it:
            t_batch = torch.full((x.shape[0],), int(t), dtype=torch.long, device=device)
            if step_hook is not None:
                step_hook(i, t_batch, x, labels)
            with torch.no_grad():
                model_in = sched.scale_model_input(x, t)
                eps = backbone(model_in, t_batch, labels)
                x = sched.step(eps, t, x, **step_kw).prev_sample
    finally:
        backbone.train(was_training)
    if not decode:
        return x
    return backbone.decode(x) if hasattr(backbone, "decode") else x.clamp(-1.0, 1.0)
