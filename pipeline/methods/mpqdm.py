"""MPQ-DM and MPQ-DMv2: mixed-precision (residual) quantization + LoRA quantization-aware fine-tuning.

Papers: MPQ-DM, Feng et al., AAAI 2025, arXiv 2412.11549 (official code ``cantbebetter2/MPQ-DM``);
MPQ-DMv2, arXiv 2507.04290 (no public code; only the abstract/introduction could be read — every v2
component below is our reasoned design, methods.md §1B [INFER]).
What it quantizes: every nn.Linear / nn.Conv2d to W<b> integers (asymmetric, per output channel, learnable
step and zero point, MSE init) with intra-layer mixed precision, their inputs and the attention matmul
operands to A<b> integers with one learnable (Δ_t, z_t) per sampling step; input/output layers and the
embedding paths stay at 8 bits without LoRA (MPQ-DM's ``set_first_last_layer_to_8bit``; our
``default_rules``). This file is the *initialisation* (calibration-based) half; the QAT half
(trajectory distillation with the relation losses) is :mod:`pipeline.train.qat`.

Algorithm (``quantize`` below, in this order):

1. Surgery: wrap the layers (``quantize_model``) with timestep-indexed activation quantizers over the
   sampler's timesteps (EfficientDM TALSQ / DilateQuant TPQ indexing, methods.md §6.4).
2. Pre-scale (MPQ-DM OMQ step 1, official code): per input channel j, s_j = sqrt(max|X_j| / max|W_j|) from
   the layer's calibration inputs X; the layer computes Q_a(X / s) ⊛ Q_w(W · diag(s)) (core ``in_scale``).
   We take the max over ``calib_inputs`` calibration inputs (the code uses its first batch of 32).
3. Kurtosis ranking (OMQ step 2): κ_i = E[(w − μ_i)^4] / σ_i^4 of each output channel of the pre-scaled weight.
4. Mixed groups (OMQ step 3): the top-k kurtosis channels are *salient*, the bottom-k get b−1 bits, the rest b.
   - ``salient="extra_bit"`` (MPQ-DM): salient channels get a (b+1)-bit quantizer.
   - ``salient="residual"`` (MPQ-DMv2 flexible residual mixed quantization, FZ-RMQ, [INFER]): salient
     channels get the b-bit base quantizer plus a learnable binary residual α ⊙ sign(W − Q_b(W))
     (core ``BinaryResidual``, α = mean |residual| per channel at init): a non-uniform grid {q ± α} with
     the same b+1 stored bits per weight as OMQ's salient group. "Z-order" in the paper's name is
     unexplained in the abstract and not modelled.
   Average bits stay b. The core's integer quantizer currently supports 2..8 bits, so at W2 there is no
   b−1 = 1-bit group: the search then only allows k = 0 (no mixed groups) rather than spend extra bits,
   keeping the average at b. With 1-bit support in ``pipeline.quant.primitives.INT_BITS`` (a one-line core
   change) W2 layers get MPQ-DM's {1, 2, 3}-bit groups automatically; likewise W8 has no 9-bit group.
5. k search (OMQ step 4): k ∈ {round(f·C_out) for f in ``omq_fractions``} (paper: 0, 10 %, …, 50 %;
   the released code only 0 and 10 %), keeping the k whose quantized layer output op(X/s, Ŵ) is closest
   (MSE) to the FP output op(X, W) on the calibration inputs. Activation quantization is left out of
   this comparison (it does not depend on k) — our choice; the code includes its per-tensor quantizer.
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
8. The QAT stage (``pipeline.train.qat``) fine-tunes LoRA, the weight quantizers (Δ, z, α) and the
   activation quantizers along the FP teacher's DDIM trajectories with ε-MSE + a relation loss:
   ``relation="trd"`` (MPQ-DM TRD) or ``relation="memory"`` (MPQ-DMv2 MTRD) — see
   :mod:`pipeline.train.relation`.

Registered variants (each a results row): ``mpqdm`` (v1: OMQ + TRD, zero-init LoRA), ``mpqdm2`` (residual +
SVD init + memory), and v2 with one component replaced by its MPQ-DM counterpart: ``mpqdm2_no_residual``
(OMQ's b+1-bit salient group), ``mpqdm2_no_lora_init`` (zero-init LoRA), ``mpqdm2_no_memory`` (TRD).
All share the option section ``mpqdm`` (:class:`MPQConfig`). When one of them is run by the plain
``quantize`` stage (no QAT), LoRA is merged before returning (it is zero/exact there), so the result is the
MPQ initialisation alone; the ``mpq_init`` stage keeps LoRA un-merged (``ctx.extra["keep_lora"]``) and saves
a student checkpoint (:func:`save_student` / :func:`load_student`) that the ``qat`` stage rebuilds exactly.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import WEIGHT_BITS, ConfigError, choice
from . import MethodContext, QuantResult, register

CHECKPOINT_FILE = "student.safetensors"
STRUCTURE_FILE = "student.json"
CHECKPOINT_VERSION = 1
SALIENT_MODES = ("extra_bit", "residual")
LORA_INITS = ("zero", "svd")
RELATIONS = ("trd", "memory", "none")


@dataclass
class MPQConfig:
    """Options of the MPQ-DM family (params section ``mpq.mpqdm``), shared by all variants.

    lora_rank: LoRA rank r (paper 32 on LDM-4; capped per layer at min(out, in)).
    omq_fractions: candidate fractions of output channels for the salient / demoted groups (k search).
    prescale: the OMQ per-input-channel pre-scale (turn off for an ablation).
    weight_init / act_init: quantizer range init (MPQ-DM: mse = 80-step shrink search, L_2.4).
    keep_first_last_bits: bits of input/output/embedding layers (0 = keep them FP). They get no LoRA.
    calib_inputs: calibration inputs used for the pre-scale and the k search (MPQ-DM: 32).
    act_calib_batches: batches of 64 calibration inputs for the activation ranges.
    act_mse_samples: values kept per timestep (per quantizer) for the activation MSE search (core default 4096).
    seed: which calibration inputs are drawn.
    """

    lora_rank: int = 8
    omq_fractions: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    prescale: bool = True
    weight_init: str = choice("minmax", "mse", default="mse")
    act_init: str = choice("minmax", "mse", default="mse")
    keep_first_last_bits: int = 8
    calib_inputs: int = 64
    act_calib_batches: int = 4
    act_mse_samples: int = 1024
    seed: int = 0

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
}


def check_variant(variant: dict) -> dict:
    """Fill and validate the variant switches (salient, lora_init, relation)."""
    v = {**V1, **(variant or {})}
    for key, allowed in (("salient", SALIENT_MODES), ("lora_init", LORA_INITS), ("relation", RELATIONS)):
        if v[key] not in allowed:
            raise ValueError(f"variant.{key}: must be one of {list(allowed)}, got {v[key]!r}")
    unknown = sorted(set(v) - {"salient", "lora_init", "relation"})
    if unknown:
        raise ValueError(f"variant: unknown key(s) {unknown}; allowed: ['salient', 'lora_init', 'relation']")
    return v


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
    """(bits of the demoted group, bits of the promoted group) around ``bits``; limited to the core's
    integer range (the demoted group is clamped at its minimum, see module doc)."""
    from ..quant.primitives import INT_BITS

    return max(bits - 1, INT_BITS[0]), min(bits + 1, INT_BITS[-1])


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
    """Per-output-channel (scale, zero_point) of a ``bits``-bit quantizer calibrated on ``weight``.

    Per-channel calibration (min-max or the MSE search) treats every channel on its own, so a masked
    quantizer gets exactly these values on its channels: the k search calibrates each width once per layer."""
    from ..quant.primitives import IntQuantizer

    q = IntQuantizer(bits, symmetric=symmetric, granularity="channel", ch_axis=0, init=init)
    q.calibrate(weight.detach())
    return {"scale": q.scale.detach(), "zero_point": q.zero_point.detach()}


def build_mixed_quantizers(weight: torch.Tensor, bits: int, kurtosis: torch.Tensor, k: int, salient: str,
                           symmetric: bool = False, init: str = "mse", learnable: bool = True,
                           params: Optional[dict] = None):
    """Calibrated weight quantizers (+ residual) of one candidate k on the (pre-scaled) ``weight``.

    k = 0 -> one unmasked b-bit quantizer. Otherwise three masked quantizers: top-k at b+1 bits
    (``salient="extra_bit"``) or at b bits with a :class:`BinaryResidual` on them (``"residual"``),
    the middle at b, the bottom-k at b−1. ``params``: {bits: channel_quantizer_params(...)} cache.
    Returns (quantizers, residual or None)."""
    from ..quant.primitives import BinaryResidual, IntQuantizer

    if salient not in SALIENT_MODES:
        raise ValueError(f"salient must be one of {list(SALIENT_MODES)}, got {salient!r}")
    w = weight.detach()
    cache = params if params is not None else {}

    def make(b, mask=None):
        if b not in cache:
            cache[b] = channel_quantizer_params(w, b, symmetric, init)
        q = IntQuantizer(b, symmetric=symmetric, granularity="channel", ch_axis=0, init=init, learnable=learnable,
                         channel_mask=mask)
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
               init: str = "mse", symmetric: bool = False):
    """OMQ k search on one wrapped layer (its ``in_scale`` already set): for every candidate k, the MSE
    between the FP output op(X, W) and op(X / s, Ŵ_k). Returns (best_k, {k: mse}, (quantizers, residual) of best)."""
    lo_bits, hi_bits = group_bits(bits)
    if lo_bits == bits or (hi_bits == bits and salient == "extra_bit"):
        fractions = [0.0]  # no b−1 (or b+1) grid available: mixed groups would change the average bits
    with torch.no_grad():
        w_fp = layer.weight.detach()
        w_scaled = layer.effective_weight().detach()
        kurt = channel_kurtosis(w_scaled)
        x = inputs.to(w_fp.device)
        y_fp = layer._op(x, w_fp)
        x_s = x if layer.in_scale is None else x / layer._in_scale_input_view(x)
        errors, best, cache = {}, None, {}
        for k in candidate_ks(w_fp.shape[0], fractions):
            qs, res = build_mixed_quantizers(w_scaled, bits, kurt, k, salient, symmetric=symmetric, init=init,
                                             params=cache)
            err = float(F.mse_loss(layer._op(x_s, quantized_from(qs, res, w_scaled)), y_fp))
            errors[k] = err
            if best is None or err < errors[best[0]]:
                best = (k, qs, res)
    return best[0], errors, (best[1], best[2])


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
    import dataclasses

    from ..quant.surgery import QuantSpec

    return QuantSpec(default=dataclasses.replace(spec.default, w_init="minmax"),
                     rules=[(p, {k: v for k, v in o.items() if k != "w_init"}) for p, o in spec.rules])


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


def _quantize(backbone, calib, setting, cfg: MPQConfig, ctx: MethodContext) -> QuantResult:
    from ..quant.surgery import calibrate_activations, quant_layers, quant_state, quantize_model

    variant = check_variant(ctx.variant)
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
    inputs = capture_layer_inputs(backbone, targets, calib, cfg.calib_inputs, ctx.device, cfg.seed)
    chosen, mse_gain = {}, []
    for name, layer in targets.items():
        x = inputs.get(name)
        if x is None:
            continue  # never called by the backbone (unused layer): keep the plain quantizer
        conv = layer.weight.dim() == 4
        if cfg.prescale and getattr(layer, "groups", 1) == 1:
            layer.set_in_scale(prescale_vector(input_channel_absmax(x, conv), layer.weight))
        k, errors, (qs, res) = omq_search(layer, x, bits, cfg.omq_fractions, variant["salient"],
                                          init=cfg.weight_init)
        layer.set_weight_quantizers(qs, res, calibrate=False)
        chosen[name] = k / layer.num_out_channels
        mse_gain.append(errors[0] / max(errors[k], 1e-30))
    del inputs
    if setting.act_quantized:
        from ..quant.surgery import activation_quantizers

        for _, q in activation_quantizers(net):
            if hasattr(q, "max_samples"):
                q.max_samples = cfg.act_mse_samples  # the MSE search cost grows with it

        def run():
            with torch.no_grad():
                for x, t, y in calib.batches(64, ctx.device, shuffle=True, seed=cfg.seed, limit=cfg.act_calib_batches):
                    backbone(x, t, y)

        calibrate_activations(net, run)
    quant_state(net, weight=True, act=setting.act_quantized)
    ranks = {}
    if cfg.lora_rank > 0:
        for name, layer in targets.items():
            ranks[name] = init_lora(layer, cfg.lora_rank, variant["lora_init"])
    if not (ctx.extra or {}).get("keep_lora", False):
        from ..quant.packing import merge_lora

        merge_lora(net)
    n_params = sum(l.weight.numel() for l in targets.values())
    avg_bits = sum(l.w_bits * l.weight.numel() for l in targets.values()) / max(n_params, 1)
    info = {
        "variant": variant,
        "n_quant_layers": len(layers),
        "n_mixed_layers": len(targets),
        "mean_salient_fraction": sum(chosen.values()) / max(len(chosen), 1),
        "mean_omq_mse_gain": sum(mse_gain) / max(len(mse_gain), 1),
        "avg_weight_bits": avg_bits,
        "lora_params": sum(l.lora_A.numel() + l.lora_B.numel() for l in targets.values() if l.lora_A is not None),
        "salient_fraction": chosen,
        "lora_ranks": ranks,
    }
    return QuantResult(backbone, spec, info)


def _register_variants() -> None:
    descriptions = {
        "mpqdm": "MPQ-DM: OMQ mixed precision + TRD, zero-init LoRA QAT",
        "mpqdm2": "MPQ-DMv2: residual mixed quantization + SVD LoRA init + memory relation QAT",
        "mpqdm2_no_residual": "MPQ-DMv2 without the binary residual (OMQ b+1-bit salient group)",
        "mpqdm2_no_lora_init": "MPQ-DMv2 without the low-rank initialisation (zero-init LoRA)",
        "mpqdm2_no_memory": "MPQ-DMv2 without the memory queue (TRD relation loss)",
    }
    for name, variant in VARIANTS.items():
        register(name, MPQConfig, config_section="mpqdm", backbones=("unet", "dit"),
                 description=descriptions[name], variant=variant)(_quantize)


_register_variants()
quantize = _quantize


# ------------------------------------------------------------------------------------------------
# student checkpoint (un-merged LoRA; rebuilt exactly by the QAT stage)
# ------------------------------------------------------------------------------------------------
def _quantizer_desc(q) -> dict:
    return {"bits": q.bits, "symmetric": q.symmetric, "granularity": q.granularity, "group_size": q.group_size,
            "init": q.init, "learnable": q.learnable, "masked": q.channel_mask is not None}


def save_student(net: nn.Module, spec, out_dir, meta: Optional[dict] = None) -> None:
    """Write ``student.safetensors`` (the full state dict of the wrapped net: frozen weights, LoRA, weight
    and activation quantizer parameters, masks, pre-scales, residual α) and ``student.json`` (spec,
    timesteps, per-layer structure, ``meta``) into ``out_dir`` (created; not atomic — stages wrap it)."""
    from safetensors.torch import save_file

    from ..quant.surgery import quant_layers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = {}
    for name, layer in quant_layers(net):
        layers[name] = {
            "quantizers": [_quantizer_desc(q) for q in layer.weight_quantizers],
            "residual": None if layer.residual is None else {"masked": layer.residual.channel_mask is not None},
            "in_scale": layer.in_scale is not None,
            "lora_rank": layer.lora_rank,
            "weight_quant": bool(layer.weight_quant), "act_quant": bool(layer.act_quant),
        }
    structure = {"version": CHECKPOINT_VERSION, "spec": spec.to_dict(),
                 "timesteps": getattr(net, "_quant_timesteps", None), "layers": layers, "meta": meta or {}}
    json.dumps(structure)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}
    save_file(tensors, str(out / CHECKPOINT_FILE))
    (out / STRUCTURE_FILE).write_text(json.dumps(structure, indent=2, sort_keys=True) + "\n")


def load_student(fp_net: nn.Module, out_dir):
    """Rebuild the student saved by :func:`save_student` on a fresh FP net of the same architecture
    (modified in place). Returns (net, spec, meta). Errors name the file / layer."""
    from safetensors.torch import load_file

    from ..quant.layers import QUANT_LAYER_TYPES
    from ..quant.primitives import BinaryResidual, IntQuantizer
    from ..quant.surgery import QuantSpec, quantize_model

    out = Path(out_dir)
    for f in (STRUCTURE_FILE, CHECKPOINT_FILE):
        if not (out / f).is_file():
            raise FileNotFoundError(f"{out}: missing {f} (not an mpq_init student checkpoint; run stage mpq_init)")
    structure = json.loads((out / STRUCTURE_FILE).read_text())
    if structure.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{out / STRUCTURE_FILE}: unsupported version {structure.get('version')!r} "
                         f"(expected {CHECKPOINT_VERSION})")
    tensors = load_file(str(out / CHECKPOINT_FILE))
    spec = QuantSpec.from_dict(structure["spec"])
    quantize_model(fp_net, _minmax_spec(spec), timesteps=structure.get("timesteps"))  # ranges come from the file
    for name, entry in structure["layers"].items():
        try:
            layer = fp_net.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{out / STRUCTURE_FILE}: layer {name!r} does not exist in the model") from None
        if not isinstance(layer, QUANT_LAYER_TYPES):
            raise ValueError(f"{out / STRUCTURE_FILE}: layer {name!r} is not quantized by the saved spec")
        qs = []
        for g, d in enumerate(entry["quantizers"]):
            mask = tensors.get(f"{name}.weight_quantizers.{g}.channel_mask") if d["masked"] else None
            if d["masked"] and mask is None:
                raise ValueError(f"{out / CHECKPOINT_FILE}: layer {name!r} quantizer {g}: channel mask missing")
            qs.append(IntQuantizer(d["bits"], symmetric=d["symmetric"], granularity=d["granularity"],
                                   group_size=d["group_size"], ch_axis=0, init=d["init"], learnable=d["learnable"],
                                   channel_mask=mask).to(layer.weight.device))
        residual = None
        if entry["residual"] is not None:
            mask = tensors.get(f"{name}.residual.channel_mask") if entry["residual"]["masked"] else None
            residual = BinaryResidual(layer.num_out_channels, mask).to(layer.weight.device)
        layer.set_weight_quantizers(qs, residual, calibrate=False)
        if entry["in_scale"]:
            layer.set_in_scale(torch.ones(layer.weight.shape[1], device=layer.weight.device))
        if entry["lora_rank"]:
            layer.add_lora(int(entry["lora_rank"]))
        layer.weight_quant, layer.act_quant = bool(entry["weight_quant"]), bool(entry["act_quant"])
    try:
        fp_net.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{out / CHECKPOINT_FILE}: does not fit the rebuilt student: {exc}") from None
    return fp_net, spec, structure.get("meta", {})
