"""Activation quantizers: static per-tensor, timestep-indexed, and online per-token.

Every activation quantizer has the same small interface so that layers and surgery can treat them
alike: ``enabled`` (False = identity), ``bits``, ``calibrating`` (True = observe the input and pass it
through unchanged), ``observe(x)``, ``finish_calibration()``.

- :class:`StaticActQuantizer`: one per-tensor step (Q-Diffusion / BRECQ activation quantizer), int
  or FP, min-max or MSE init from statistics gathered over all calibration batches.
- :class:`TimestepActQuantizer`: one (Δ_t, z_t) per sampling timestep, gathered per sample from the
  timesteps of the current forward (DilateQuant TPQ style, stateless; covers EfficientDM/MPQ-DM's
  TALSQ, whose stateful step pointer breaks under batches that mix timesteps; DilateQuant:
  github.com/BienLuky/DilateQuant, MPQ-DM: github.com/cantbebetter2/MPQ-DM).
- :class:`OnlineTokenActQuantizer`: dynamic per-token scale from each token's absmax at run time
  (FP4DiT online activation quantization; int = symmetric absmax, fp = ExMy with maxval = absmax).

The timesteps reach the quantizers through a :class:`TimestepContext`, filled by a forward pre-hook
on the model (:func:`install_timestep_context`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from .primitives import (FP_ACT_FORMATS, LP_NORM, MSE_CANDIDATES, MSE_STEP, FPQuantizer, IntQuantizer,
                         check_fp_format, check_int_bits, fake_quant_int, fp_quantize,
                         fp_quantize_token, int_qparams, int_range)

_TIMESTEP_KEYS = ("t", "timestep", "timesteps")
_SAMPLE_KEYS = ("x", "sample", "hidden_states", "x_t")
# widths an FP activation quantizer accepts with an explicit ExMy split (up to fp16-like 16-bit formats, e.g.
# FP4DiT's 16-bit softmax); the default split (primitives.FP_ACT_FORMATS) covers 3..8
FP_ACT_BITS = tuple(range(3, 17))


def _check_init(init) -> str:
    if init not in ("minmax", "mse"):
        raise ValueError(f"init must be one of ['minmax', 'mse'], got {init!r}")
    return init


def _check_fmt(fmt) -> str:
    if fmt not in ("int", "fp"):
        raise ValueError(f"fmt must be one of ['int', 'fp'], got {fmt!r}")
    return fmt


def resolve_fp_split(bits: int, exp_bits: Optional[int], man_bits: Optional[int], signed: bool) -> tuple[int, int]:
    """ExMy split of a ``bits``-wide FP format: from the given E/M, or the default table
    :data:`pipeline.quant.primitives.FP_ACT_FORMATS` (3: E1M1, 4: E2M1, 5: E2M2, 6: E2M3, 7: E3M3, 8: E3M4;
    unsigned formats spend the sign bit on the mantissa)."""
    sign = 1 if signed else 0
    if exp_bits is None and man_bits is None:
        if bits not in FP_ACT_FORMATS:
            raise ValueError(f"bits must be one of {sorted(FP_ACT_FORMATS)} for an FP activation format "
                             f"without exp_bits/man_bits, got {bits}")
        exp_bits, man_bits = FP_ACT_FORMATS[bits]
        man_bits += 1 - sign
    elif man_bits is None:
        man_bits = bits - sign - exp_bits
    elif exp_bits is None:
        exp_bits = bits - sign - man_bits
    check_fp_format(exp_bits, man_bits, signed)
    if exp_bits + man_bits + sign != bits:
        raise ValueError(f"bits={bits} does not match exp_bits={exp_bits} + man_bits={man_bits}"
                         f"{' + 1 sign bit' if signed else ''}")
    return exp_bits, man_bits


def _check_act_bits(bits, fmt: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, got {bits!r}")
    if fmt == "int":
        return check_int_bits(bits)
    if bits not in FP_ACT_BITS:
        raise ValueError(f"bits must be in {FP_ACT_BITS[0]}..{FP_ACT_BITS[-1]} for an FP activation format, got {bits}")
    return bits


# ----------------------------------------------------------------------------------------------
# timestep context
# ----------------------------------------------------------------------------------------------
class TimestepContext:
    """Per-sample timesteps of the forward in progress (``current``: tensor [B] or None)."""

    def __init__(self):
        self.current: Optional[torch.Tensor] = None
        self._handle = None

    def set(self, t, batch_size: Optional[int] = None) -> None:
        t = torch.as_tensor(t)
        if t.dim() == 0 or (t.numel() == 1 and batch_size is not None and batch_size != 1):
            t = t.reshape(1).expand(batch_size if batch_size is not None else 1)
        self.current = t.reshape(-1).detach()

    def clear(self) -> None:
        self.current = None

    def remove(self) -> None:
        """Detach the pre-hook installed by :func:`install_timestep_context` (for a deep copy of the
        model use :func:`remove_timestep_context` on the copy)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __deepcopy__(self, memo):
        # the hook handle points into the original model's hook dict: a copy must not own it
        new = TimestepContext()
        new.current = None if self.current is None else self.current.clone()
        memo[id(self)] = new
        return new


class _TimestepHook:
    """Forward pre-hook object (an object, not a closure, so ``copy.deepcopy`` of the model copies the
    hook together with the context its quantizers reference)."""

    def __init__(self, context: TimestepContext):
        self.context = context

    def __call__(self, module, args, kwargs):
        t = None
        for key in _TIMESTEP_KEYS:
            if kwargs.get(key) is not None:
                t = kwargs[key]
                break
        if t is None and len(args) > 1:
            t = args[1]
        if t is None:
            raise ValueError(f"{type(module).__name__}.forward was called without a timestep: pass it as "
                             f"positional argument 1 or as one of the keywords {list(_TIMESTEP_KEYS)}")
        sample = args[0] if args else next((kwargs[k] for k in _SAMPLE_KEYS if kwargs.get(k) is not None), None)
        batch = sample.shape[0] if isinstance(sample, torch.Tensor) and sample.dim() > 0 else None
        self.context.set(t, batch)
        return None


def find_timestep_context(model: nn.Module) -> Optional[TimestepContext]:
    """The context installed on ``model`` by :func:`install_timestep_context`, or None."""
    for hook in model._forward_pre_hooks.values():
        if isinstance(hook, _TimestepHook):
            return hook.context
    return None


def install_timestep_context(model: nn.Module) -> TimestepContext:
    """Register a forward pre-hook on ``model`` that stores the timestep argument (positional arg 1,
    or keyword ``t`` / ``timestep`` / ``timesteps``), broadcast to the batch, in a context.
    Idempotent: if ``model`` already has one, that context is returned (one hook per model)."""
    existing = find_timestep_context(model)
    if existing is not None:
        return existing
    context = TimestepContext()
    context._handle = model.register_forward_pre_hook(_TimestepHook(context), with_kwargs=True)
    return context


def remove_timestep_context(model: nn.Module) -> None:
    """Remove every timestep pre-hook from ``model`` (works on deep copies too)."""
    for key in [k for k, h in model._forward_pre_hooks.items() if isinstance(h, _TimestepHook)]:
        del model._forward_pre_hooks[key]
        model._forward_pre_hooks_with_kwargs.pop(key, None)


# ----------------------------------------------------------------------------------------------
# calibration statistics
# ----------------------------------------------------------------------------------------------
def _random_subset(values: torch.Tensor, cap: int, generator: torch.Generator) -> torch.Tensor:
    if values.numel() <= cap:
        return values
    idx = torch.randperm(values.numel(), generator=generator)[:cap].to(values.device)
    return values[idx]


def _mse_search_rows(samples: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int,
                     symmetric: bool):
    """Per-row (Δ, z) minimising Σ|x − x̂|^2.4 over 80 shrunk ranges. samples: [R, S] (zero padding
    is harmless: 0 is exact); lo/hi: [R, 1]."""
    best_err = torch.full_like(lo, float("inf"))
    best_s, best_z = int_qparams(lo, hi, qmin, qmax, symmetric)
    for i in range(MSE_CANDIDATES):
        f = 1.0 - MSE_STEP * i
        s, z = int_qparams(lo * f, hi * f, qmin, qmax, symmetric)
        err = (fake_quant_int(samples, s, z, qmin, qmax) - samples).abs().pow(LP_NORM).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


# ----------------------------------------------------------------------------------------------
# static per-tensor
# ----------------------------------------------------------------------------------------------
class StaticActQuantizer(nn.Module):
    """Per-tensor activation quantizer with statistics over all calibration batches.

    Int: asymmetric (or symmetric) affine, min-max or MSE init (the MSE search runs on a random
    subset of at most ``max_samples`` observed values plus the observed extremes). FP (``fmt="fp"``):
    ExMy with maxval = observed absmax (``init="mse"``: shrink-search as for weights).
    ``learnable`` makes Δ/z (int) or maxval (fp) parameters. If used before any calibration, the first
    batch initialises it (Q-Diffusion's lazy init).
    """

    def __init__(self, bits: int, symmetric: bool = False, fmt: str = "int", exp_bits: Optional[int] = None,
                 man_bits: Optional[int] = None, signed: bool = True, init: str = "minmax",
                 learnable: bool = False, max_samples: int = 16384, seed: int = 0):
        super().__init__()
        self.fmt = _check_fmt(fmt)
        self.init = _check_init(init)
        bits = _check_act_bits(bits, self.fmt)
        self.symmetric = bool(symmetric)
        self.signed = bool(signed)
        if self.fmt == "int":
            self.quantizer = IntQuantizer(bits, symmetric=symmetric, granularity="tensor", init=init,
                                          learnable=learnable)
        else:
            e, m = resolve_fp_split(bits, exp_bits, man_bits, signed)
            self.quantizer = FPQuantizer(e, m, signed=signed, granularity="tensor",
                                         init="absmax" if init == "minmax" else "mse", learnable=learnable)
        self.enabled = True
        self.calibrating = False
        self.max_samples = int(max_samples)
        self._gen = torch.Generator().manual_seed(seed)
        self.register_buffer("running_min", torch.tensor(float("inf")), persistent=False)
        self.register_buffer("running_max", torch.tensor(float("-inf")), persistent=False)
        self._samples: Optional[torch.Tensor] = None

    @property
    def bits(self) -> int:
        return self.quantizer.bits

    @bits.setter
    def bits(self, value: int) -> None:
        value = _check_act_bits(value, self.fmt)
        if self.fmt == "int":
            self.quantizer.bits = value
        else:
            e = self.quantizer.exp_bits
            self.quantizer.set_format(*resolve_fp_split(value, e, None, self.signed))
        if self._has_stats():
            self._init_from_stats()

    def _has_stats(self) -> bool:
        return bool(torch.isfinite(self.running_min)) and bool(torch.isfinite(self.running_max))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        self.running_min = torch.minimum(self.running_min.to(x.device), x.min().float())
        self.running_max = torch.maximum(self.running_max.to(x.device), x.max().float())
        if self.init == "mse":
            new = _random_subset(x.reshape(-1).float(), self.max_samples, self._gen)
            pool = new if self._samples is None else torch.cat([self._samples.to(new.device), new])
            self._samples = _random_subset(pool, self.max_samples, self._gen)

    def _init_from_stats(self) -> None:
        extremes = torch.stack([self.running_min, self.running_max])
        data = extremes if self._samples is None else torch.cat([self._samples, extremes])
        self.quantizer.calibrate(data)

    @torch.no_grad()
    def finish_calibration(self) -> None:
        self.calibrating = False
        if not self._has_stats():
            raise RuntimeError("StaticActQuantizer.finish_calibration: no activations were observed "
                               "(set calibrating=True and run the model first)")
        self._init_from_stats()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.calibrating:
            self.observe(x)
            return x
        return self.quantizer(x)

    def extra_repr(self) -> str:
        return f"fmt={self.fmt}, bits={self.bits}, init={self.init}, enabled={self.enabled}"


# ----------------------------------------------------------------------------------------------
# timestep-indexed per-tensor
# ----------------------------------------------------------------------------------------------
class TimestepActQuantizer(nn.Module):
    """Per-tensor integer activation quantizer with one (Δ_t, z_t) per sampling timestep.

    The parameters used for sample i are those of the known timestep nearest to ``context.current[i]``
    (ties: the earlier entry of ``timesteps``). The leading dim of x is the batch B, or B·k for
    reshaped tensors (e.g. attention heads folded into the batch): each sample's index is repeated k
    times (``repeat_interleave``), matching diffusers' head-to-batch layout.

    Calibration: running min/max per timestep index, each sample credited to its own timestep;
    ``init="mse"`` additionally keeps a random subset (``max_samples`` values) per timestep and runs
    the 80-candidate L_2.4 search per timestep. Timesteps never observed copy the parameters of the
    nearest observed timestep. Changing ``bits`` re-derives min-max parameters from the running
    statistics when they are still in memory (they are not saved in the state dict).
    """

    def __init__(self, bits: int, timesteps: Sequence[int], context: TimestepContext, symmetric: bool = False,
                 learnable: bool = False, init: str = "minmax", max_samples: int = 4096, seed: int = 0):
        super().__init__()
        self._bits = check_int_bits(bits)
        ts = [int(t) for t in timesteps]
        if not ts:
            raise ValueError("timesteps must be a non-empty list of sampler timesteps")
        if not isinstance(context, TimestepContext):
            raise TypeError(f"context must be a TimestepContext, got {type(context).__name__}")
        self.context = context
        self.symmetric = bool(symmetric)
        self.learnable = bool(learnable)
        self.init = _check_init(init)
        self.enabled = True
        self.calibrating = False
        self.max_samples = int(max_samples)
        self._gen = torch.Generator().manual_seed(seed)
        n = len(ts)
        self.register_buffer("timestep_values", torch.tensor(ts, dtype=torch.float64))
        if self.learnable:
            self.scale = nn.Parameter(torch.ones(n))
            self.zero_point = nn.Parameter(torch.zeros(n))
        else:
            self.register_buffer("scale", torch.ones(n))
            self.register_buffer("zero_point", torch.zeros(n))
        self.register_buffer("calibrated", torch.tensor(False))
        self.register_buffer("running_min", torch.full((n,), float("inf")), persistent=False)
        self.register_buffer("running_max", torch.full((n,), float("-inf")), persistent=False)
        self._samples: dict[int, torch.Tensor] = {}

    @property
    def held_samples(self) -> dict[int, int]:
        """How many observed values the MSE init keeps per timestep so far (each at most ``max_samples``)."""
        return {t: int(s.numel()) for t, s in self._samples.items()}

    @property
    def timesteps(self) -> list[int]:
        return [int(t) for t in self.timestep_values.tolist()]

    @property
    def bits(self) -> int:
        return self._bits

    @bits.setter
    def bits(self, value: int) -> None:
        self._bits = check_int_bits(value)
        observed = self.running_min <= self.running_max
        if bool(observed.any()):
            self._set_from_stats(use_mse=False)

    @property
    def qmin(self) -> int:
        return int_range(self._bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return int_range(self._bits, self.symmetric)[1]

    def timestep_index(self, t: torch.Tensor) -> torch.Tensor:
        """Index of the nearest known timestep for each entry of t."""
        vals = self.timestep_values.to(t.device)
        return (t.to(torch.float64).reshape(-1, 1) - vals.reshape(1, -1)).abs().argmin(dim=1)

    def _sample_index(self, x: torch.Tensor) -> torch.Tensor:
        t = self.context.current
        if t is None:
            raise RuntimeError("TimestepActQuantizer: no timestep in the context; install it on the model "
                               "with install_timestep_context(model) and call the model with its timestep")
        n, b = x.shape[0], t.numel()
        if n % b != 0:
            raise ValueError(f"TimestepActQuantizer: leading dim {n} of the activation is not a multiple of "
                             f"the {b} timesteps in the context")
        idx = self.timestep_index(t.to(x.device))
        return idx.repeat_interleave(n // b) if n != b else idx

    @torch.no_grad()
    def observe(self, x: torch.Tensor, idx: Optional[torch.Tensor] = None) -> None:
        x = x.detach()
        if idx is None:
            idx = self._sample_index(x)
        rows = x.reshape(x.shape[0], -1).float()
        dev = x.device
        self.running_min = self.running_min.to(dev).scatter_reduce(0, idx, rows.amin(dim=1), "amin")
        self.running_max = self.running_max.to(dev).scatter_reduce(0, idx, rows.amax(dim=1), "amax")
        if self.init == "mse":
            for i in idx.unique().tolist():
                new = _random_subset(rows[idx == i].reshape(-1), self.max_samples, self._gen)
                old = self._samples.get(i)
                pool = new if old is None else torch.cat([old.to(dev), new])
                self._samples[i] = _random_subset(pool, self.max_samples, self._gen)

    @torch.no_grad()
    def _set_from_stats(self, use_mse: bool) -> None:
        rmin, rmax = self.running_min, self.running_max
        observed = rmin <= rmax
        if not bool(observed.any()):
            raise RuntimeError("TimestepActQuantizer.finish_calibration: no activations were observed "
                               "(set calibrating=True and run the model first)")
        lo = rmin.clamp_max(0).reshape(-1, 1)
        hi = rmax.clamp_min(0).reshape(-1, 1)
        n = lo.shape[0]
        obs_idx = observed.nonzero().reshape(-1)
        lo_o, hi_o = lo[obs_idx], hi[obs_idx]
        if use_mse and self._samples:
            width = max(s.numel() for s in self._samples.values())
            samples = torch.zeros(obs_idx.numel(), width + 2, device=lo.device)
            for row, i in enumerate(obs_idx.tolist()):
                s = self._samples.get(i)
                if s is not None:
                    samples[row, :s.numel()] = s.to(lo.device)
            samples[:, -2:] = torch.cat([lo_o, hi_o], dim=1)  # the observed extremes count too
            s_o, z_o = _mse_search_rows(samples, lo_o, hi_o, self.qmin, self.qmax, self.symmetric)
        else:
            s_o, z_o = int_qparams(lo_o, hi_o, self.qmin, self.qmax, self.symmetric)
        # unobserved timesteps borrow from the nearest observed timestep
        vals = self.timestep_values.to(lo.device)
        nearest = (vals.reshape(-1, 1) - vals[obs_idx].reshape(1, -1)).abs().argmin(dim=1)
        scale = s_o.reshape(-1)[nearest]
        zp = z_o.reshape(-1)[nearest]
        self.scale.copy_(scale.reshape(n).to(self.scale.device, self.scale.dtype))
        self.zero_point.copy_(zp.reshape(n).to(self.zero_point.device, self.zero_point.dtype))
        self.calibrated.fill_(True)

    @torch.no_grad()
    def finish_calibration(self) -> None:
        self.calibrating = False
        self._set_from_stats(use_mse=self.init == "mse")
        self._samples = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        idx = self._sample_index(x)
        if self.calibrating:
            self.observe(x, idx)
            return x
        if not bool(self.calibrated):
            raise RuntimeError("TimestepActQuantizer used before calibration: run the model with "
                               "calibrating=True, then call finish_calibration()")
        shape = (-1,) + (1,) * (x.dim() - 1)
        s = self.scale.to(x.dtype)[idx].reshape(shape)
        z = self.zero_point.to(x.dtype)[idx].reshape(shape)
        return fake_quant_int(x, s, z, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return (f"bits={self._bits}, timesteps={len(self.timestep_values)}, symmetric={self.symmetric}, "
                f"learnable={self.learnable}, init={self.init}, enabled={self.enabled}")


# ----------------------------------------------------------------------------------------------
# online per-token
# ----------------------------------------------------------------------------------------------
class OnlineTokenActQuantizer(nn.Module):
    """Dynamic per-token activation quantizer (FP4DiT online activation quantization; no calibration).

    A token is a row of the last dim; for conv inputs (4-D [B, C, H, W]) a row is one (b, c) plane
    (``rows="auto"``: 4-D -> planes, otherwise last dim; force with ``rows="last_dim"`` — e.g. for
    4-D attention tensors [B, heads, N, d] — or ``rows="plane"``).
    int: symmetric, Δ = absmax/(2^(b−1) − 1) per row; unsigned (``signed=False``, e.g. softmax
    probabilities): codes [0, 2^b − 1], Δ = max/(2^b − 1). fp: ExMy with maxval = row absmax
    (``exp_bits``/``man_bits`` or the default split for ``bits``; unsigned drops the sign bit).
    The per-row scale is computed without gradient; x gets the straight-through gradient.
    """

    def __init__(self, bits: int, fmt: str = "int", exp_bits: Optional[int] = None, man_bits: Optional[int] = None,
                 signed: bool = True, rows: str = "auto"):
        super().__init__()
        self.fmt = _check_fmt(fmt)
        self.signed = bool(signed)
        if rows not in ("auto", "last_dim", "plane"):
            raise ValueError(f"rows must be one of ['auto', 'last_dim', 'plane'], got {rows!r}")
        self.rows = rows
        self._bits = _check_act_bits(bits, self.fmt)
        if self.fmt == "fp":
            self.exp_bits, self.man_bits = resolve_fp_split(self._bits, exp_bits, man_bits, self.signed)
        else:
            if exp_bits is not None or man_bits is not None:
                raise ValueError("exp_bits/man_bits are only valid with fmt='fp'")
            self.exp_bits = self.man_bits = None
        self.enabled = True
        self.calibrating = False

    @property
    def bits(self) -> int:
        return self._bits

    @bits.setter
    def bits(self, value: int) -> None:
        value = _check_act_bits(value, self.fmt)
        if self.fmt == "fp":
            self.exp_bits, self.man_bits = resolve_fp_split(value, self.exp_bits, None, self.signed)
        self._bits = value

    def observe(self, x: torch.Tensor) -> None:  # dynamic: nothing to calibrate
        return None

    def finish_calibration(self) -> None:
        self.calibrating = False

    def _row_view(self, x: torch.Tensor) -> torch.Tensor:
        plane = self.rows == "plane" or (self.rows == "auto" and x.dim() == 4)
        if plane and x.dim() >= 3:
            return x.reshape(x.shape[0], x.shape[1], -1)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.calibrating:
            return x
        xr = self._row_view(x)
        if self.fmt == "fp" and self.signed:  # maxval = row absmax, computed inside (no gradient to it)
            return fp_quantize_token(xr, self.exp_bits, self.man_bits).reshape(x.shape)
        with torch.no_grad():
            # unsigned: max(max(x, 0)) = max(max(x), 0) without a clamped copy of x (a row max of -0.0 may stay
            # -0.0; both uses below clamp the scale away from 0, so the output is the same bit for bit)
            amax = xr.abs().amax(dim=-1, keepdim=True) if self.signed else xr.amax(dim=-1, keepdim=True).clamp_min_(0)
        if self.fmt == "fp":
            out = fp_quantize(xr, amax, self.exp_bits, self.man_bits, self.signed)
        else:
            qmin, qmax = int_range(self._bits, True) if self.signed else int_range(self._bits, False)
            scale = (amax / qmax).clamp_min(1e-12)
            out = fake_quant_int(xr, scale, torch.zeros_like(scale), qmin, qmax)
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        fmt = f"E{self.exp_bits}M{self.man_bits}" if self.fmt == "fp" else "int"
        return f"bits={self._bits}, fmt={fmt}, signed={self.signed}, rows={self.rows}, enabled={self.enabled}"


# ----------------------------------------------------------------------------------------------
# channel-split (Q-Diffusion shortcut splitting)
# ----------------------------------------------------------------------------------------------
class SplitActQuantizer(nn.Module):
    """Two activation quantizers over the two parts of the channel dim (dim 1) of the input: channels
    ``[:split]`` go through ``parts[0]``, ``[split:]`` through ``parts[1]``, and the results are concatenated
    again (Q-Diffusion's shortcut splitting, ``QuantModule.split``: the input of a UNet up-block ResNet's
    first conv / shortcut is ``cat([hidden_states, skip], dim=1)``, two tensors with very different ranges).
    Same small interface as the other activation quantizers; ``calibrating`` / ``enabled`` reach both parts,
    each part observes (and is initialised from) its own channels only."""

    def __init__(self, split: int, first: nn.Module, second: nn.Module):
        super().__init__()
        if isinstance(split, bool) or not isinstance(split, int) or split < 1:
            raise ValueError(f"split must be a positive int (channels of the first part), got {split!r}")
        self.split = int(split)
        self.parts = nn.ModuleList([first, second])
        self._enabled = True

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        for p in getattr(self, "parts", ()):
            p.enabled = bool(value)

    @property
    def calibrating(self) -> bool:
        return any(bool(p.calibrating) for p in self.parts)

    @calibrating.setter
    def calibrating(self, value: bool) -> None:
        for p in self.parts:
            p.calibrating = bool(value)

    @property
    def bits(self) -> int:
        return self.parts[0].bits

    @bits.setter
    def bits(self, value: int) -> None:
        for p in self.parts:
            p.bits = value

    def _halves(self, x: torch.Tensor) -> tuple:
        if x.dim() < 2 or x.shape[1] <= self.split:
            raise ValueError(f"SplitActQuantizer: input of shape {tuple(x.shape)} has no channels after the "
                             f"split point {self.split} (dim 1)")
        return x[:, :self.split], x[:, self.split:]

    def observe(self, x: torch.Tensor) -> None:
        a, b = self._halves(x)
        self.parts[0].observe(a)
        self.parts[1].observe(b)

    def finish_calibration(self) -> None:
        for p in self.parts:
            p.finish_calibration()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._enabled:
            return x
        a, b = self._halves(x)
        return torch.cat([self.parts[0](a), self.parts[1](b)], dim=1)

    def extra_repr(self) -> str:
        return f"split={self.split}"
