"""AdaRound: learned up/down rounding of weights (Nagel et al. 2020; BRECQ / Q-Diffusion form) and the
scale-aware floating-point variant of FP4DiT (arXiv 2503.15465; official code github.com/cccrrrccc/FP4DiT,
``adaptive_rounding.py``).

Integer grid (plain AdaRound)
    ŵ = Δ·(clamp(⌊w/Δ⌋ + h(V) + ⌊z⌉, qmin, qmax) − ⌊z⌉),  h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1),
    ζ = 1.1, γ = −0.1, V initialised so that h = frac(w/Δ) (the soft weight starts at w, up to clipping).

Floating-point grid (FP4DiT "scale-aware" AdaRound)
    s(w) = local FP step of w (depends on its exponent and its group's maxval), w_c = clip(w, ±maxval),
    ŵ = clip(s·(⌊w_c/s⌋ + h(V/s)), ±maxval), V initialised as s·h⁻¹(frac(w_c/s)). Dividing the logit
    by s equalises the effective learning rate across exponent bins.

Hard rounding (``harden``): h = 1[V >= 0]. After hardening every weight is exactly a grid point:
Δ·(k − ⌊z⌉) for integers (the same float expression as ``IntQuantizer.dequantize``), and a value
of the FP grid of its group's maxval for FP.

The loss is BRECQ's: ‖O − Ô‖² + λ·Σ(1 − |2h − 1|^β) with λ = 0.01 and β annealed by
:class:`BetaSchedule` (20 → 2 linearly after a 20 % warm-up during which the regulariser is off).
The optimisation loop itself lives with the reconstruction code (methods / layers).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from .primitives import FPQuantizer, IntQuantizer, fp_clip, fp_grid_max, fp_step

ZETA = 1.1
GAMMA = -0.1
REG_WEIGHT = 0.01  # λ of the rounding regulariser (BRECQ / Q-Diffusion default)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """V with h(V) = h for h in [0, 1): V = −log((ζ − γ)/(h − γ) − 1)."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


class AdaRoundWeight(nn.Module):
    """Learnable rounding of one weight tensor onto the grid of ``quantizer``.

    The quantizer is referenced, not owned (it stays a sub-module of its layer; move both together).
    It must cover the weight's layout (channel / group / tensor; "token" is rejected) and is
    calibrated on ``weight`` if it has not been. Only the logits ``V`` are learned here; the
    quantizer's step/zero-point/maxval are read at every forward (normally frozen during AdaRound).
    Channels outside the quantizer's ``channel_mask`` are 0 in every output, as in the quantizer.
    """

    def __init__(self, quantizer: Union[IntQuantizer, FPQuantizer], weight: torch.Tensor):
        super().__init__()
        if isinstance(quantizer, IntQuantizer):
            self.fmt = "int"
        elif isinstance(quantizer, FPQuantizer):
            if quantizer.granularity == "token":
                raise ValueError("AdaRoundWeight: FPQuantizer granularity must be tensor/channel/group, "
                                 "got 'token'")
            self.fmt = "fp"
        else:
            raise TypeError(f"quantizer must be an IntQuantizer or FPQuantizer, got {type(quantizer).__name__}")
        self._quantizer = [quantizer]  # a list keeps it out of this module's children / state_dict
        w = weight.detach()
        self._shape = tuple(w.shape)
        with torch.no_grad():
            if self.fmt == "int":
                wv, self._meta, scale, _, mask = quantizer.grid_params(w)
                ws = wv * (1.0 / scale)
                w_floor = torch.floor(ws)
                rest = ws - w_floor
                v = inverse_rectified_sigmoid(rest)
                self.register_buffer("step", None)
            else:
                wv, self._meta, maxval, mask = quantizer.grid_params(w)
                w_c = fp_clip(wv, maxval, quantizer.signed)
                step, _ = fp_step(w_c.abs(), maxval, quantizer.exp_bits, quantizer.man_bits)
                ws = w_c / step
                w_floor = torch.floor(ws)
                rest = ws - w_floor
                v = step * inverse_rectified_sigmoid(rest)
                self.register_buffer("step", step)
            # elements that exist (not the zero padding of a short last group)
            valid = torch.ones(wv.shape[0], wv.shape[1] * wv.shape[2], dtype=torch.bool, device=wv.device)
            valid[:, self._meta[2]:] = False
            valid = valid.reshape(wv.shape)
            if mask is not None:
                valid = valid & mask
        self.register_buffer("w_floor", w_floor)
        self.register_buffer("valid", valid)
        self.register_buffer("hardened", torch.tensor(False))
        self.V = nn.Parameter(v)

    @property
    def quantizer(self) -> Union[IntQuantizer, FPQuantizer]:
        return self._quantizer[0]

    # ------------------------------------------------------------------------------------------
    def soft_rounding(self) -> torch.Tensor:
        """h(V) (FP: h(V/s)) in [0, 1], in the quantizer's row layout."""
        logits = self.V if self.step is None else self.V / self.step
        return rectified_sigmoid(logits)

    def hard_rounding(self) -> torch.Tensor:
        return (self.V >= 0).to(self.w_floor.dtype)

    def _compose(self, h: torch.Tensor) -> torch.Tensor:
        q = self.quantizer
        dtype = self.w_floor.dtype
        if self.fmt == "int":
            lay = q.layout()
            scale = lay.param_view(q.scale).to(dtype)
            z = torch.round(lay.param_view(q.zero_point).to(dtype))
            codes = torch.clamp(self.w_floor + h + z, q.qmin, q.qmax)
            out = (codes - z) * scale
        else:
            lay = q.layout()
            maxval = lay.param_view(q.maxval).to(dtype)
            # clip to the grid's top value (not maxval itself, which may be 1 ulp off the grid)
            top = fp_grid_max(maxval.clamp_min(1e-20), q.exp_bits, q.man_bits)
            out = fp_clip(self.step * (self.w_floor + h), top, q.signed)
        mask = q.channel_mask
        if mask is not None:
            out = torch.where(mask.to(out.device).reshape(-1, 1, 1), out,
                              torch.zeros((), dtype=out.dtype, device=out.device))
        return q.layout().unview(out, self._meta)

    def forward(self) -> torch.Tensor:
        """Soft-rounded weight (differentiable in V), or the hard one after :meth:`harden`."""
        if bool(self.hardened):
            return self._compose(self.hard_rounding())
        return self._compose(self.soft_rounding())

    def regularizer(self, beta: float) -> torch.Tensor:
        """Σ (1 − |2h − 1|^β) over the weights this quantizer covers (pushes h to 0 or 1)."""
        h = self.soft_rounding()
        reg = 1.0 - (2.0 * h - 1.0).abs().pow(beta)
        return torch.where(self.valid, reg, torch.zeros((), dtype=reg.dtype, device=reg.device)).sum()

    @torch.no_grad()
    def harden(self) -> None:
        """Switch to hard rounding h = 1[V >= 0] for good."""
        self.hardened.fill_(True)
        self.V.requires_grad_(False)

    @torch.no_grad()
    def quantized_weight(self) -> torch.Tensor:
        """The hard-rounded weight (on the quantizer's grid), whether or not :meth:`harden` was called."""
        return self._compose(self.hard_rounding())

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """Codes of the hard-rounded weight in the quantizer's convention: IntQuantizer int32 codes
        (``quantizer.dequantize(codes) == quantized_weight()``), FPQuantizer uint8 codes
        (``quantizer.decode(codes) == quantized_weight()``)."""
        q = self.quantizer
        if self.fmt == "fp":
            return q.encode(self.quantized_weight())
        lay = q.layout()
        z = torch.round(lay.param_view(q.zero_point).to(self.w_floor.dtype))
        codes = torch.clamp(self.w_floor + self.hard_rounding() + z, q.qmin, q.qmax)
        if q.channel_mask is not None:
            codes = torch.where(q.channel_mask.to(codes.device).reshape(-1, 1, 1), codes, z.expand_as(codes))
        return lay.unview(codes, self._meta).to(torch.int32)


class BetaSchedule:
    """β of the rounding regulariser: None during the first ``warmup`` fraction of the steps
    (regulariser off), then linear from ``start`` to ``end`` (BRECQ ``LinearTempDecay``)."""

    def __init__(self, start: float = 20.0, end: float = 2.0, warmup: float = 0.2):
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {warmup}")
        self.start, self.end, self.warmup = float(start), float(end), float(warmup)

    def __call__(self, step: int, total: int) -> Optional[float]:
        if total <= 0:
            raise ValueError(f"total must be a positive number of steps, got {total}")
        warm = self.warmup * total
        if step < warm:
            return None
        rel = (step - warm) / max(total - warm, 1e-12)
        return self.end + (self.start - self.end) * max(0.0, 1.0 - rel)
