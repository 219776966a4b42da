"""Quantization primitives: integer affine and floating-point ExMy fake quantizers, the 1-bit binary weight
quantizer, binary residual.

Everything here is a pure tensor function or a small ``nn.Module`` holding the quantizer's
parameters. Layers, activation quantizers, AdaRound and packing are built on top.

Integer quantizer (BRECQ / Q-Diffusion ``UniformAffineQuantizer``; EfficientDM / MPQ-DM learnable form)
    x̂ = Δ · (clamp(⌊x/Δ⌉ + ⌊z⌉, qmin, qmax) − ⌊z⌉), straight-through rounding. Written so that it is
    bit-identical to ``torch.fake_quantize_per_{tensor,channel}_affine`` (which multiply by the float32
    reciprocal ``1/Δ`` and round half to even). Gradients reach x inside the range, and Δ and z
    everywhere (inside the range Δ gets the LSQ-like STE gradient ⌊x/Δ⌉ − x/Δ; for clipped values
    x̂ = Δ(qmax − z) so both Δ and z receive the clip-bound gradient, which is what the ReLU-clip
    form of EfficientDM/MPQ-DM computes).

Floating-point quantizer (FP4DiT, arXiv 2503.15465, adapted from Qualcomm's FP8 code)
    bias b = 2^E − log2(maxval) + log2(2 − 2^−M) − 1, x_c = clip(x, −maxval, maxval),
    e = max(⌊log2|x_c| + b⌋, 1), s = 2^(e − M − b), x̂ = s·⌊x_c/s⌉. The largest value of the grid is
    (2 − 2^−M)·2^(2^E − 1 − b) = maxval, i.e. all codes are finite numbers (no Inf/NaN codes), which is
    exactly the ``*fn`` formats of ml_dtypes when maxval is the full-mantissa maximum.
    Numerically we never form b: with base = maxval / (2 − 2^−M) (the leading power of the top binade)
    the exponent is read with ``torch.frexp(|x_c| / base)`` and s = base·2^(e − e_top − M), e_top = 2^E − 1.
    When maxval is a format maximum, base is a power of two, so s is exact and the result matches
    ml_dtypes bit for bit (a naive ``floor(log2|x| + b)`` fails at exact powers of two).

Granularity and layout (shared by both quantizers)
    A tensor is viewed as rows ``[C, G, g]``: C = size of ``ch_axis`` (output channel for weights),
    the remaining dims flattened to K elements per channel (in_features, or in·kh·kw for conv) and cut
    into G = ⌈K/g⌉ groups of ``group_size`` consecutive elements. If K is not a multiple of
    ``group_size`` the last group of every channel is shorter: we zero-pad it, which is exactly
    equivalent because 0 is on every grid here (zero_point is an integer; FP has an exact 0), so
    padding changes neither min/max/absmax nor the L_p error. Parameters are stored as shape ``(1,)``
    (tensor), ``(C,)`` (channel) or ``(C, G)`` (group).

Binary (1-bit) weight quantizer (:class:`BinaryQuantizer`; MPQ-DM's b−1 group at W2)
    Q(w) = μ_i + α_i·sign(w − μ_i) per output channel (μ_i = channel mean, α_i = mean |w − μ_i| at init),
    straight-through gradients. Weights only: ``INT_BITS`` (integer grids, activations, settings) stays 2..8.

Channel masks (MPQ-DM OMQ mixed groups)
    With ``channel_mask`` (bool, length C along ``ch_axis``) a quantizer only covers the masked
    channels: statistics ignore the other channels and the output is exactly 0 there, so several
    quantizers with disjoint masks sum to the full quantized tensor.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import WEIGHT_BITS

# Integer grid widths: exactly the weight widths the params accept (``pipeline.config.WEIGHT_BITS``, the one
# definition); quantized activation widths are the same range (``ACT_BITS`` minus A16/A32, which mean FP).
INT_BITS = tuple(WEIGHT_BITS)
# The one table of default ExMy splits {width: (E, M)} of signed FP formats (the spec and the activation
# quantizers read it when only a width is given). Weights: FP4DiT E2M1 for W4, OCP E4M3 for W8; activations:
# FP4DiT E2M3 for A6 and E3M4 for A8 (arXiv 2503.15465). Other widths: our choice, keeping E >= 1.
# An unsigned format (post-softmax probabilities) spends the sign bit on the mantissa: E, M + 1.
FP_WEIGHT_FORMATS = {3: (1, 1), 4: (2, 1), 5: (2, 2), 6: (2, 3), 7: (3, 3), 8: (4, 3)}
FP_ACT_FORMATS = {3: (1, 1), 4: (2, 1), 5: (2, 2), 6: (2, 3), 7: (3, 3), 8: (3, 4)}
INT_GRANULARITIES = ("tensor", "channel", "group")
FP_GRANULARITIES = ("tensor", "channel", "group", "token")
MSE_CANDIDATES = 80  # shrink the range in 1 % steps (Q-Diffusion / MPQ-DM 'mse' init)
MSE_STEP = 0.01
LP_NORM = 2.4
_MIN_SCALE = 1e-8  # keeps 1/Δ finite for all-zero channels
_MIN_MAXVAL = 1e-20


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------
def check_int_bits(bits, name: str = "bits") -> int:
    """Return ``bits`` if it is an integer bit width in 2..8, else raise ValueError/TypeError."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{name} must be an int in {list(INT_BITS)}, got {bits!r}")
    if bits not in INT_BITS:
        raise ValueError(f"{name} must be one of {list(INT_BITS)} for integer quantization, got {bits}")
    return bits


def check_fp_format(exp_bits, man_bits, signed: bool = True) -> tuple[int, int]:
    """Validate an ExMy format: exp_bits >= 1 (E=0 would be an integer grid), man_bits >= 0."""
    for name, v in (("exp_bits", exp_bits), ("man_bits", man_bits)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {v!r}")
    if exp_bits < 1:
        raise ValueError(
            f"exp_bits must be >= 1 for a floating-point format, got {exp_bits} "
            "(E=0 is a uniform integer grid: use IntQuantizer)")
    if man_bits < 0:
        raise ValueError(f"man_bits must be >= 0, got {man_bits}")
    total = exp_bits + man_bits + (1 if signed else 0)
    if total > 16:
        raise ValueError(f"exp_bits + man_bits (+1 sign bit) must be <= 16, got {total}")
    return exp_bits, man_bits


def _check_granularity(granularity, allowed) -> str:
    if granularity not in allowed:
        raise ValueError(f"granularity must be one of {list(allowed)}, got {granularity!r}")
    return granularity


def _check_group_size(group_size) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    return group_size


# ----------------------------------------------------------------------------------------------
# integer fake quantization
# ----------------------------------------------------------------------------------------------
class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity gradient (straight-through estimator).

    An autograd Function rather than ``(round(x) - x).detach() + x`` so the forward value is exactly
    ``torch.round(x)`` (the detach trick turns −0.0 into +0.0, which would break FP sign codes)."""
    return _RoundSTE.apply(x)


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range: symmetric [-2^(b-1), 2^(b-1)-1] (zero_point 0), asymmetric [0, 2^b-1]."""
    check_int_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def fake_quant_int(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                   qmin: int, qmax: int) -> torch.Tensor:
    """x̂ = (clamp(⌊x·(1/Δ)⌉ + ⌊z⌉, qmin, qmax) − ⌊z⌉)·Δ with straight-through rounding.

    ``scale``/``zero_point`` broadcast against ``x``. Multiplying by the reciprocal (not dividing)
    and rounding half to even makes this identical to torch's fake_quantize ops.
    """
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    zero_point = torch.as_tensor(zero_point, dtype=x.dtype, device=x.device)
    if not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or zero_point.requires_grad)):
        # inference (sampling for evaluation): the same operations in the same order, in place on one buffer
        # (no autograd Function, one allocation instead of five) -- bit-identical to the path below
        q = torch.round(x * (1.0 / scale))
        z = torch.round(zero_point)
        if torch.broadcast_shapes(q.shape, z.shape) == q.shape:
            return q.add_(z).clamp_(qmin, qmax).sub_(z).mul_(scale)
    z = round_ste(zero_point)
    q = torch.clamp(round_ste(x * (1.0 / scale)) + z, qmin, qmax)
    return (q - z) * scale


def int_qparams(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool):
    """(scale, zero_point) covering [lo, hi] (lo <= 0 <= hi). Symmetric: Δ = absmax / qmax, z = 0,
    so ±absmax are both representable (the extra negative code −2^(b−1) stays available)."""
    if symmetric:
        absmax = torch.maximum(-lo, hi)
        scale = (absmax / qmax).clamp_min(_MIN_SCALE)
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(_MIN_SCALE)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero_point


# ----------------------------------------------------------------------------------------------
# floating-point ExMy fake quantization
# ----------------------------------------------------------------------------------------------
_F32_EXP_BIAS = 127
_F32_MAN_BITS = 23


def _rel_exponent(r: torch.Tensor, e_top: int, exact_zero: bool = True) -> torch.Tensor:
    """(k − 1).clamp(1 − e_top, 0) with ``r = m·2^k`` as ``torch.frexp`` defines k (k = 0 for r = 0), for
    r >= 0 (no gradient).

    float32 fast path (bit-identical to frexp, which is the slowest op of FP fake quantization on CPU):
    for a normal r the IEEE exponent field f gives k − 1 = f − 127; zero gets frexp's k − 1 = −1; a subnormal
    r (field 0) has k − 1 <= −127, which the clamp maps to 1 − e_top whenever e_top <= 127 (E <= 7, every
    weight / activation format here), and the field-0 value −127 clamps to the same. Wider exponents
    (unsigned 16-bit P, e.g. E13M3) read the (rare) subnormals with frexp; other dtypes use frexp. ``exact_zero=False`` skips the zero
    fix-up (zeros then get 1 − e_top instead of −1): for callers whose result does not depend on the step
    at 0 (fake quantization and codes: 0 / s · s = 0 with its sign, code 0 for any step)."""
    if r.dtype == torch.float32:
        bits = r.contiguous().view(torch.int32)
        rel = (bits >> _F32_MAN_BITS) - _F32_EXP_BIAS
        if exact_zero:
            rel = torch.where(bits == 0, torch.full_like(rel, -1), rel)
        if e_top > _F32_EXP_BIAS:  # the clamp no longer hides subnormals: read them with frexp
            sub = (bits > 0) & (bits < 2 ** _F32_MAN_BITS)
            if bool(sub.any()):
                rel[sub] = torch.frexp(r[sub])[1] - 1
        return rel.clamp_(min=1 - e_top, max=0)
    _, k = torch.frexp(r)  # r = m·2^k, m in [0.5, 1)
    return (k - 1).clamp(min=1 - e_top, max=0)


def fp_step(x_abs: torch.Tensor, maxval: torch.Tensor, exp_bits: int, man_bits: int, exact_zero: bool = True):
    """Local grid step s(x) and relative exponent r = e − e_top (detached) for |x| <= maxval
    (``exact_zero=False``: the step at x = 0 may differ, see :func:`_rel_exponent`)."""
    e_top = 2 ** exp_bits - 1
    base = maxval / (2.0 - 2.0 ** (-man_bits))  # = 2^(e_top − b): leading power of the top binade
    with torch.no_grad():
        # x/base = m·2^k, m in [0.5, 1); e = max(floor(log2|x| + b), 1), e <= e_top
        rel = _rel_exponent((x_abs / base).detach(), e_top, exact_zero)
    step = base * torch.exp2((rel - man_bits).to(base.dtype))
    return step.clamp_min(torch.finfo(step.dtype).tiny), rel


def fp_grid_max(maxval: torch.Tensor, exp_bits: int, man_bits: int) -> torch.Tensor:
    """Largest grid value for clipping value ``maxval``, computed exactly as :func:`fp_quantize` forms it
    (equals maxval up to the float rounding of maxval / (2 − 2^−M))."""
    base = maxval / (2.0 - 2.0 ** (-man_bits))
    top_step = base * torch.exp2(torch.tensor(-float(man_bits), dtype=base.dtype, device=base.device))
    return top_step * float(2 ** (man_bits + 1) - 1)


def fp_clip(x: torch.Tensor, maxval: torch.Tensor, signed: bool) -> torch.Tensor:
    """x clipped to [−maxval, maxval] (unsigned: [0, maxval])."""
    lo = -maxval if signed else torch.zeros_like(maxval)
    return torch.minimum(torch.maximum(x, lo), maxval)


def fp_quantize(x: torch.Tensor, maxval, exp_bits: int, man_bits: int, signed: bool = True) -> torch.Tensor:
    """FP4DiT / Qualcomm ExMy fake quantization with clipping value ``maxval`` (broadcast against x).

    Straight-through rounding; gradients reach x inside [−maxval, maxval] and maxval through the
    clip and the step. Unsigned formats (post-softmax probabilities) clip to [0, maxval].
    """
    check_fp_format(exp_bits, man_bits, signed)
    maxval = torch.as_tensor(maxval, dtype=x.dtype, device=x.device).clamp_min(_MIN_MAXVAL)
    if _FP_FAST_PATH and not (torch.is_grad_enabled() and (x.requires_grad or maxval.requires_grad)):
        out = _fp_quantize_inference(x, maxval, exp_bits, man_bits, signed)
        if out is not None:
            return out
    return _fp_quantize_reference(x, maxval, exp_bits, man_bits, signed)


def _fp_quantize_reference(x: torch.Tensor, maxval: torch.Tensor, exp_bits: int, man_bits: int,
                           signed: bool) -> torch.Tensor:
    """The straight-through formulation of :func:`fp_quantize` (``maxval`` already a clamped tensor)."""
    x_c = fp_clip(x, maxval, signed)
    step, _ = fp_step(x_c.abs(), maxval, exp_bits, man_bits, exact_zero=False)  # 0 stays 0 (sign kept)
    return step * round_ste(x_c / step)


_F32_EXP_MASK = 0x7F800000  # exponent field of a float32
_FP_FAST_PATH = True  # off only inside reference_fp_path()


@contextlib.contextmanager
def reference_fp_path():
    """Run FP fake quantization through the straight-through reference formulation only (no inference
    fast path), e.g. to time or check the fast path against it."""
    global _FP_FAST_PATH
    prev, _FP_FAST_PATH = _FP_FAST_PATH, False
    try:
        yield
    finally:
        _FP_FAST_PATH = prev


def _fp_quantize_inference(x: torch.Tensor, maxval: torch.Tensor, exp_bits: int, man_bits: int,
                           signed: bool) -> Optional[torch.Tensor]:
    """No-autograd float32 form of :func:`fp_quantize`, bit-identical to :func:`_fp_quantize_reference`
    (None where it does not apply: other dtypes, or the rare wide formats with a large maxval).

    Two buffers instead of about fifteen, written in place. The clip, |x_c| / base, the division by the step,
    the rounding and the product with the step are the reference's operations in the reference's order. Only
    the step is formed differently: the reference computes s = max(base · 2^(rel − M), tiny) with
    rel = clamp(f − 127, 1 − e_top, 0) (f = float32 exponent field of r = |x_c| / base) and ``torch.exp2``,
    which is exact at integer arguments. Here 2^rel is r's own bit pattern with the mantissa cleared and the
    field clamped to [128 − e_top, 127] (so the subnormal and zero r of the reference's clamp included), and
    s = max(2^rel · (base · 2^−M), tiny): base · 2^−M is exact (a power-of-two scaling of a normal number)
    and both products are the exact real base · 2^(rel − M) rounded once, so they are equal; 2^(rel − M) is
    a normal float32 for e_top + M <= 126 (every format with E <= 6), exact as a subnormal below that.
    Wider exponents (e_top > 127: unsigned 16-bit P such as E13M3) clamp the field at 1 instead, and are
    taken only when base · 2^−M <= 1 (P on [0, 1]): then every step the two forms could tell apart (r
    subnormal, or 2^(rel − M) below float32's range) is below ``tiny`` in both and clamps to it.
    The result is contiguous like the reference's (a different memory layout would change the rounding of
    the matmuls that consume it), so a non-contiguous maxval takes the reference path."""
    if x.dtype != torch.float32 or maxval.dtype != torch.float32 or not maxval.is_contiguous():
        return None
    base = maxval / (2.0 - 2.0 ** (-man_bits))
    if not _fast_step_applies(base, exp_bits, man_bits):
        return None
    x = x.contiguous()  # the reference's result is contiguous (its exponent read makes r contiguous): same layout
    lo = -maxval if signed else torch.zeros_like(maxval)
    x_c = torch.maximum(x, lo)
    torch.minimum(x_c, maxval, out=x_c)
    step = _fp_step_(torch.abs(x_c).div_(base), base, exp_bits, man_bits)  # from r = x_abs / base
    return x_c.div_(step).round_().mul_(step)


def _fast_step_applies(base: torch.Tensor, exp_bits: int, man_bits: int) -> bool:
    """Whether :func:`_fp_step_` equals :func:`fp_step`'s step for this base (see :func:`_fp_quantize_inference`)."""
    return 2 ** exp_bits - 1 <= _F32_EXP_BIAS or bool((base * 2.0 ** (-man_bits) <= 1.0).all())


def _fp_step_(r: torch.Tensor, base: torch.Tensor, exp_bits: int, man_bits: int) -> torch.Tensor:
    """The step max(base · 2^(rel − M), tiny) of :func:`fp_step` for r = |x_c| / base (float32, r >= 0),
    written into r's buffer (valid where :func:`_fast_step_applies`)."""
    e_top = 2 ** exp_bits - 1
    base_m = base * 2.0 ** (-man_bits)
    field_lo = max(_F32_EXP_BIAS + 1 - e_top, 1)
    bits = r.view(torch.int32)
    bits.clamp_(min=field_lo << _F32_MAN_BITS, max=(_F32_EXP_BIAS << _F32_MAN_BITS) | (2 ** _F32_MAN_BITS - 1))
    bits.bitwise_and_(_F32_EXP_MASK)  # r -> 2^rel
    step = r.mul_(base_m)
    # max(step, tiny) is a no-op when the smallest possible step (2^(1 - e_top) * base_m) is not below tiny
    tiny = torch.finfo(torch.float32).tiny
    if not bool((base_m * 2.0 ** (field_lo - _F32_EXP_BIAS) >= tiny).all()):
        step.clamp_min_(tiny)
    return step


def fp_quantize_token(x: torch.Tensor, exp_bits: int, man_bits: int, signed: bool = True) -> torch.Tensor:
    """``fp_quantize(x, maxval)`` with the per-token clipping value maxval = absmax of each row of the last dim
    (:meth:`FPQuantizer.token_maxval`; no gradient to it), the FP4DiT online activation quantizer.

    Without autograd a signed float32 ``x`` takes a shorter form: the clip to the row's own absmax is an
    identity (x_c = x bit for bit while every row max is finite), so |x| doubles as the buffer of
    r = |x_c| / base and the step -- bit-identical to the general path."""
    if _FP_FAST_PATH and signed and x.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad):
        check_fp_format(exp_bits, man_bits, signed)
        x = x.contiguous()  # the reference's result is contiguous: same memory layout (matmuls downstream see it)
        a = torch.abs(x)
        maxval = a.amax(dim=-1, keepdim=True).clamp_min_(_MIN_MAXVAL)
        base = maxval / (2.0 - 2.0 ** (-man_bits))
        if bool(torch.isfinite(maxval).all()) and _fast_step_applies(base, exp_bits, man_bits):
            step = _fp_step_(a.div_(base), base, exp_bits, man_bits)
            return torch.div(x, step).round_().mul_(step)
        return fp_quantize(x, maxval, exp_bits, man_bits, signed)
    return fp_quantize(x, x.detach().abs().amax(dim=-1, keepdim=True), exp_bits, man_bits, signed)


def fp_encode(x: torch.Tensor, maxval, exp_bits: int, man_bits: int, signed: bool = True) -> torch.Tensor:
    """Integer codes (sign | exponent field | mantissa) of ``fp_quantize(x, ...)``.

    Exponent field 0 = subnormal (value mant·2^(1−b−M)), field f >= 1 = normal ((2^M + mant)·2^(f−b−M)).
    All codes are finite (no Inf/NaN). Returns uint8 when the format has at most 8 bits, else int32.
    """
    check_fp_format(exp_bits, man_bits, signed)
    e_top = 2 ** exp_bits - 1
    with torch.no_grad():
        maxval = torch.as_tensor(maxval, dtype=x.dtype, device=x.device).clamp_min(_MIN_MAXVAL)
        x_c = fp_clip(x, maxval, signed)
        step, rel = fp_step(x_c.abs(), maxval, exp_bits, man_bits, exact_zero=False)  # code of 0: 0
        q = torch.round(x_c / step)
        neg = torch.signbit(q)
        q = q.abs().to(torch.int64)
        rel = rel.to(torch.int64)
        # rounding up out of a binade lands on the next binade's leading value
        carry = q >= 2 ** (man_bits + 1)
        q = torch.where(carry, q >> 1, q)
        rel = torch.where(carry, rel + 1, rel)
        normal = q >= 2 ** man_bits
        field = torch.where(normal, rel + e_top, torch.zeros_like(rel))
        mant = torch.where(normal, q - 2 ** man_bits, q)
        code = (field << man_bits) | mant
        if signed:
            code = code | (neg.to(torch.int64) << (exp_bits + man_bits))
        nbits = exp_bits + man_bits + (1 if signed else 0)
        return code.to(torch.uint8 if nbits <= 8 else torch.int32)


def fp_decode(codes: torch.Tensor, maxval, exp_bits: int, man_bits: int, signed: bool = True,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`fp_encode` (bit-exact: decode(encode(x)) == fp_quantize(x))."""
    check_fp_format(exp_bits, man_bits, signed)
    e_top = 2 ** exp_bits - 1
    c = codes.to(torch.int64)
    mant = c & (2 ** man_bits - 1)
    field = (c >> man_bits) & e_top
    normal = field > 0
    q = torch.where(normal, mant + 2 ** man_bits, mant)
    rel = torch.where(normal, field - e_top, torch.full_like(field, 1 - e_top))
    maxval = torch.as_tensor(maxval, dtype=dtype, device=codes.device).clamp_min(_MIN_MAXVAL)
    base = maxval / (2.0 - 2.0 ** (-man_bits))
    step = (base * torch.exp2((rel - man_bits).to(dtype))).clamp_min(torch.finfo(dtype).tiny)
    val = step * q.to(dtype)
    if signed:
        sign = ((c >> (exp_bits + man_bits)) & 1).bool()
        val = torch.where(sign, -val, val)
    return val


def fp_max_value(exp_bits: int, man_bits: int) -> float:
    """Largest value of the all-finite ExMy grid with IEEE bias 2^(E−1) − 1: (2 − 2^−M)·2^(2^(E−1))."""
    check_fp_format(exp_bits, man_bits)
    return (2.0 - 2.0 ** (-man_bits)) * 2.0 ** (2 ** exp_bits - 1 - (2 ** (exp_bits - 1) - 1))


# ----------------------------------------------------------------------------------------------
# shared layout: view a tensor as [C, G, g] rows
# ----------------------------------------------------------------------------------------------
class RowLayout:
    """How a quantizer with a given granularity sees a tensor: rows [C, G, g] (see module doc)."""

    def __init__(self, granularity: str, group_size: int, ch_axis: int, has_mask: bool):
        self.granularity = granularity
        self.group_size = group_size
        self.ch_axis = ch_axis
        self.has_mask = has_mask

    def view(self, x: torch.Tensor):
        if x.dim() == 0:
            x = x.reshape(1)
        if self.granularity == "tensor" and not self.has_mask:
            return x.reshape(1, 1, -1), (x.shape, None, x.numel(), 0)
        ax = self.ch_axis % x.dim()
        xr = x.movedim(ax, 0)
        moved_shape = xr.shape
        c = xr.shape[0]
        xr = xr.reshape(c, -1)
        k = xr.shape[1]
        if self.granularity == "group":
            g = self.group_size
            n_groups = -(-k // g)
            pad = n_groups * g - k
            if pad:
                xr = F.pad(xr, (0, pad))
            return xr.reshape(c, n_groups, g), (moved_shape, ax, k, pad)
        return xr.reshape(c, 1, k), (moved_shape, ax, k, 0)

    @staticmethod
    def unview(xv: torch.Tensor, meta) -> torch.Tensor:
        shape, ax, k, pad = meta
        if ax is None:
            return xv.reshape(shape)
        c = xv.shape[0]
        xr = xv.reshape(c, -1)
        if pad:
            xr = xr[:, :k]
        return xr.reshape(shape).movedim(0, ax)

    def param_view(self, p: torch.Tensor) -> torch.Tensor:
        if self.granularity == "tensor":
            return p.reshape(1, 1, 1)
        if self.granularity == "channel":
            return p.reshape(-1, 1, 1)
        return p.reshape(p.shape[0], p.shape[1], 1)

    def param_shape(self, xv: torch.Tensor) -> tuple[int, ...]:
        if self.granularity == "tensor":
            return (1,)
        if self.granularity == "channel":
            return (xv.shape[0],)
        return (xv.shape[0], xv.shape[1])

    def reduce_dims(self):
        return (0, 1, 2) if self.granularity == "tensor" else (2,)


class _LazyParamsMixin:
    """Quantizer parameters whose shape is only known at calibration (lazy, Q-Diffusion style).

    ``_set_param`` writes in place when the shape matches (keeps optimizer references valid) and
    re-creates the Parameter/buffer otherwise; loading a state dict resizes them first.
    """

    _lazy_names: tuple[str, ...] = ()

    def _init_lazy(self, learnable: bool, channel_mask) -> None:
        """Register the channel mask and every ``_lazy_names`` entry, empty until calibration: Parameters
        when ``learnable``, buffers otherwise."""
        self.learnable = bool(learnable)
        self.register_buffer("channel_mask", _as_mask(channel_mask))
        for name in self._lazy_names:
            if self.learnable:
                self.register_parameter(name, nn.Parameter(torch.empty(0)))
            else:
                self.register_buffer(name, torch.empty(0))

    def _set_param(self, name: str, value: torch.Tensor, learnable: bool) -> None:
        cur = getattr(self, name)
        value = value.detach()
        if cur is not None and cur.shape == value.shape and isinstance(cur, nn.Parameter) == learnable:
            with torch.no_grad():
                cur.copy_(value.to(cur.dtype))
            return
        if name in self._parameters:
            del self._parameters[name]
        if name in self._buffers:
            del self._buffers[name]
        if learnable:
            self.register_parameter(name, nn.Parameter(value.clone()))
        else:
            self.register_buffer(name, value.clone())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in self._lazy_names:
            key = prefix + name
            if key in state_dict:
                cur = getattr(self, name)
                if cur is None or cur.shape != state_dict[key].shape:
                    dev = cur.device if cur is not None else None
                    self._set_param(name, torch.zeros(state_dict[key].shape, dtype=state_dict[key].dtype,
                                                      device=dev),
                                    isinstance(cur, nn.Parameter))
        key = prefix + "channel_mask"
        if key in state_dict and getattr(self, "channel_mask", None) is None:
            self.register_buffer("channel_mask", torch.zeros_like(state_dict[key], dtype=torch.bool))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def _mask_view(mask: Optional[torch.Tensor], xv: torch.Tensor) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if mask.numel() != xv.shape[0]:
        raise ValueError(f"channel_mask has {mask.numel()} entries but the tensor has {xv.shape[0]} "
                         "channels along ch_axis")
    return mask.to(xv.device).reshape(-1, 1, 1)


def _param_dtype(x: torch.Tensor) -> torch.dtype:
    """Quantizer parameters are float32 (float64 only for float64 inputs), also for fp16/bf16 models."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as_mask(channel_mask) -> Optional[torch.Tensor]:
    if channel_mask is None:
        return None
    m = torch.as_tensor(channel_mask)
    if m.dim() != 1:
        raise ValueError(f"channel_mask must be a 1-D bool tensor, got shape {tuple(m.shape)}")
    return m.bool()


# ----------------------------------------------------------------------------------------------
# integer quantizer module
# ----------------------------------------------------------------------------------------------
class IntQuantizer(_LazyParamsMixin, nn.Module):
    """Uniform affine integer quantizer (BRECQ/Q-Diffusion ``UniformAffineQuantizer``,
    EfficientDM/MPQ-DM learnable variant).

    Args:
        bits: 2..8.
        symmetric: codes [-2^(b-1), 2^(b-1)-1] with zero_point 0; else [0, 2^b-1] with a zero point.
        granularity: "tensor", "channel" (along ``ch_axis``) or "group" (``group_size`` consecutive
            elements of the flattened rest of each channel; a short last group is zero-padded).
        init: "minmax" (range [min(x,0), max(x,0)]) or "mse" (shrink that range by 1 % steps for 80
            candidates and keep, per channel/group independently, the one with the lowest L_2.4 error).
        learnable: scale and zero_point become ``nn.Parameter`` (zero_point is stored as a float and
            rounded straight-through in the forward).
        channel_mask: bool [C]; the quantizer covers only these channels, outputs 0 elsewhere.

    Parameters are created by :meth:`calibrate` (called lazily by the first ``forward``/``quantize``).
    Changing ``bits`` afterwards marks the quantizer for re-calibration on its next input.
    """

    _lazy_names = ("scale", "zero_point")

    def __init__(self, bits: int, symmetric: bool = False, granularity: str = "channel",
                 group_size: int = 128, ch_axis: int = 0, init: str = "minmax", learnable: bool = False,
                 channel_mask=None):
        super().__init__()
        self._bits = check_int_bits(bits)
        self.symmetric = bool(symmetric)
        self.granularity = _check_granularity(granularity, INT_GRANULARITIES)
        self.group_size = _check_group_size(group_size)
        if isinstance(ch_axis, bool) or not isinstance(ch_axis, int):
            raise TypeError(f"ch_axis must be an int, got {ch_axis!r}")
        self.ch_axis = ch_axis
        if init not in ("minmax", "mse"):
            raise ValueError(f"init must be one of ['minmax', 'mse'], got {init!r}")
        self.init = init
        self._init_lazy(learnable, channel_mask)
        self._stale = False

    # -- properties --------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return self._bits

    @bits.setter
    def bits(self, value: int) -> None:
        value = check_int_bits(value)
        if value != self._bits:
            self._bits = value
            self._stale = True

    @property
    def qmin(self) -> int:
        return int_range(self._bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return int_range(self._bits, self.symmetric)[1]

    @property
    def initialized(self) -> bool:
        return self.scale.numel() > 0 and not self._stale

    def layout(self) -> RowLayout:
        """The [C, G, g] row view this quantizer applies to a tensor (see module docstring)."""
        return RowLayout(self.granularity, self.group_size, self.ch_axis, self.channel_mask is not None)

    def extra_repr(self) -> str:
        return (f"bits={self._bits}, symmetric={self.symmetric}, granularity={self.granularity}, "
                f"group_size={self.group_size}, ch_axis={self.ch_axis}, init={self.init}, "
                f"learnable={self.learnable}, masked={self.channel_mask is not None}")

    # -- calibration -------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Set scale/zero_point from ``x`` (min-max or MSE search, per granularity)."""
        lay = self.layout()
        xv, _ = lay.view(x.detach())
        mask = _mask_view(self.channel_mask, xv)
        if mask is not None:
            xv = torch.where(mask, xv, torch.zeros((), dtype=xv.dtype, device=xv.device))
        dims = lay.reduce_dims()
        lo = xv.amin(dim=dims, keepdim=True).clamp_max(0)
        hi = xv.amax(dim=dims, keepdim=True).clamp_min(0)
        qmin, qmax = self.qmin, self.qmax
        scale, zp = int_qparams(lo, hi, qmin, qmax, self.symmetric)
        if self.init == "mse":
            scale, zp = self._mse_search(xv, lo, hi, dims, scale, zp)
        shape = lay.param_shape(xv)
        pdtype = _param_dtype(x)
        self._set_param("scale", scale.reshape(shape).to(pdtype), self.learnable)
        self._set_param("zero_point", zp.reshape(shape).to(pdtype), self.learnable)
        self._stale = False

    def _mse_search(self, xv, lo, hi, dims, scale, zp):
        qmin, qmax = self.qmin, self.qmax
        best_err = torch.full_like(scale, float("inf"))
        best_scale, best_zp = scale.clone(), zp.clone()
        for i in range(MSE_CANDIDATES):
            f = 1.0 - MSE_STEP * i
            s, z = int_qparams(lo * f, hi * f, qmin, qmax, self.symmetric)
            err = (fake_quant_int(xv, s, z, qmin, qmax) - xv).abs().pow(LP_NORM).sum(dim=dims, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, s, best_scale)
            best_zp = torch.where(better, z, best_zp)
        return best_scale, best_zp

    def _ensure_init(self, x: torch.Tensor) -> None:
        if not self.initialized:
            self.calibrate(x)

    # -- forward / codes ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._ensure_init(x)
        lay = self.layout()
        xv, meta = lay.view(x)
        s = lay.param_view(self.scale).to(x.dtype)
        z = lay.param_view(self.zero_point).to(x.dtype)
        out = fake_quant_int(xv, s, z, self.qmin, self.qmax)
        mask = _mask_view(self.channel_mask, xv)
        if mask is not None:
            out = torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device))
        return lay.unview(out, meta)

    @torch.no_grad()
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (int32, same shape as x) in [qmin, qmax]; ⌊z⌉ outside the channel mask."""
        self._ensure_init(x)
        lay = self.layout()
        xv, meta = lay.view(x)
        s = lay.param_view(self.scale).to(x.dtype)
        z = torch.round(lay.param_view(self.zero_point).to(x.dtype))
        codes = torch.clamp(torch.round(xv * (1.0 / s)) + z, self.qmin, self.qmax)
        mask = _mask_view(self.channel_mask, xv)
        if mask is not None:
            codes = torch.where(mask, codes, z.expand_as(codes))
        return lay.unview(codes, meta).to(torch.int32)

    def dequantize(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(codes − ⌊z⌉)·Δ, 0 outside the channel mask; equals ``forward(x)`` for ``codes = quantize(x)``."""
        if self.scale.numel() == 0:
            raise RuntimeError("IntQuantizer.dequantize: quantizer is not calibrated (call calibrate(x) first)")
        lay = self.layout()
        cv, meta = lay.view(codes.to(dtype))
        s = lay.param_view(self.scale).to(dtype)
        z = torch.round(lay.param_view(self.zero_point).to(dtype))
        out = (cv - z) * s
        mask = _mask_view(self.channel_mask, cv)
        if mask is not None:
            out = torch.where(mask, out, torch.zeros((), dtype=dtype, device=out.device))
        return lay.unview(out, meta)

    def grid_params(self, x: torch.Tensor):
        """(view, meta, scale, zero_point, mask) of ``x`` in this quantizer's row layout
        (helper for AdaRound and packing)."""
        self._ensure_init(x)
        lay = self.layout()
        xv, meta = lay.view(x)
        return (xv, meta, lay.param_view(self.scale).to(x.dtype), lay.param_view(self.zero_point).to(x.dtype),
                _mask_view(self.channel_mask, xv))


# ----------------------------------------------------------------------------------------------
# floating-point quantizer module
# ----------------------------------------------------------------------------------------------
class FPQuantizer(_LazyParamsMixin, nn.Module):
    """Floating-point ExMy fake quantizer (FP4DiT, arXiv 2503.15465) with a clipping value per
    tensor / channel / group (FP4DiT default: groups of 128) or per token (dynamic row absmax of the
    last dim, computed at run time; no calibration).

    Args:
        exp_bits (E >= 1), man_bits (M >= 0), signed: format; ``bits`` = 1 + E + M (E + M unsigned).
        init: "absmax" (FP4DiT: maxval = absmax) or "mse" (shrink absmax by 1 % steps, 80 candidates,
            L_2.4 error, per channel/group — our addition; FP4DiT disables its search).
        learnable: maxval becomes an ``nn.Parameter`` (our addition; FP4DiT keeps it fixed).
        channel_mask: as for :class:`IntQuantizer`.
    Codes: :meth:`encode` gives uint8 codes (sign | exponent | mantissa); :meth:`decode` inverts
    exactly. For "token" granularity pass the per-row maxval to ``decode`` (see :meth:`token_maxval`).
    """

    _lazy_names = ("maxval",)

    def __init__(self, exp_bits: int, man_bits: int, signed: bool = True, granularity: str = "tensor",
                 group_size: int = 128, ch_axis: int = 0, channel_mask=None, init: str = "absmax",
                 learnable: bool = False):
        super().__init__()
        self.exp_bits, self.man_bits = check_fp_format(exp_bits, man_bits, signed)
        self.signed = bool(signed)
        self.granularity = _check_granularity(granularity, FP_GRANULARITIES)
        self.group_size = _check_group_size(group_size)
        if isinstance(ch_axis, bool) or not isinstance(ch_axis, int):
            raise TypeError(f"ch_axis must be an int, got {ch_axis!r}")
        self.ch_axis = ch_axis
        if init not in ("absmax", "mse"):
            raise ValueError(f"init must be one of ['absmax', 'mse'], got {init!r}")
        self.init = init
        self._init_lazy(learnable, channel_mask)

    @property
    def bits(self) -> int:
        return self.exp_bits + self.man_bits + (1 if self.signed else 0)

    @property
    def initialized(self) -> bool:
        return self.granularity == "token" or self.maxval.numel() > 0

    def set_format(self, exp_bits: int, man_bits: int) -> None:
        """Change the ExMy split (keeps maxval: the clipping value does not depend on the format)."""
        self.exp_bits, self.man_bits = check_fp_format(exp_bits, man_bits, self.signed)

    def extra_repr(self) -> str:
        return (f"E{self.exp_bits}M{self.man_bits}, signed={self.signed}, granularity={self.granularity}, "
                f"group_size={self.group_size}, ch_axis={self.ch_axis}, init={self.init}")

    def layout(self) -> RowLayout:
        """The [C, G, g] row view this quantizer applies to a tensor (see module docstring)."""
        return RowLayout(self.granularity, self.group_size, self.ch_axis, self.channel_mask is not None)

    @staticmethod
    def token_maxval(x: torch.Tensor) -> torch.Tensor:
        """Per-token clipping value: absmax of each row of the last dim (shape [..., 1], detached)."""
        return x.detach().abs().amax(dim=-1, keepdim=True)

    def _quant(self, x, maxval):
        return fp_quantize(x, maxval, self.exp_bits, self.man_bits, self.signed)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        if self.granularity == "token":
            return
        lay = self.layout()
        xv, _ = lay.view(x.detach())
        mask = _mask_view(self.channel_mask, xv)
        if mask is not None:
            xv = torch.where(mask, xv, torch.zeros((), dtype=xv.dtype, device=xv.device))
        dims = lay.reduce_dims()
        src = xv if self.signed else xv.clamp_min(0)
        amax = src.abs().amax(dim=dims, keepdim=True).clamp_min(_MIN_MAXVAL)
        if self.init == "mse":
            best_err = torch.full_like(amax, float("inf"))
            best = amax.clone()
            for i in range(MSE_CANDIDATES):
                cand = amax * (1.0 - MSE_STEP * i)
                err = (self._quant(xv, cand) - xv).abs().pow(LP_NORM).sum(dim=dims, keepdim=True)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better, cand, best)
            amax = best
        self._set_param("maxval", amax.reshape(lay.param_shape(xv)).to(_param_dtype(x)), self.learnable)

    def _maxval_view(self, lay, x):
        if self.granularity == "token":
            raise AssertionError("token granularity has no stored maxval")
        return lay.param_view(self.maxval).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.granularity == "token":  # per-token is for activations: masks do not apply
            if self.signed:
                return fp_quantize_token(x, self.exp_bits, self.man_bits)
            return self._quant(x, self.token_maxval(x))
        if not self.initialized:
            self.calibrate(x)
        lay = self.layout()
        xv, meta = lay.view(x)
        out = self._quant(xv, self._maxval_view(lay, xv))
        mask = _mask_view(self.channel_mask, xv)
        if mask is not None:
            out = torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device))
        return lay.unview(out, meta)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 codes (int32 for formats wider than 8 bits), same shape as x; 0 outside the mask."""
        if self.granularity == "token":
            return fp_encode(x, self.token_maxval(x), self.exp_bits, self.man_bits, self.signed)
        if not self.initialized:
            self.calibrate(x)
        lay = self.layout()
        xv, meta = lay.view(x)
        codes = fp_encode(xv, self._maxval_view(lay, xv), self.exp_bits, self.man_bits, self.signed)
        mask = _mask_view(self.channel_mask, xv)
        if mask is not None:
            codes = torch.where(mask, codes, torch.zeros((), dtype=codes.dtype, device=codes.device))
        return lay.unview(codes, meta)

    def decode(self, codes: torch.Tensor, maxval: Optional[torch.Tensor] = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Values of ``codes``; ``maxval`` is required (per-row, [..., 1]) for "token" granularity."""
        if self.granularity == "token":
            if maxval is None:
                raise ValueError("FPQuantizer.decode: maxval is required for granularity='token' "
                                 "(use FPQuantizer.token_maxval(x))")
            return fp_decode(codes, maxval.to(dtype), self.exp_bits, self.man_bits, self.signed, dtype)
        if not self.initialized:
            raise RuntimeError("FPQuantizer.decode: quantizer is not calibrated (call calibrate(x) first)")
        lay = self.layout()
        cv, meta = lay.view(codes)
        out = fp_decode(cv, lay.param_view(self.maxval).to(dtype), self.exp_bits, self.man_bits,
                        self.signed, dtype)
        mask = _mask_view(self.channel_mask, cv)
        if mask is not None:
            out = torch.where(mask, out, torch.zeros((), dtype=dtype, device=out.device))
        return lay.unview(out, meta)

    def grid_params(self, x: torch.Tensor):
        """(view, meta, maxval, mask) of ``x`` in this quantizer's row layout (helper for AdaRound)."""
        if self.granularity == "token":
            raise ValueError("grid_params: granularity='token' has no stored maxval (weights need "
                             "tensor/channel/group)")
        if not self.initialized:
            self.calibrate(x)
        lay = self.layout()
        xv, meta = lay.view(x)
        return xv, meta, self._maxval_view(lay, xv), _mask_view(self.channel_mask, xv)


# ----------------------------------------------------------------------------------------------
# 1-bit (binary) weight quantizer
# ----------------------------------------------------------------------------------------------
BINARY_BITS = 1  # the only width of BinaryQuantizer; weights only (never an activation or a params setting)


class _BinaryFQ(torch.autograd.Function):
    """Q = μ + α·sign(x − μ) (sign(0) = +1) with straight-through gradients: ∂Q/∂x = 1, ∂Q/∂α = sign(x − μ),
    ∂Q/∂μ = 1 (the move of the sign threshold is ignored, as the rounding is for integer grids)."""

    @staticmethod
    def forward(ctx, x, mu, alpha):
        sign = binary_sign(x, mu)
        ctx.save_for_backward(sign)
        ctx.shapes = (mu.shape, alpha.shape)
        return mu + alpha * sign

    @staticmethod
    def backward(ctx, grad):
        (sign,) = ctx.saved_tensors
        mu_shape, alpha_shape = ctx.shapes
        g_mu = grad.sum_to_size(mu_shape) if ctx.needs_input_grad[1] else None
        g_alpha = (grad * sign).sum_to_size(alpha_shape) if ctx.needs_input_grad[2] else None
        return grad, g_mu, g_alpha


def binary_sign(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """sign(x − μ) as ±1 in x's dtype, with sign(0) = +1 (every weight has one stored bit)."""
    return torch.where((x - mu).detach() >= 0, 1.0, -1.0).to(x.dtype)


def binary_quantize(x: torch.Tensor, mu: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """μ + α·sign(x − μ) (broadcast), straight-through gradients to x, μ and α (see :class:`_BinaryFQ`)."""
    mu = torch.as_tensor(mu, dtype=x.dtype, device=x.device)
    alpha = torch.as_tensor(alpha, dtype=x.dtype, device=x.device)
    return _BinaryFQ.apply(x, mu, alpha)


class BinaryQuantizer(_LazyParamsMixin, nn.Module):
    """1-bit weight quantizer per output channel i: Q(w) = μ_i + α_i·sign(w − μ_i), sign(0) = +1.

    The demoted (b−1-bit) group of MPQ-DM's OMQ at W2, where a 1-bit *uniform affine* grid would be the two
    range ends {min, max} (useless). Calibration (closed form, no range search): μ_i = mean of channel i,
    α_i = mean |w − μ_i| over the channel — for a fixed μ the L2-optimal α of the two-level grid {μ ± α}
    given the sign pattern (XNOR-Net / BinaryDM). Both are ``nn.Parameter`` when ``learnable`` (the two grid
    levels μ ± α are then trained, mirroring the learnable Δ and z of :class:`IntQuantizer`); μ is *not*
    re-estimated during training. Gradients are straight-through: the latent weight gets the identity
    (no clipping window: a two-level grid has no "inside the range"), α gets sign(w − μ), μ gets 1.

    Stored form: one bit per weight (1 = sign +1) + fp32 μ and α per channel. ``quantize`` gives int32 codes
    {0, 1}, ``dequantize`` inverts exactly (``dequantize(quantize(w)) == forward(w)`` bit for bit).
    ``channel_mask`` as for :class:`IntQuantizer` (statistics per channel anyway; output 0 outside the mask).
    Per-channel only (``granularity`` "channel", ``ch_axis`` 0) and weights only: activation quantizers and
    the ``W<b>`` settings keep their 2..8-bit integer range (``INT_BITS``).
    """

    _lazy_names = ("mu", "alpha")
    granularity = "channel"
    ch_axis = 0
    symmetric = False
    group_size = 0
    init = "mean"

    def __init__(self, learnable: bool = False, channel_mask=None):
        super().__init__()
        self._init_lazy(learnable, channel_mask)

    @property
    def bits(self) -> int:
        return BINARY_BITS

    @property
    def initialized(self) -> bool:
        return self.alpha.numel() > 0

    def extra_repr(self) -> str:
        return f"bits=1, learnable={self.learnable}, masked={self.channel_mask is not None}"

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0:
            raise ValueError("BinaryQuantizer: expected a weight with an output-channel dim 0, got a scalar")
        return x.reshape(x.shape[0], -1)

    def _mask(self, xr: torch.Tensor) -> Optional[torch.Tensor]:
        if self.channel_mask is None:
            return None
        if self.channel_mask.numel() != xr.shape[0]:
            raise ValueError(f"channel_mask has {self.channel_mask.numel()} entries but the tensor has "
                             f"{xr.shape[0]} channels along dim 0")
        return self.channel_mask.to(xr.device).reshape(-1, 1)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """μ = per-channel mean, α = per-channel mean |x − μ| (0 outside the mask)."""
        xr = self._rows(x.detach())
        pdtype = _param_dtype(x)
        mu = xr.to(pdtype).mean(dim=1)
        alpha = (xr.to(pdtype) - mu[:, None]).abs().mean(dim=1)
        mask = self._mask(xr)
        if mask is not None:
            m = mask.reshape(-1)
            mu = torch.where(m, mu, torch.zeros_like(mu))
            alpha = torch.where(m, alpha, torch.zeros_like(alpha))
        self._set_param("mu", mu, self.learnable)
        self._set_param("alpha", alpha, self.learnable)

    def _ensure_init(self, x: torch.Tensor) -> None:
        if not self.initialized:
            self.calibrate(x)

    def _params(self, xr: torch.Tensor):
        return self.mu.to(xr.dtype).reshape(-1, 1), self.alpha.to(xr.dtype).reshape(-1, 1)

    def _masked(self, out: torch.Tensor, xr: torch.Tensor) -> torch.Tensor:
        mask = self._mask(xr)
        if mask is None:
            return out
        return torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._ensure_init(x)
        xr = self._rows(x)
        mu, alpha = self._params(xr)
        return self._masked(binary_quantize(xr, mu, alpha), xr).reshape(x.shape)

    @torch.no_grad()
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """int32 codes, same shape as x: 1 where x − μ >= 0 (sign +1), else 0; 0 outside the mask."""
        self._ensure_init(x)
        xr = self._rows(x)
        mu, _ = self._params(xr)
        codes = ((xr - mu) >= 0).to(torch.int32)
        mask = self._mask(xr)
        if mask is not None:
            codes = torch.where(mask, codes, torch.zeros((), dtype=codes.dtype, device=codes.device))
        return codes.reshape(x.shape)

    def dequantize(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """μ + α·(2c − 1), 0 outside the mask; equals ``forward(x)`` for ``codes = quantize(x)``."""
        if not self.initialized:
            raise RuntimeError("BinaryQuantizer.dequantize: quantizer is not calibrated (call calibrate(x) first)")
        cr = self._rows(codes)
        sign = torch.where(cr != 0, 1.0, -1.0).to(dtype)
        mu, alpha = self.mu.to(dtype).reshape(-1, 1), self.alpha.to(dtype).reshape(-1, 1)
        return self._masked(mu + alpha * sign, cr).reshape(codes.shape)


# ----------------------------------------------------------------------------------------------
# binary residual branch
# ----------------------------------------------------------------------------------------------
class BinaryResidual(nn.Module):
    """1-bit residual on salient output channels (MPQ-DMv2 FZ-RMQ, arXiv 2507.04290; inferred design, no public code).

    r = w − Q_b(w) is approximated per output channel i by α_i·sign(r) (XNOR / BinaryDM closed form:
    α_i = mean |r| over the channel, learnable afterwards). sign(0) is taken as +1 so that every
    weight has one stored bit. Channels outside ``channel_mask`` get 0. Channels are dim 0 of w.
    """

    def __init__(self, num_channels: int, channel_mask=None):
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
        mask = _as_mask(channel_mask)
        if mask is not None and mask.numel() != num_channels:
            raise ValueError(f"channel_mask has {mask.numel()} entries, expected num_channels={num_channels}")
        self.num_channels = num_channels
        self.register_buffer("channel_mask", mask)
        self.alpha = nn.Parameter(torch.zeros(num_channels))

    def _check(self, w: torch.Tensor) -> None:
        if w.shape[0] != self.num_channels:
            raise ValueError(f"weight has {w.shape[0]} output channels, expected {self.num_channels}")

    def _bview(self, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return t.reshape((-1,) + (1,) * (w.dim() - 1))

    @torch.no_grad()
    def init_from(self, w: torch.Tensor, w_q: torch.Tensor) -> None:
        """α_i = mean |w − w_q| over output channel i (0 outside the mask)."""
        self._check(w)
        alpha = (w - w_q).abs().reshape(w.shape[0], -1).mean(dim=1)
        if self.channel_mask is not None:
            alpha = torch.where(self.channel_mask.to(alpha.device), alpha, torch.zeros_like(alpha))
        self.alpha.copy_(alpha.to(self.alpha.dtype))

    @staticmethod
    def sign_bits(w: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
        """Stored bit per weight: True where w − w_q >= 0 (sign +1)."""
        return (w - w_q).detach() >= 0

    def forward(self, w: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
        self._check(w)
        sign = torch.where(self.sign_bits(w, w_q), 1.0, -1.0).to(w.dtype)
        out = self._bview(self.alpha.to(w.dtype), w) * sign
        if self.channel_mask is not None:
            out = torch.where(self._bview(self.channel_mask.to(w.device), w), out,
                              torch.zeros((), dtype=out.dtype, device=out.device))
        return out

    def from_bits(self, bits: torch.Tensor) -> torch.Tensor:
        """Residual from stored sign bits (packing reload); equals ``forward(w, w_q)``."""
        sign = torch.where(bits, 1.0, -1.0).to(self.alpha.dtype)
        out = self._bview(self.alpha, sign) * sign
        if self.channel_mask is not None:
            out = torch.where(self._bview(self.channel_mask.to(sign.device), sign), out,
                              torch.zeros((), dtype=out.dtype, device=out.device))
        return out


# ----------------------------------------------------------------------------------------------
# describing weight quantizers (JSON) and rebuilding them (packing, student checkpoints)
# ----------------------------------------------------------------------------------------------
def weight_quantizer_desc(q: nn.Module) -> dict:
    """Constructor arguments of an :class:`IntQuantizer` / :class:`FPQuantizer` / :class:`BinaryQuantizer` as
    JSON-able values (``format`` "int" | "fp" | "binary"; ``masked``: whether it has a channel mask). Its parameters are state."""
    if isinstance(q, IntQuantizer):
        return {"format": "int", "bits": q.bits, "symmetric": q.symmetric, "granularity": q.granularity,
                "group_size": q.group_size, "init": q.init, "learnable": q.learnable,
                "masked": q.channel_mask is not None}
    if isinstance(q, BinaryQuantizer):
        return {"format": "binary", "bits": q.bits, "granularity": q.granularity, "learnable": q.learnable,
                "masked": q.channel_mask is not None}
    if isinstance(q, FPQuantizer):
        return {"format": "fp", "bits": q.bits, "exp_bits": q.exp_bits, "man_bits": q.man_bits, "signed": q.signed,
                "granularity": q.granularity, "group_size": q.group_size, "init": q.init,
                "learnable": q.learnable, "masked": q.channel_mask is not None}
    raise TypeError(f"cannot describe weight quantizer of type {type(q).__name__}; "
                    "expected an IntQuantizer, FPQuantizer or BinaryQuantizer")


def weight_quantizer_from_desc(desc: dict, channel_mask=None) -> nn.Module:
    """An uncalibrated weight quantizer (ch_axis 0) from :func:`weight_quantizer_desc` output (a missing
    ``format`` means "int"); load its parameters with ``load_state_dict``."""
    if desc.get("format", "int") == "int":
        return IntQuantizer(desc["bits"], symmetric=desc["symmetric"], granularity=desc["granularity"],
                            group_size=desc["group_size"], ch_axis=0, init=desc["init"],
                            learnable=desc["learnable"], channel_mask=channel_mask)
    if desc["format"] == "binary":
        return BinaryQuantizer(learnable=desc["learnable"], channel_mask=channel_mask)
    if desc["format"] != "fp":
        raise ValueError(f"unknown weight quantizer format {desc['format']!r}; expected 'int', 'fp' or 'binary'")
    return FPQuantizer(desc["exp_bits"], desc["man_bits"], signed=desc["signed"], granularity=desc["granularity"],
                       group_size=desc["group_size"], ch_axis=0, channel_mask=channel_mask, init=desc["init"],
                       learnable=desc["learnable"])
