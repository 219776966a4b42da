"""MPQ-DM and MPQ-DMv2: mixed-precision (residual) quantization + LoRA quantization-aware fine-tuning.

Papers: MPQ-DM, Feng et al., AAAI 2025, arXiv 2412.11549 (official code ``cantbebetter2/MPQ-DM``);
MPQ-DMv2, arXiv 2507.04290 (no public code; only the abstract/introduction could be read — every v2
component below is our reasoned design, marked [INFER]).
What it quantizes: every nn.Linear / nn.Conv2d to W<b> integers (asymmetric, per output channel, learnable
step and zero point, MSE init) with intra-layer mixed precision (at W2 the 1-bit group is binary), their inputs and the attention matmul
operands to A<b> integers with one learnable (Δ_t, z_t) per sampling step; input/output layers and the
embedding paths stay at 8 bits without LoRA (MPQ-DM's ``set_first_last_layer_to_8bit``; our
``default_rules``). This file is the *initialisation* (calibration-based) half; the QAT half
(trajectory distillation with the relation losses) is :mod:`pipeline.train.qat`.

Algorithm (``quantize`` below, in this order):

1. Surgery: wrap the layers (``quantize_model``) with timestep-indexed activation quantizers over the
   sampler's timesteps (EfficientDM TALSQ, arXiv 2310.03270 / DilateQuant TPQ, arXiv 2409.14307).
2. Pre-scale (MPQ-DM OMQ step 1, official code): per input channel j, s_j = sqrt(max|X_j| / max|W_j|) from
   the layer's calibration inputs X; the layer computes Q_a(X / s) ⊛ Q_w(W · diag(s)) (core ``in_scale``).
   We take the max over ``calib_inputs`` calibration inputs, one batch (the code uses its first batch of 32);
   X comes from where ``omq_inputs`` says (step 5).
3. Kurtosis ranking (OMQ step 2): κ_i = E[(w − μ_i)^4] / σ_i^4 of each output channel of the pre-scaled weight.
4. Mixed groups (OMQ step 3): the top-k kurtosis channels are *salient*, the bottom-k get b−1 bits, the rest b.
   - ``salient="extra_bit"`` (MPQ-DM): salient channels get a (b+1)-bit quantizer.
   - ``salient="residual"`` (MPQ-DMv2 flexible residual mixed quantization, FZ-RMQ, [INFER]): salient
     channels get the b-bit base quantizer plus a learnable binary residual α ⊙ sign(W − Q_b(W))
     (core ``BinaryResidual``, α = mean |residual| per channel at init): a non-uniform grid {q ± α} with
     the same b+1 stored bits per weight as OMQ's salient group. "Z-order" in the paper's name is
     unexplained in the abstract and not modelled.
   Average bits stay b. At W2 the b−1 = 1-bit group is the core's :class:`BinaryQuantizer`
   (Q(w) = μ + α·sign(w − μ) per channel, μ = channel mean, α = mean |w − μ|, both learnable like Δ and z;
   a 1-bit *uniform* grid would be just {min, max}), so W2 layers get MPQ-DM's {1, 2, 3}-bit groups
   (``residual``: {1, 2, 2 + residual}) with the same k search as any other width; it is stored as one sign
   bit per weight + (μ, α) per channel and counted as 1 bit (BitOPs, bytes, packing). The official code
   builds a 1-bit ``UniformAffineQuantizer`` there (the constructor's 2..8-bit assert is commented out): a
   two-level grid at the ends of the channel's [min(w, 0), max(w, 0)] range; we use the binary form instead
   (ours: the mean-centred, L2-fitted levels are the standard 1-bit weight quantizer, XNOR-Net / BinaryDM).
   1 bit is a weight-group width only: W1 settings, 1-bit activations and 1-bit integer grids stay rejected. W8 has no 9-bit group (extra_bit
   then only allows k = 0; the residual works).
5. k search (OMQ step 4, official ``QuantModule.forward`` first call): k ∈ {round(f·C_out) for f in
   ``omq_fractions``} (paper: 0, 10 %, …, 50 %; the released code only 0 and 10 %), keeping the k whose
   quantized layer output op(X/s, Ŵ_k) is closest (MSE) to op(X, W) on the calibration inputs X (ties: the
   smaller k). As in the code:
   - the candidates' quantizers are calibrated with min-max ranges (``omq_init: minmax``; the code's
     candidates use ``scale_method='max'``), the winner is then re-built with ``weight_init`` (MSE by
     default; the code's final quantizers use its configured weight init). ``omq_init: mse`` ranks the
     candidates with ``weight_init`` ranges instead;
   - X is what the layer receives from the *quantized-so-far* network (``omq_inputs: quantized``; the code
     searches inside each layer's first forward of its naive-quantization pass, ``quantize_ldm_naive.py``):
     one forward of the calibration batch with weight quantization on, in which each target layer is
     searched when reached, so every later layer sees the groups already chosen upstream (and the 8-bit
     first/last/embedding layers); the target is op(X, W) on the same X, as in the code.
     ``omq_inputs: fp`` takes X from the FP network instead.
     Remaining deviation: the code's pass also quantizes activations (``set_quant_state(True, True)``), with
     per-tensor ranges initialised on the fly from that same batch; ours keeps activations unquantized in
     the pass, because our per-timestep activation ranges are calibrated afterwards (step 6) on
     ``act_calib_batches`` batches with the final weights — X therefore carries the upstream weight error
     but not the upstream activation error.
   Activation quantization is not part of the comparison (the code's search also feeds the unquantized,
   pre-scaled input ``input * activation_scale``).
6. Activation calibration on the calibration set (per-timestep MSE init by default; weights quantized).
7. LoRA of rank r on every b-bit layer (MPQ-DM ``QuantModule_lora``: inside the quantizer,
   Ŵ = Q((W + B·A)·diag(s)); conv LoRA is the per-kernel-position product; the effective rank is capped
   at min(out, in) per position since larger ranks add nothing):
   - ``lora_init="zero"`` (MPQ-DM): A Kaiming-uniform, B = 0.
   - ``lora_init="svd"`` (MPQ-DMv2 object-oriented low-rank initialisation, OOLRI, [INFER]): B, A from the
     truncated SVD of the layer's quantization error after pre-scale, E = W̃ − Q(W̃) ≈ U_r Σ_r V_rᵀ,
     B = U_r Σ_r^½, A = Σ_r^½ V_rᵀ diag(1/s) (LoftQ split; per kernel position for convs). So that the
     student starts from exactly the MPQ-DM starting point, the frozen weight keeps the remainder
     W − B·A (our choice, PiSSA-style split: the latent weight W + B·A is unchanged at init, nothing the FP
     weight knows is lost, and both factors are non-zero and span the error's principal subspace, so
     fine-tuning starts in the directions where quantization hurts instead of in a random subspace).
     Merging after QAT is exact (the core's ``merge_lora``).
8. The fine-tune phase (:func:`finetune`, the loop in :mod:`pipeline.train.qat`) trains LoRA, the weight
   quantizers (Δ, z; binary μ, α; residual α) and the activation quantizers along the FP teacher's DDIM trajectories with
   ε-MSE + a relation loss: ``relation="trd"`` (MPQ-DM TRD) or ``relation="memory"`` (MPQ-DMv2 MTRD) —
   see :mod:`pipeline.train.relation` — and merges LoRA exactly before packing.

Family ``mpq`` (params section ``mpq``, options :class:`MPQConfig`, QAT options under ``mpq.qat``).
Variants (each a results row): ``mpqdm`` (v1: OMQ + TRD, zero-init LoRA), ``mpqdm2`` (residual + SVD init +
memory), and v2 with one component replaced by its MPQ-DM counterpart: ``mpqdm2_no_residual`` (OMQ's
b+1-bit salient group), ``mpqdm2_no_lora_init`` (zero-init LoRA), ``mpqdm2_no_memory`` (TRD), and ``efficientdm`` (EfficientDM-style base: no OMQ — no pre-scale, one b-bit
quantizer — zero-init LoRA, no relation loss). The first
phase (steps 1-7) ends with LoRA un-merged; the runner keeps it as the core's student checkpoint and
rebuilds it exactly for the fine-tune phase, so changing ``mpq.qat`` never redoes steps 1-7.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import WEIGHT_BITS, ConfigError, choice
from ..train.configs import QATConfig
from . import Claim, Family, MethodContext, QuantResult, Table, Variant, register_family

SALIENT_MODES = ("extra_bit", "residual")
OMQ_MODES = ("none",) + SALIENT_MODES  # "none": no OMQ at all (no pre-scale, no mixed groups): EfficientDM
LORA_INITS = ("zero", "svd")
RELATIONS = ("trd", "memory", "none")
OMQ_INITS = ("minmax", "mse")  # range init of the k-search candidates (official code: min-max)
OMQ_INPUTS = ("quantized", "fp")  # k-search inputs from the quantized-so-far network (official) or the FP one


@dataclass
class MPQConfig:
    """Options of the MPQ-DM family (params section ``mpq``), shared by all variants.

    lora_rank: LoRA rank r (paper 32 on LDM-4; capped per layer at min(out, in)).
    omq_fractions: candidate fractions of output channels for the salient / demoted groups (k search).
    prescale: the OMQ per-input-channel pre-scale (turn off for an ablation).
    weight_init / act_init: quantizer range init (MPQ-DM: mse = 80-step shrink search, L_2.4). The weight
        quantizers finally installed by OMQ use ``weight_init`` (the 1-bit binary group: its closed form).
    omq_init: range init of the *candidate* quantizers compared in the OMQ k search (official code: min-max,
        ``scale_method='max'``; "mse" = ``weight_init``-style search).
    omq_inputs: where the k search takes each layer's inputs X from: "quantized" (official code: the
        quantized-so-far network — every earlier layer already carries its chosen groups, activations
        unquantized) or "fp" (the FP network).
    keep_first_last_bits: bits of input/output/embedding layers (0 = keep them FP). They get no LoRA.
    calib_inputs: calibration inputs used for the pre-scale and the k search (MPQ-DM: 32; the quantized-so-far
        pass runs them as one batch).
    act_calib_batches: batches of 64 calibration inputs for the activation ranges.
    act_mse_samples: values kept per timestep (per quantizer) for the activation MSE search (core default 4096).
    seed: which calibration inputs are drawn (and LoRA A's Kaiming init).
    qat: the fine-tune phase (:class:`pipeline.train.configs.QATConfig`); changing it never redoes the
        calibration-based first phase.
    salient / lora_init / relation: the method's parts, which the rows set (:data:`VARIANTS`; defaults = MPQ-DM
        v1): the salient-channel treatment of OMQ ("extra_bit" = b±1-bit groups, "residual" = MPQ-DMv2's binary
        residual, "none" = no OMQ: one b-bit quantizer, no pre-scale), the LoRA init ("zero" or "svd") and the
        QAT relation loss ("trd", "memory" or "none").
    """

    lora_rank: int = 8
    omq_fractions: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    prescale: bool = True
    weight_init: str = choice("minmax", "mse", default="mse")
    act_init: str = choice("minmax", "mse", default="mse")
    omq_init: str = choice(*OMQ_INITS, default="minmax")
    omq_inputs: str = choice(*OMQ_INPUTS, default="quantized")
    keep_first_last_bits: int = 8
    calib_inputs: int = 64
    act_calib_batches: int = 4
    act_mse_samples: int = 1024
    seed: int = 0
    qat: QATConfig = field(default_factory=lambda: QATConfig(epochs=8, check_samples=0))
    salient: str = choice(*OMQ_MODES, default="extra_bit")
    lora_init: str = choice(*LORA_INITS, default="zero")
    relation: str = choice(*RELATIONS, default="trd")

    def validate(self, p: str) -> None:
        if self.lora_rank < 0:
            raise ConfigError(f"{p}.lora_rank: must be >= 0 (0 = no LoRA), got {self.lora_rank}")
        if not self.omq_fractions:
            raise ConfigError(f"{p}.omq_fractions: list at least one fraction (0.0 = no mixed groups)")
        for i, f in enumerate(self.omq_fractions):
            if not 0.0 <= f <= 0.5:
                raise ConfigError(f"{p}.omq_fractions[{i}]: must be in [0, 0.5] (top-k and bottom-k groups "
                                  f"of k = fraction x channels must fit), got {f}")
        if self.keep_first_last_bits not in (0, *WEIGHT_BITS):
            raise ConfigError(f"{p}.keep_first_last_bits: must be 0 (FP) or one of {list(WEIGHT_BITS)}, "
                              f"got {self.keep_first_last_bits}")
        for name, allowed in (("omq_init", OMQ_INITS), ("omq_inputs", OMQ_INPUTS),
                              ("weight_init", ("minmax", "mse")), ("act_init", ("minmax", "mse"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{p}.{name}: must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for name in ("calib_inputs", "act_calib_batches", "act_mse_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{p}.{name}: must be >= 1, got {getattr(self, name)}")


V1 = {"salient": "extra_bit", "lora_init": "zero", "relation": "trd"}
V2 = {"salient": "residual", "lora_init": "svd", "relation": "memory"}
VARIANTS = {
    "mpqdm": V1,
    "mpqdm2": V2,
    "mpqdm2_no_residual": {**V2, "salient": "extra_bit"},
    "mpqdm2_no_lora_init": {**V2, "lora_init": "zero"},
    "mpqdm2_no_memory": {**V2, "relation": "trd"},
    # EfficientDM-style LoRA QAT (arXiv 2310.03270): MPQ-DM minus OMQ (no pre-scale, one b-bit quantizer) and
    # minus TRD; zero-init LoRA. The reference row every MPQ-DM / MPQ-DMv2 gain is measured against.
    "efficientdm": {"salient": "none", "lora_init": "zero", "relation": "none"},
}


# ------------------------------------------------------------------------------------------------
# OMQ building blocks (pure functions, tested on their own)
# ------------------------------------------------------------------------------------------------
def input_channel_absmax(x: torch.Tensor, conv: bool) -> torch.Tensor:
    """max |x| per input channel: conv inputs [B, C, H, W] -> over (B, H, W); linear inputs [..., C] -> over the rest."""
    x = x.detach().abs()
    if conv:
        return x.transpose(0, 1).reshape(x.shape[1], -1).amax(dim=1)
    return x.reshape(-1, x.shape[-1]).amax(dim=0)


def prescale_vector(x_absmax: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """OMQ / SmoothQuant(α=0.5) pre-scale s_j = sqrt(max|X_j| / max|W_j|) per input channel.

    ``weight`` is [out, in] or [out, in, kh, kw]; channels with a zero maximum on either side get s = 1."""
    w_absmax = weight.detach().abs().transpose(0, 1).reshape(weight.shape[1], -1).amax(dim=1)
    x_absmax = x_absmax.to(w_absmax)
    valid = (x_absmax > eps) & (w_absmax > eps)
    s = torch.sqrt(x_absmax.clamp_min(eps) / w_absmax.clamp_min(eps))
    return torch.where(valid, s, torch.ones_like(s)).clamp(1e-4, 1e4)


def channel_kurtosis(weight: torch.Tensor) -> torch.Tensor:
    """Kurtosis E[(w − μ)^4] / σ^4 of every output channel (dim 0) of a weight (population moments)."""
    w = weight.detach().reshape(weight.shape[0], -1).double()
    d = w - w.mean(dim=1, keepdim=True)
    var = d.pow(2).mean(dim=1)
    return (d.pow(4).mean(dim=1) / var.pow(2).clamp_min(1e-24)).float()


def group_bits(bits: int) -> tuple[int, int]:
    """(bits of the demoted group, bits of the promoted group) around ``bits``. The demoted group of W2 is
    the 1-bit :class:`~pipeline.quant.primitives.BinaryQuantizer`; the promoted group is limited to the
    core's integer range (W8 has no 9-bit group, see module doc)."""
    from ..quant.primitives import BINARY_BITS, INT_BITS

    return max(bits - 1, BINARY_BITS), min(bits + 1, INT_BITS[-1])


def omq_masks(kurtosis: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, middle, bottom) bool masks: the k largest-κ channels, the rest, the k smallest-κ channels."""
    c = kurtosis.numel()
    if not 0 <= 2 * k <= c:
        raise ValueError(f"k must satisfy 0 <= 2k <= channels ({c}), got k={k}")
    order = torch.argsort(kurtosis, descending=True, stable=True)
    top = torch.zeros(c, dtype=torch.bool)
    bottom = torch.zeros(c, dtype=torch.bool)
    top[order[:k]] = True
    if k:
        bottom[order[c - k:]] = True
    return top, ~(top | bottom), bottom


def candidate_ks(num_channels: int, fractions: Sequence[float]) -> list[int]:
    """Distinct k = round(f · C) (0 always first), each with 2k <= C."""
    ks = [0]
    for f in fractions:
        k = int(round(f * num_channels))
        if 2 * k <= num_channels and k not in ks:
            ks.append(k)
    return ks


def channel_quantizer_params(weight: torch.Tensor, bits: int, symmetric: bool = False, init: str = "mse") -> dict:
    """Per-output-channel (scale, zero_point) of a ``bits``-bit quantizer calibrated on ``weight``
    ((mu, alpha) of the binary quantizer for ``bits`` = 1, whose closed form ignores ``init``).

    Per-channel calibration (min-max or the MSE search) treats every channel on its own, so a masked
    quantizer gets exactly these values on its channels: the k search calibrates each width once per layer."""
    from ..quant.primitives import BINARY_BITS, BinaryQuantizer, IntQuantizer

    if bits == BINARY_BITS:
        b = BinaryQuantizer()
        b.calibrate(weight.detach())
        return {"mu": b.mu.detach(), "alpha": b.alpha.detach()}
    q = IntQuantizer(bits, symmetric=symmetric, granularity="channel", ch_axis=0, init=init)
    q.calibrate(weight.detach())
    return {"scale": q.scale.detach(), "zero_point": q.zero_point.detach()}


def build_mixed_quantizers(weight: torch.Tensor, bits: int, kurtosis: torch.Tensor, k: int, salient: str,
                           symmetric: bool = False, init: str = "mse", learnable: bool = True,
                           params: Optional[dict] = None):
    """Calibrated weight quantizers (+ residual) of one candidate k on the (pre-scaled) ``weight``.

    k = 0 -> one unmasked b-bit quantizer. Otherwise three masked quantizers: top-k at b+1 bits
    (``salient="extra_bit"``) or at b bits with a :class:`BinaryResidual` on them (``"residual"``),
    the middle at b, the bottom-k at b−1 (a 1-bit :class:`BinaryQuantizer` when b = 2).
    ``params``: {bits: channel_quantizer_params(...)} cache (for one ``init``).
    Returns (quantizers, residual or None)."""
    from ..quant.primitives import BINARY_BITS, BinaryQuantizer, BinaryResidual, IntQuantizer

    if salient not in SALIENT_MODES:
        raise ValueError(f"salient must be one of {list(SALIENT_MODES)}, got {salient!r}")
    w = weight.detach()
    cache = params if params is not None else {}

    def make(b, mask=None):
        if b not in cache:
            cache[b] = channel_quantizer_params(w, b, symmetric, init)
        if b == BINARY_BITS:
            q = BinaryQuantizer(learnable=learnable, channel_mask=mask)
        else:
            q = IntQuantizer(b, symmetric=symmetric, granularity="channel", ch_axis=0, init=init,
                             learnable=learnable, channel_mask=mask)
        state = dict(cache[b])
        if mask is not None:
            state["channel_mask"] = mask
        q.load_state_dict(state)
        return q.to(w.device)

    if k == 0:
        return [make(bits)], None
    lo_bits, hi_bits = group_bits(bits)
    top, mid, bottom = omq_masks(kurtosis.cpu(), k)
    if salient == "extra_bit" and hi_bits > bits:
        return [make(hi_bits, top), make(bits, mid), make(lo_bits, bottom)], None
    quantizers = [make(bits, top), make(bits, mid), make(lo_bits, bottom)]
    residual = None
    if salient == "residual":
        residual = BinaryResidual(w.shape[0], top).to(w.device)
        w_q = sum(q(w) for q in quantizers)
        residual.init_from(w, w_q)
    return quantizers, residual


def quantized_from(quantizers, residual, weight: torch.Tensor) -> torch.Tensor:
    """Σ_g Q_g(W) (+ residual) — the layer's quantized weight for a candidate, without installing it."""
    w_q = quantizers[0](weight)
    for q in quantizers[1:]:
        w_q = w_q + q(weight)
    if residual is not None:
        w_q = w_q + residual(weight, w_q)
    return w_q


def omq_search(layer, inputs: torch.Tensor, bits: int, fractions: Sequence[float], salient: str,
               init: str = "mse", symmetric: bool = False, candidate_init: Optional[str] = None):
    """OMQ k search on one wrapped layer (its ``in_scale`` already set): for every candidate k, the MSE
    between op(X, W) and op(X / s, Ŵ_k) on the given inputs X, with the candidates' quantizers calibrated
    with ``candidate_init`` (default: ``init``; the official code uses min-max). The winner's quantizers are
    then built with ``init`` (official code: its configured weight init). Ties keep the smaller k.
    Returns (best_k, {k: mse}, (quantizers, residual) of best)."""
    lo_bits, hi_bits = group_bits(bits)
    if lo_bits == bits or (hi_bits == bits and salient == "extra_bit"):
        fractions = [0.0]  # no b−1 (or b+1) grid available: mixed groups would change the average bits
    cand_init = init if candidate_init is None else candidate_init
    with torch.no_grad():
        w_fp = layer.weight.detach()
        w_scaled = layer.effective_weight().detach()
        kurt = channel_kurtosis(w_scaled)
        ks = candidate_ks(w_fp.shape[0], fractions)
        if len(ks) == 1:  # nothing to compare: build the only candidate with the final init
            cand_init = init
        x = inputs.to(w_fp.device)
        y_fp = layer.op(x, w_fp)
        x_s = x if layer.in_scale is None else x / layer.in_scale_input_view(x)
        errors, best, cache = {}, None, {}
        for k in ks:
            qs, res = build_mixed_quantizers(w_scaled, bits, kurt, k, salient, symmetric=symmetric, init=cand_init,
                                             params=cache)
            err = float(F.mse_loss(layer.op(x_s, quantized_from(qs, res, w_scaled)), y_fp))
            errors[k] = err
            if best is None or err < errors[best[0]]:
                best = (k, qs, res)
        k_best, qs, res = best
        if cand_init != init:
            qs, res = build_mixed_quantizers(w_scaled, bits, kurt, k_best, salient, symmetric=symmetric, init=init)
    return k_best, errors, (qs, res)


# ------------------------------------------------------------------------------------------------
# LoRA initialisation
# ------------------------------------------------------------------------------------------------
def lora_rank_for(layer, rank: int) -> int:
    """Effective rank: min(r, out, in per kernel position)."""
    w = layer.weight
    in_per_pos = w.shape[1]
    return max(0, min(int(rank), w.shape[0], in_per_pos))


def svd_lora_factors(error: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated-SVD factors of an error matrix E [out, in]: B = U_r Σ_r^½ [out, r], A = Σ_r^½ V_rᵀ [r, in],
    so B·A is the best rank-r approximation of E (exact when r >= rank(E))."""
    if error.dim() != 2:
        raise ValueError(f"error must be a 2-D matrix [out, in], got shape {tuple(error.shape)}")
    if rank < 1 or rank > min(error.shape):
        raise ValueError(f"rank must be in 1..{min(error.shape)} for an error of shape {tuple(error.shape)}, got {rank}")
    u, s, vh = torch.linalg.svd(error.double(), full_matrices=False)
    root = s[:rank].sqrt()
    b = (u[:, :rank] * root).to(error.dtype)
    a = (root[:, None] * vh[:rank]).to(error.dtype)
    return b, a


@torch.no_grad()
def init_lora(layer, rank: int, mode: str) -> int:
    """Attach LoRA (effective rank, see :func:`lora_rank_for`) initialised per ``mode``; returns the rank.

    "svd": factors from the quantization error of the pre-scaled weight; the frozen weight keeps
    W − B·A so the latent weight W + B·A, and hence the quantized forward, is unchanged (module doc step 7)."""
    r = lora_rank_for(layer, rank)
    if r == 0:
        return 0
    layer.add_lora(r)
    if mode == "zero":
        return r
    if mode != "svd":
        raise ValueError(f"lora_init must be one of {list(LORA_INITS)}, got {mode!r}")
    w_scaled = layer.effective_weight()  # B = 0: (W)·diag(s)
    error = w_scaled - layer.quantized_weight()
    inv_s = None if layer.in_scale is None else 1.0 / layer.in_scale
    if error.dim() == 2:
        b, a = svd_lora_factors(error, r)
        if inv_s is not None:
            a = a * inv_s.reshape(1, -1)
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
    else:  # conv: one SVD per kernel position (the core's per-position LoRA product)
        kh, kw = error.shape[2], error.shape[3]
        for u in range(kh):
            for v in range(kw):
                b, a = svd_lora_factors(error[:, :, u, v], r)
                if inv_s is not None:
                    a = a * inv_s.reshape(1, -1)
                layer.lora_A[:, :, u, v] = a
                layer.lora_B[:, :, u, v] = b
    # keep the latent weight: W_frozen = W − B·A
    layer.weight = nn.Parameter((layer.weight - layer.lora_delta()).detach(), requires_grad=False)
    return r


# ------------------------------------------------------------------------------------------------
# the method
# ------------------------------------------------------------------------------------------------
def mpq_spec(setting, cfg: MPQConfig):
    """Spec: W<b> learnable asymmetric per-channel, A<b> learnable per-timestep (layer inputs and attention
    operands), first/last/embedding layers at ``keep_first_last_bits``."""
    from ..quant.surgery import LayerQuant, QuantSpec, default_rules

    abits = setting.abits if setting.act_quantized else None
    default = LayerQuant(
        w_bits=setting.wbits, w_format="int", w_granularity="channel", w_symmetric=False, w_init=cfg.weight_init,
        w_learnable=True, a_bits=abits, a_format="int", a_mode="timestep" if abits else "none",
        a_symmetric=False, a_init=cfg.act_init, a_learnable=True, attn_bits=abits)
    return QuantSpec(default=default, rules=default_rules(cfg.keep_first_last_bits or None))


def _minmax_spec(spec):
    """The same spec with min-max weight init (for a surgery whose weight ranges are replaced anyway)."""
    return spec.with_fields(w_init="minmax")


def capture_layer_inputs(backbone, layers: dict, calib, n_inputs: int, device, seed: int = 0) -> dict:
    """{name: FP inputs of that wrapped layer} over ``n_inputs`` calibration inputs (quantization off)."""
    from ..quant.surgery import quant_state

    store: dict = {n: [] for n in layers}
    handles = [layer.register_forward_hook(
        lambda mod, inp, out, name=name: store[name].append(inp[0].detach())) for name, layer in layers.items()]
    sub = calib.subset(min(n_inputs, len(calib)), seed=seed)
    quant_state(backbone.net, weight=False, act=False)
    try:
        with torch.no_grad():
            for x, t, y in sub.batches(64, device):
                backbone(x, t, y)
    finally:
        for h in handles:
            h.remove()
        quant_state(backbone.net, weight=True, act=True)
    return {n: torch.cat(v) for n, v in store.items() if v}


def quantized_so_far_pass(backbone, layers: dict, calib, n_inputs: int, device, process, seed: int = 0) -> list:
    """Run ``process(name, layer, x)`` on every layer of ``layers`` with the input ``x`` it receives from the
    quantized-so-far network (official MPQ-DM: the OMQ search runs inside each layer's first quantized
    forward): one forward of ``n_inputs`` calibration inputs as a single batch with weight quantization on and
    activation quantization off; a forward pre-hook calls ``process`` when the layer is reached, before it
    computes, so every later layer sees the outputs of the groups just chosen. A layer called several
    times per forward is processed at its first call. Returns the names in processing (execution) order."""
    from ..quant.surgery import quant_state

    order: list = []

    def hook(mod, inp, name):
        if name not in order:
            order.append(name)
            process(name, mod, inp[0].detach())

    handles = [layer.register_forward_pre_hook(lambda mod, inp, name=name: hook(mod, inp, name))
               for name, layer in layers.items()]
    sub = calib.subset(min(n_inputs, len(calib)), seed=seed)
    quant_state(backbone.net, weight=True, act=False)
    try:
        with torch.no_grad():
            for x, t, y in sub.batches(len(sub), device):
                backbone(x, t, y)
    finally:
        for h in handles:
            h.remove()
        quant_state(backbone.net, weight=True, act=True)
    return order


@dataclass
class OMQChoice:
    """What OMQ chose for one layer: ``k`` salient output channels (``salient_fraction`` = k / C_out), the
    weight-output MSE of every candidate k (``mse``), the gain over k = 0 (``mse_gain`` = mse[0] / mse[k])
    and whether the input channels were pre-scaled."""
    k: int
    salient_fraction: float
    mse: dict
    mse_gain: float
    prescaled: bool


def omq_layer(layer, x: torch.Tensor, bits: int, cfg: MPQConfig) -> OMQChoice:
    """OMQ on one wrapped layer given the input ``x`` it receives: the input-channel pre-scale (``cfg.prescale``,
    not for grouped convolutions), the search over ``cfg.omq_fractions`` (:func:`omq_search`), and the winner's
    group quantizers (and binary residual) installed. ``cfg.salient: none`` runs the same path with the one
    candidate k = 0 (a plain b-bit quantizer with the configured init, no pre-scale)."""
    omq = cfg.salient != "none"
    prescaled = bool(omq and cfg.prescale and getattr(layer, "groups", 1) == 1)
    if prescaled:
        layer.set_in_scale(prescale_vector(input_channel_absmax(x, layer.weight.dim() == 4), layer.weight))
    k, errors, (qs, res) = omq_search(layer, x, bits, cfg.omq_fractions if omq else [0.0],
                                      cfg.salient if omq else "extra_bit",
                                      init=cfg.weight_init, candidate_init=cfg.omq_init)
    layer.set_weight_quantizers(qs, res, calibrate=False)
    return OMQChoice(k=k, salient_fraction=k / layer.num_out_channels, mse=errors,
                     mse_gain=errors[0] / max(errors[k], 1e-30), prescaled=prescaled)


def apply_omq(backbone, layers: dict, calib, bits: int, cfg: MPQConfig, device) -> dict:
    """OMQ over ``layers`` ({name: wrapped layer}) of ``backbone``: :func:`omq_layer` on each with its input
    taken from where ``cfg.omq_inputs`` says (``quantized``: the quantized-so-far network, layer by layer in
    execution order, :func:`quantized_so_far_pass`; ``fp``: the FP network, :func:`capture_layer_inputs`),
    over ``cfg.calib_inputs`` calibration inputs drawn with ``cfg.seed``. Returns {name: :class:`OMQChoice`}
    in processing order; a layer the backbone never calls keeps its plain quantizer and has no entry."""
    choices: dict = {}
    if cfg.omq_inputs == "quantized":
        def process(name, layer, x):
            choices[name] = omq_layer(layer, x, bits, cfg)

        quantized_so_far_pass(backbone, layers, calib, cfg.calib_inputs, device, process, cfg.seed)
    else:
        inputs = capture_layer_inputs(backbone, layers, calib, cfg.calib_inputs, device, cfg.seed)
        for name, layer in layers.items():
            if name in inputs:
                choices[name] = omq_layer(layer, inputs[name], bits, cfg)
        del inputs
    return choices


def _quantize(backbone, calib, setting, cfg: MPQConfig, ctx: MethodContext) -> QuantResult:
    from ..quant.surgery import calibrate_on, quant_layers, quant_state, quantize_model

    variant = {"salient": cfg.salient, "lora_init": cfg.lora_init, "relation": cfg.relation}
    net = backbone.net
    spec = mpq_spec(setting, cfg)
    # surgery with min-max weight ranges (cheap): the b-bit layers are re-quantized by OMQ below and the
    # kept (first/last/embedding) layers re-calibrated with the configured init
    resolved = quantize_model(net, _minmax_spec(spec), timesteps=calib.timesteps)
    layers = {n: l for n, l in quant_layers(net)}
    bits = setting.wbits
    targets = {n: l for n, l in layers.items() if resolved.get(n) is not None and resolved[n].w_bits == bits}
    for name, layer in layers.items():
        if name not in targets and len(layer.weight_quantizers):
            for q in layer.weight_quantizers:
                q.init = cfg.weight_init
            layer.calibrate_weight()
    choices = apply_omq(backbone, targets, calib, bits, cfg, ctx.device)
    chosen = {n: c.salient_fraction for n, c in choices.items()}
    mse_gain = [c.mse_gain for c in choices.values()]
    if setting.act_quantized:  # (the MSE search cost grows with act_mse_samples)
        calibrate_on(backbone, calib, batches=cfg.act_calib_batches, seed=cfg.seed, device=ctx.device,
                     mse_samples=cfg.act_mse_samples)
    quant_state(net, weight=True, act=setting.act_quantized)
    ranks = {}
    if cfg.lora_rank > 0:
        for name, layer in targets.items():
            ranks[name] = init_lora(layer, cfg.lora_rank, variant["lora_init"])
    n_params = sum(l.weight.numel() for l in targets.values())
    avg_bits = sum(l.w_bits * l.weight.numel() for l in targets.values()) / max(n_params, 1)
    info = {
        "variant": variant,
        "n_quant_layers": len(layers),
        "n_mixed_layers": len(targets),
        "mean_salient_fraction": sum(chosen.values()) / max(len(chosen), 1),
        "mean_omq_mse_gain": sum(mse_gain) / max(len(mse_gain), 1),
        "avg_weight_bits": avg_bits,
        "omq_inputs": cfg.omq_inputs,
        "omq_init": cfg.omq_init,
        "lora_params": sum(l.lora_A.numel() + l.lora_B.numel() for l in targets.values() if l.lora_A is not None),
        "salient_fraction": chosen,
        "lora_ranks": ranks,
    }
    return QuantResult(backbone, spec, info)


quantize = _quantize


def finetune(student, teacher, setting, cfg: MPQConfig, ctx: MethodContext) -> dict:
    """The QAT phase: trajectory distillation of the student (un-merged LoRA, rebuilt from the first
    phase's checkpoint) against the FP teacher with the variant's relation loss (Lightning, logged into
    the job's MLflow run), then the exact LoRA merge. Writes ``history.json`` (losses per update)."""
    from ..io import write_json
    from ..quant.packing import merge_lora
    from ..train.qat import distillation_error, run_qat

    qcfg = cfg.qat
    relation = cfg.relation
    n_check = qcfg.check_samples
    before = distillation_error(student, teacher, ctx.diffusion, ctx.sampling, n=n_check) if n_check else None
    logger = None
    if ctx.run is not None:
        from lightning.pytorch.loggers import MLFlowLogger

        logger = MLFlowLogger(run_id=ctx.run.run_id, tracking_uri=ctx.run.uri)
    summary = run_qat(student, teacher, ctx.diffusion, ctx.sampling, qcfg, relation=relation, logger=logger)
    after = distillation_error(student, teacher, ctx.diffusion, ctx.sampling, n=n_check) if n_check else None
    merge_lora(student.net)
    history = summary.pop("history")
    if ctx.workdir is not None:
        write_json(Path(ctx.workdir) / "history.json", {"updates": history})
    return {"qat": summary, "relation": relation, "eps_mse_before": before, "eps_mse_after": after,
            "qat_seconds": summary["qat_seconds"]}


_DESCRIPTIONS = {
    "mpqdm": "MPQ-DM: OMQ mixed precision + TRD, zero-init LoRA QAT",
    "mpqdm2": "MPQ-DMv2: residual mixed quantization + SVD LoRA init + memory relation QAT",
    "mpqdm2_no_residual": "MPQ-DMv2 without the binary residual (OMQ b+1-bit salient group)",
    "mpqdm2_no_lora_init": "MPQ-DMv2 without the low-rank initialisation (zero-init LoRA)",
    "mpqdm2_no_memory": "MPQ-DMv2 without the memory queue (TRD relation loss)",
    "efficientdm": "EfficientDM-style LoRA QAT: no OMQ (no pre-scale, no mixed groups), zero-init LoRA, no relation loss",
}

register_family(Family(
    name="mpq", config_cls=MPQConfig, quantize=_quantize, finetune=finetune, finetune_field="qat",
    backbones=("unet", "dit"),
    description="MPQ-DM (arXiv 2412.11549) / MPQ-DMv2 (arXiv 2507.04290): mixed-precision init + LoRA QAT",
    variants=tuple(Variant(n, _DESCRIPTIONS[n], v) for n, v in VARIANTS.items()),
    tables=(Table(
        title="MPQ-DM / MPQ-DMv2 ablation (UNet)", backbone="unet", baselines=("naive/naive",),
        columns=("fid_ratio", "accuracy", "clip_score", "model_mb", "method_seconds"),
        note="mpqdm = v1 (OMQ b±1 groups + time-smoothed relation distillation, zero-init LoRA); mpqdm2 = residual "
             "salient channels + SVD-initialised LoRA + memory relation distillation; mpqdm2_no_* = v2 with one "
             "component switched back; efficientdm = the shared LoRA-QAT base without OMQ or relation loss (so each gain is "
             "attributable: efficientdm -> mpqdm = OMQ + TRD). method_seconds = init + QAT wall time.",
        claims=(
            Claim("mpq/mpqdm", "naive/naive", "MPQ-DM: far better than PTQ baselines at W2-W4 / A4"),
            Claim("mpq/mpqdm", "mpq/efficientdm", "MPQ-DM: OMQ + TRD improve on its LoRA-QAT base (EfficientDM)"),
            Claim("mpq/mpqdm2", "mpq/mpqdm", "MPQ-DMv2: improves on MPQ-DM at low bits"),
            Claim("mpq/mpqdm2", "mpq/mpqdm2_no_residual", "MPQ-DMv2 ablation: flexible residual salient channels help"),
            Claim("mpq/mpqdm2", "mpq/mpqdm2_no_lora_init", "MPQ-DMv2 ablation: object-oriented low-rank init helps"),
            Claim("mpq/mpqdm2", "mpq/mpqdm2_no_memory", "MPQ-DMv2 ablation: memory relation distillation helps"),
        )),),
))
