"""The no-autograd inference path of ``fp_quantize`` (two in-place buffers, step from the exponent bits) is
bit-identical to the straight-through reference path: values and signs of zero, for every ExMy format the
pipeline uses (weights E2M1/E1M2/E3M0/E2M3/E4M3, activations E2M3/E3M2/E3M4, unsigned P incl. the 16-bit
E13M3/E12M4/E15M1), per-tensor / per-token / per-channel / per-group clipping values, zeros, subnormals,
values at and beyond the clip, and non-contiguous inputs."""
import pytest
import torch

from pipeline.quant.primitives import (FPQuantizer, _fp_quantize_inference, _fp_quantize_reference,
                                       fp_quantize)

SIGNED = [(2, 1), (1, 2), (3, 0), (2, 3), (3, 2), (3, 4), (4, 3), (1, 1), (2, 2), (3, 3), (5, 2), (7, 3)]
UNSIGNED = [(2, 2), (2, 4), (3, 4), (3, 5), (13, 3), (12, 4), (15, 1), (8, 8)]
TINY = torch.finfo(torch.float32).tiny


def _inputs(seed: int, signed: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 3, 130, generator=g) * torch.exp(torch.randn(48, 1, 1, generator=g) * 3)
    x[0] = 0.0
    x[1, 0, :20] = -0.0
    x[2, 1, :40] = torch.rand(40, generator=g) * TINY  # subnormals
    x[2, 2, :10] = -torch.rand(10, generator=g) * TINY
    x[3, 0, :30] = torch.exp2(torch.arange(-140, -110, dtype=torch.float32))
    x[4] *= 1e-30
    x[5] *= 1e25
    x[6, 0, :5] = torch.tensor([float("inf"), -float("inf"), 1e38, -1e38, 3e-39])
    if not signed:
        x[7:24] = torch.softmax(x[7:24], dim=-1)
        x[24:30] = x[24:30].abs()
    return x


def _maxvals(x: torch.Tensor, signed: bool, g: torch.Generator):
    src = x if signed else x.clamp_min(0)
    a = src.abs().nan_to_num(0.0, posinf=0.0, neginf=0.0)
    tok = a.amax(dim=-1, keepdim=True)
    yield tok  # per token (online activations)
    yield tok * 0.7  # values over the clip
    yield tok * (torch.rand(tok.shape, generator=g) + 0.5)
    yield torch.exp2(torch.randint(-8, 8, tok.shape, generator=g).float())  # format maxima: powers of two
    yield a.amax(dim=(1, 2), keepdim=True)  # per channel
    yield a.amax()  # per tensor (0-dim)
    yield torch.tensor(1.0)
    yield torch.tensor(0.0)  # clamped to 1e-20
    yield torch.tensor(3e4)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, signs of zero, NaN positions and memory layout (matmuls downstream round by layout)."""
    return (a.shape == b.shape and a.stride() == b.stride() and torch.equal(a.nan_to_num(), b.nan_to_num())
            and torch.equal(torch.signbit(a), torch.signbit(b)) and torch.equal(a.isnan(), b.isnan()))


def _check(x, maxval, e, m, signed):
    mv = torch.as_tensor(maxval, dtype=torch.float32).clamp_min(1e-20)
    ref = _fp_quantize_reference(x, mv, e, m, signed)
    if 2 ** e - 1 <= 127:
        assert _fp_quantize_inference(x, mv, e, m, signed) is not None
    with torch.no_grad():
        fast = fp_quantize(x, maxval, e, m, signed)
    assert _same(fast, ref), (e, m, signed, tuple(mv.shape))
    # the autograd path (x requires grad) is the reference path
    slow = fp_quantize(x.clone().requires_grad_(True), maxval, e, m, signed).detach()
    assert _same(slow, ref)


@pytest.mark.parametrize("fmt, signed", [(f, True) for f in SIGNED] + [(f, False) for f in UNSIGNED])
def test_fast_path_equals_reference(fmt, signed):
    g = torch.Generator().manual_seed(10 if signed else 11)
    for seed in range(3):
        x = _inputs(seed, signed)
        for mv in _maxvals(x, signed, g):
            _check(x, mv, *fmt, signed)


@pytest.mark.parametrize("fmt", [(13, 3), (12, 4), (15, 1)])
def test_wide_p_formats_fall_back_when_maxval_is_large(fmt):
    """e_top > 127 is taken only when base·2^−M <= 1 (P on [0, 1]); beyond that the reference runs."""
    x = _inputs(0, False)
    mv = torch.full((48, 3, 1), 2.0 ** 20)
    assert _fp_quantize_inference(x, mv, *fmt, False) is None
    assert _fp_quantize_inference(x, torch.ones(48, 3, 1), *fmt, False) is not None
    _check(x, mv, *fmt, False)


def test_group_maxval_and_non_contiguous_inputs():
    g = torch.Generator().manual_seed(12)
    w = torch.randn(64, 256, generator=g) * 0.05
    w[0, :128] = 0.0
    for fmt in [(2, 1), (1, 2), (3, 0), (4, 3)]:
        q = FPQuantizer(*fmt, granularity="group", group_size=128)
        q.calibrate(w)
        ref = _fp_quantize_reference(w.reshape(64, 2, 128), q.maxval.reshape(64, 2, 1).clamp_min(1e-20), *fmt, True)
        with torch.no_grad():
            assert _same(q(w), ref.reshape(64, 256))
        assert _same(q(w.clone().requires_grad_(True)).detach(), ref.reshape(64, 256))
    x = (torch.randn(8, 16, 4, 32, generator=g) * 2).transpose(1, 2)  # [B, heads, N, d] view
    assert not x.is_contiguous()
    tok = FPQuantizer(2, 3, granularity="token")
    with torch.no_grad():
        fast = tok(x)
    ref = _fp_quantize_reference(x, FPQuantizer.token_maxval(x).clamp_min(1e-20), 2, 3, True)
    assert _same(fast, ref)


def test_other_dtypes_use_the_reference_path():
    x = _inputs(1, True).double()
    assert _fp_quantize_inference(x, x.abs().amax(dim=-1, keepdim=True), 2, 1, True) is None
    with torch.no_grad():
        out = fp_quantize(x, x.abs().amax(dim=-1, keepdim=True).nan_to_num(0.0, 0.0, 0.0), 2, 1)
    assert out.dtype == torch.float64


def test_fast_path_does_not_modify_its_input():
    x = _inputs(2, True)
    x0 = x.clone()
    with torch.no_grad():
        fp_quantize(x, x.abs().amax(dim=-1, keepdim=True), 2, 3)
    assert _same(x, x0)


def _token_reference(x, e, m, signed=True):
    return _fp_quantize_reference(x, x.detach().abs().amax(dim=-1, keepdim=True).clamp_min(1e-20), e, m, signed)


@pytest.mark.parametrize("fmt", SIGNED)
def test_token_quantizer_fast_path_equals_reference(fmt):
    """fp_quantize_token (FPQuantizer 'token', OnlineTokenActQuantizer fp) skips the clip, an identity at the
    row's own absmax; rows with inf / NaN take the general path."""
    from pipeline.quant.act import OnlineTokenActQuantizer
    from pipeline.quant.primitives import fp_quantize_token

    for seed in range(3):
        x = _inputs(seed, True)
        ref = _token_reference(x, *fmt)
        with torch.no_grad():
            assert _same(fp_quantize_token(x, *fmt), ref)
            assert _same(FPQuantizer(*fmt, granularity="token")(x), ref)
        assert _same(fp_quantize_token(x.clone().requires_grad_(True), *fmt).detach(), ref)
        finite = x[7:].clone()
        with torch.no_grad():
            assert _same(fp_quantize_token(finite, *fmt), _token_reference(finite, *fmt))
    g = torch.Generator().manual_seed(13)
    auto, last = (OnlineTokenActQuantizer(1 + sum(fmt), fmt="fp", exp_bits=fmt[0], man_bits=fmt[1], rows=r)
                  for r in ("auto", "last_dim"))
    conv_in = torch.randn(6, 8, 5, 5, generator=g)
    conv_in[0, 0] = 0.0
    attn = torch.randn(6, 16, 4, 8, generator=g).transpose(1, 2)  # [B, heads, N, d] view
    tokens = torch.randn(3, 7, 40, generator=g)
    for q, x, rows in ((auto, conv_in, conv_in.reshape(6, 8, 25)), (last, attn, attn), (auto, tokens, tokens)):
        with torch.no_grad():
            assert _same(q(x), _token_reference(rows, *fmt).reshape(x.shape))
        assert _same(q(x.clone().requires_grad_(True)).detach(), _token_reference(rows, *fmt).reshape(x.shape))


def test_token_quantizer_gradients_unchanged():
    from pipeline.quant.primitives import fp_quantize_token

    g = torch.Generator().manual_seed(14)
    x0 = torch.randn(4, 64, generator=g)
    grads = []
    for f in (lambda x: fp_quantize_token(x, 2, 3), lambda x: _token_reference(x, 2, 3)):
        x = x0.clone().requires_grad_(True)
        (f(x) * torch.arange(64.0)).sum().backward()
        grads.append(x.grad)
    assert torch.equal(*grads)


def test_layout_follows_the_reference():
    """Non-contiguous inputs give the reference's (contiguous) layout; a non-contiguous maxval takes the
    reference path."""
    g = torch.Generator().manual_seed(15)
    x = torch.randn(3, 9, 2, 8, generator=g).transpose(1, 2)
    mv = x.abs().amax(dim=-1, keepdim=True)
    with torch.no_grad():
        assert _same(fp_quantize(x, mv, 2, 3), _fp_quantize_reference(x, mv, 2, 3, True))
    mv_t = torch.rand(3, 2, generator=g).t().unsqueeze(-1) + 0.5  # [2, 3, 1], non-contiguous
    y = torch.randn(2, 3, 8, generator=g)
    assert _fp_quantize_inference(y, mv_t, 2, 3, True) is None
    with torch.no_grad():
        assert _same(fp_quantize(y, mv_t, 2, 3), _fp_quantize_reference(y, mv_t, 2, 3, True))
