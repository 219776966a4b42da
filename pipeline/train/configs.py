"""Hyper-parameter dataclasses of the training loops, kept free of torch and Lightning imports so that
the ``validate`` stage (and ``--help``) can parse every params section in seconds. The loops themselves
are :mod:`pipeline.train.recon` (block reconstruction) and :mod:`pipeline.train.qat` (trajectory QAT)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pipeline.config import ConfigError


@dataclass
class ReconConfig:
    """Reconstruction hyper-parameters (BRECQ / Q-Diffusion names in brackets).

    iters: optimisation steps per unit [``iters_w``; FP4DiT ``--cali_iters 2500``, Q-Diffusion 20000].
    batch_size: cached inputs per step [``batch_size``; FP4DiT 16, Q-Diffusion 32].
    lr: Adam learning rate of the rounding logits [Adam default 1e-3].
    reg_weight: λ of the rounding regulariser [``weight`` 0.01].
    beta_start / beta_end / warmup: β schedule [``b_range`` (20, 2), ``warmup`` 0.2].
    asym: unit inputs from the quantized-so-far model (True) or from the FP model.
    act_quant: keep activation quantization on while reconstructing (off in Q-Diffusion's weight phase).
    max_inputs: use at most this many calibration inputs (a seeded random subset; None = all).
    chunk_size: batch size of the partial forwards that cache inputs / targets.
    error_inputs: cached inputs (a seeded random subset) on which the unit's output error is reported
        before (round to nearest) and after reconstruction.
    seed: batch sampling seed. log_every: Lightning ``log_every_n_steps``.
    curve_every: > 0: hold out ``curve_inputs`` calibration inputs (a seeded random subset, not used for
        training) and log every unit's held-out output error with hard rounding every ``curve_every``
        iterations (and at 0 and the end) as ``recon/<unit>/heldout``; 0 = off (training unchanged).
    """

    iters: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    reg_weight: float = 0.01  # BRECQ / Q-Diffusion default (pipeline.quant.adaround.REG_WEIGHT)
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    asym: bool = True
    act_quant: bool = False
    max_inputs: Optional[int] = None
    chunk_size: int = 128
    error_inputs: int = 128
    seed: int = 0
    log_every: int = 10
    curve_every: int = 0
    curve_inputs: int = 64

    def __post_init__(self) -> None:
        self.validate("ReconConfig")

    def validate(self, p: str) -> None:
        for name in ("iters", "batch_size", "chunk_size", "error_inputs", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{p}.{name}: must be a positive int, got {v!r}")
        for name in ("curve_every", "curve_inputs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{p}.{name}: must be an int >= 0, got {v!r}")
        if self.max_inputs is not None and (not isinstance(self.max_inputs, int) or self.max_inputs < 1):
            raise ConfigError(f"{p}.max_inputs: must be a positive int or None, got {self.max_inputs!r}")
        if not self.lr > 0:
            raise ConfigError(f"{p}.lr: must be > 0, got {self.lr!r}")
        if self.reg_weight < 0:
            raise ConfigError(f"{p}.reg_weight: must be >= 0, got {self.reg_weight!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"{p}.warmup: must be in [0, 1), got {self.warmup!r}")


@dataclass
class QATConfig:
    """``qat``: the trajectory-distillation schedule (params section ``qat``).

    epochs: teacher trajectory batches (MPQ-DM: 800); each gives ``sampling.steps`` updates.
    batch_size: trajectories per batch (MPQ-DM: 4 classes, doubled by CFG).
    lora_lr: fixed LoRA learning rate, or null for the scale-aware ``lora_lr_scale`` × mean Δ per layer
        (MPQ-DM / EfficientDM: 1/2500).
    match_lora_step: scale the LoRA rate of non-zero-initialised (SVD) factors so one update changes B·A as much
        as it does from MPQ-DM's zero init (:func:`lora_step_match`; ours — without it the SVD-initialised runs
        were noticeably worse at equal rates).
    weight_quant_lr: Δ, z (and residual α) of the weight quantizers (MPQ-DM: 1e-6).
    act_quant_lr: per-timestep Δ_t, z_t of the activation quantizers (MPQ-DM: 5e-4).
    weight_decay: AdamW weight decay on the LoRA factors (torch default 0.01, as in MPQ-DM).
    relation_weight: weight of the relation loss (0 turns it off); null = MPQ-DM's weighting: its code sums
        the ε error over C·H·W values and the relation KL over P pixel rows with factor 100, i.e. in our
        mean units 100·P / (C·H·W) (100 for the 8×8 UNet, 25 for LDM-4's 1024-pixel decoder output).
    trd_window: TRD's N consecutive steps (MPQ-DM: 2). memory_length: MTRD entries (teacher pixel embeddings of
        past images) per timestep bucket (:class:`pipeline.train.relation.MemoryRelationLoss`).
    memory_decay: MTRD weight decay^age of older entries of a bucket (1 = uniform). temperature: relation softmax τ.
    feature_module: module (name inside the diffusers net) whose output is the relation feature; null = auto.
    check_samples: trajectories of the held-out ε-MSE check before/after QAT in the stage (0 = skip).
    curve_every: > 0: every ``curve_every`` updates (and before the first, and after the last) the held-out
        ε-MSE (:func:`distillation_error`, ``curve_samples`` fixed trajectories, seed 10 000, disjoint from the
        training seeds) is logged as ``qat/heldout_eps_mse`` and returned as ``curve``; 0 = off. The check
        only reads the models: the trained student is the same with and without it.
    seed: trajectory noise / labels (MPQ-DM: 3407, + epoch).
    """

    epochs: int = 6
    batch_size: int = 16
    lora_lr: Optional[float] = None
    lora_lr_scale: float = 0.02
    match_lora_step: bool = True
    weight_quant_lr: float = 1.0e-4
    act_quant_lr: float = 1.0e-3
    weight_decay: float = 0.01
    relation_weight: Optional[float] = None
    trd_window: int = 2
    memory_length: int = 4
    memory_decay: float = 1.0
    temperature: float = 1.0
    feature_module: Optional[str] = None
    log_every_n_steps: int = 5
    check_samples: int = 16
    curve_every: int = 0
    curve_samples: int = 8
    seed: int = 3407

    def validate(self, p: str) -> None:
        for name in ("epochs", "batch_size", "trd_window", "log_every_n_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{p}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.relation_weight is not None and self.relation_weight < 0:
            raise ConfigError(f"{p}.relation_weight: must be >= 0 or null (MPQ-DM weighting), got {self.relation_weight}")
        for name in ("lora_lr_scale", "weight_quant_lr", "act_quant_lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{p}.{name}: must be >= 0, got {getattr(self, name)}")
        if self.lora_lr is not None and self.lora_lr < 0:
            raise ConfigError(f"{p}.lora_lr: must be >= 0 or null (scale-aware), got {self.lora_lr}")
        if self.curve_every < 0 or self.curve_samples < 1:
            raise ConfigError(f"{p}.curve_every / curve_samples: must be >= 0 / >= 1, got "
                              f"{self.curve_every} / {self.curve_samples}")
        if self.check_samples < 0:
            raise ConfigError(f"{p}.check_samples: must be >= 0 (0 = skip), got {self.check_samples}")
        if self.memory_length < 0:
            raise ConfigError(f"{p}.memory_length: must be >= 0, got {self.memory_length}")
        if not 0.0 < self.memory_decay <= 1.0:
            raise ConfigError(f"{p}.memory_decay: must be in (0, 1], got {self.memory_decay}")
        if self.temperature <= 0:
            raise ConfigError(f"{p}.temperature: must be > 0, got {self.temperature}")


@dataclass
class BlockDistillConfig:
    """Block-wise knowledge distillation (DilateQuant BKD; :func:`pipeline.train.recon.distill_model`).

    iters: Adam steps per unit (DilateQuant: 5 000 iterations in total, batch 32).
    batch_size: cached unit inputs per step (DilateQuant: 32).
    weight_lr: the latent weights W (straight-through through the weight quantizer). DilateQuant reports
        1e-2 for weight fine-tuning (third-party summary, flagged as suspicious there); with Adam that moves
        every weight by ~1e-2 per step, several 4-bit steps of a typical layer, so our default is 100x smaller.
    weight_quant_lr: Δ_w, z_w of the weight quantizers (DilateQuant: 1e-4 for the quantization parameters).
    act_quant_lr: the per-timestep Δ_x, z_x of the activation quantizers (DilateQuant: 1e-4; ours 1e-3, as
        MPQ-DM's ``act_quant_lr``, for the short default schedule). How the three defaults were picked:
        ``docs/measurements.md``, *DilateQuant learning rates*.
    asym: unit inputs from the quantized-so-far model (True, the BKD chain B̂_k∘…∘B̂_1) or from the FP model.
    max_inputs: use at most this many calibration inputs (a seeded random subset; None = all).
    chunk_size: batch size of the partial forwards that cache inputs / targets.
    error_inputs: cached inputs on which the unit's output MSE is reported before and after distillation.
    seed: batch order. log_every: Lightning ``log_every_n_steps``.
    """

    iters: int = 40
    batch_size: int = 32
    weight_lr: float = 1.0e-4
    weight_quant_lr: float = 1.0e-4
    act_quant_lr: float = 1.0e-3
    asym: bool = True
    max_inputs: Optional[int] = None
    chunk_size: int = 128
    error_inputs: int = 128
    seed: int = 0
    log_every: int = 10

    def group_lrs(self) -> dict:
        """Learning rate of each trained parameter group (the keys of ``recon.unit_trainables``)."""
        return {"weight": self.weight_lr, "weight_quant": self.weight_quant_lr, "act_quant": self.act_quant_lr}

    def validate(self, p: str) -> None:
        for name in ("batch_size", "chunk_size", "error_inputs", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{p}.{name}: must be a positive int, got {v!r}")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 0:
            raise ConfigError(f"{p}.iters: must be an int >= 0 (0 = no distillation), got {self.iters!r}")
        if self.max_inputs is not None and (isinstance(self.max_inputs, bool) or not isinstance(self.max_inputs, int)
                                            or self.max_inputs < 1):
            raise ConfigError(f"{p}.max_inputs: must be a positive int or None, got {self.max_inputs!r}")
        for name in ("weight_lr", "weight_quant_lr", "act_quant_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"{p}.{name}: must be a number >= 0 (0 = frozen), got {v!r}")
