"""The float32 fast path of the FP quantizer's exponent read (bit fields instead of torch.frexp) is
bit-identical to frexp on every kind of input: zeros, subnormals, exact powers of two, normal values."""
import pytest
import torch

from pipeline.quant.primitives import _rel_exponent, fp_encode, fp_quantize, fp_step


def _reference_rel(r, e_top):
    _, k = torch.frexp(r)
    return (k - 1).clamp(min=1 - e_top, max=0)


def _reference_encode(x, maxval, e, m, signed):
    """fp_encode's formulation with frexp (exact step at 0), as int64 codes."""
    e_top = 2 ** e - 1
    mv = maxval.clamp_min(1e-20)
    lo = -mv if signed else torch.zeros_like(mv)
    xc = torch.minimum(torch.maximum(x, lo), mv)
    base = mv / (2.0 - 2.0 ** (-m))
    rel = _reference_rel(xc.abs() / base, e_top).to(torch.int64)
    step = (base * torch.exp2((rel - m).to(base.dtype))).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(xc / step)
    neg = torch.signbit(q)
    q = q.abs().to(torch.int64)
    carry = q >= 2 ** (m + 1)
    q = torch.where(carry, q >> 1, q)
    rel = torch.where(carry, rel + 1, rel)
    normal = q >= 2 ** m
    field = torch.where(normal, rel + e_top, torch.zeros_like(rel))
    code = (field << m) | torch.where(normal, q - 2 ** m, q)
    if signed:
        code = code | (neg.to(torch.int64) << (e + m))
    return code


def _awkward_values():
    g = torch.Generator().manual_seed(0)
    tiny = torch.finfo(torch.float32).tiny
    parts = [
        torch.zeros(16),
        torch.rand(200, generator=g) * tiny,  # subnormals
        torch.tensor([tiny, tiny * 2, 2.0 ** -149, 2.0 ** -130]),
        torch.exp2(torch.arange(-126, 2, dtype=torch.float32)),  # exact powers of two
        torch.nextafter(torch.exp2(torch.arange(-120, 2, dtype=torch.float32)), torch.tensor(0.0)),
        torch.rand(5000, generator=g),
        torch.exp(torch.randn(5000, generator=g) * 8),
    ]
    return torch.cat(parts).abs()


@pytest.mark.parametrize("exp_bits", [1, 2, 3, 4, 5, 7, 8, 12, 13])
def test_fast_exponent_equals_frexp(exp_bits):
    r = _awkward_values()
    e_top = 2 ** exp_bits - 1
    got, ref = _rel_exponent(r, e_top), _reference_rel(r, e_top)
    assert got.dtype == ref.dtype
    assert torch.equal(got, ref)


@pytest.mark.parametrize("fmt,signed", [((2, 1), True), ((3, 0), True), ((2, 3), True), ((3, 4), True),
                                        ((4, 3), True), ((2, 4), False), ((13, 3), False), ((12, 4), False)])
def test_fp_quantize_and_encode_unchanged_on_rows(fmt, signed):
    """fp_quantize / fp_encode with the fast path equal the frexp formulation bit for bit (token rows with
    zeros, tiny and huge values)."""
    e, m = fmt
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 128, generator=g) * torch.exp(torch.randn(64, 1, generator=g) * 4)
    x[3] = 0.0
    x[5, :7] = 0.0
    x[7, 0] = 1e-40
    if not signed:
        x = torch.softmax(x, dim=-1)
    maxval = (x.abs() if signed else x.clamp_min(0)).amax(dim=-1, keepdim=True)
    out = fp_quantize(x, maxval, e, m, signed)
    # reference: the frexp formulation
    mv = maxval.clamp_min(1e-20)
    lo = -mv if signed else torch.zeros_like(mv)
    xc = torch.minimum(torch.maximum(x, lo), mv)
    base = mv / (2.0 - 2.0 ** (-m))
    rel = _reference_rel(xc.abs() / base, 2 ** e - 1)
    step = (base * torch.exp2((rel - m).to(base.dtype))).clamp_min(torch.finfo(torch.float32).tiny)
    ref = step * torch.round(xc / step)
    assert torch.equal(out, ref)
    assert torch.equal(torch.signbit(out), torch.signbit(ref))
    s_fast, r_fast = fp_step(xc.abs(), mv, e, m)
    assert torch.equal(s_fast, step) and torch.equal(r_fast, rel)
    ref_codes = _reference_encode(x, maxval, e, m, signed)
    assert torch.equal(fp_encode(x, maxval, e, m, signed).to(torch.int64), ref_codes)
    if e + m + (1 if signed else 0) <= 8:
        assert fp_encode(x, maxval, e, m, signed).dtype == torch.uint8


def test_float64_uses_frexp():
    r = _awkward_values().double()
    assert torch.equal(_rel_exponent(r, 3), _reference_rel(r, 3))


def test_gradients_unchanged():
    """Gradients to x and maxval through fp_quantize equal the frexp formulation's (zeros included)."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(8, 128, generator=g)
    x0[0, :5] = 0.0
    outs = []
    for fast in (True, False):
        x = x0.clone().requires_grad_(True)
        mv = x0.abs().amax(dim=-1, keepdim=True).mul(0.9).requires_grad_(True)
        if fast:
            y = fp_quantize(x, mv, 2, 1)
        else:
            xc = torch.minimum(torch.maximum(x, -mv), mv)
            base = mv / (2.0 - 2.0 ** -1)
            with torch.no_grad():
                rel = _reference_rel((xc.abs() / base).detach(), 3)
            step = (base * torch.exp2((rel - 1).to(base.dtype))).clamp_min(torch.finfo(torch.float32).tiny)
            from pipeline.quant.primitives import round_ste
            y = step * round_ste(xc / step)
        (y * torch.arange(128.0)).sum().backward()
        outs.append((y.detach(), x.grad, mv.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
