"""Quantization primitives and AdaRound, checked against independent references:
torch's fake_quantize ops (integer grids) and ml_dtypes casts (FP4/FP6/FP8 grids)."""
import ml_dtypes
import numpy as np
import pytest
import torch

from pipeline.quant.adaround import REG_WEIGHT, AdaRoundWeight, BetaSchedule
from pipeline.quant.primitives import (BinaryResidual, FPQuantizer, IntQuantizer, fake_quant_int, fp_decode,
                                       fp_encode, fp_quantize, int_range, round_ste)

ML_FORMATS = [  # name, E, M, maxval passed to the quantizer, largest |x| the format represents
    ("float4_e2m1fn", 2, 1, 6.0, 6.0),
    ("float6_e2m3fn", 2, 3, 7.5, 7.5),
    ("float6_e3m2fn", 3, 2, 28.0, 28.0),
    ("float8_e4m3fn", 4, 3, 480.0, 448.0),
]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _student_t(shape, df=3, seed=0):
    """Student-t samples (df an integer) from a seeded generator: z / sqrt(chi2_df / df)."""
    g = _gen(seed)
    z = torch.randn(shape, generator=g)
    chi2 = (torch.randn((int(df),) + tuple(shape), generator=g) ** 2).sum(0)
    return z / torch.sqrt(chi2 / df)


# ------------------------------------------------------------------------------------------------
# integer grid vs torch.fake_quantize_*
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_quant_int_matches_torch(bits, symmetric):
    g = _gen(bits)
    qmin, qmax = int_range(bits, symmetric)
    x = torch.randn(6, 50, generator=g) * 3
    # random per-channel parameters, independent of any calibration code
    scale = torch.rand(6, generator=g) * 0.5 + 0.01
    zp = torch.zeros(6, dtype=torch.int32) if symmetric else torch.randint(qmin, qmax + 1, (6,), generator=g,
                                                                             dtype=torch.int32)
    ours = fake_quant_int(x, scale.reshape(-1, 1), zp.float().reshape(-1, 1), qmin, qmax)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, 0, qmin, qmax)
    assert torch.equal(ours, ref)
    ours_t = fake_quant_int(x, scale[0], zp[0].float(), qmin, qmax)
    ref_t = torch.fake_quantize_per_tensor_affine(x, float(scale[0]), int(zp[0]), qmin, qmax)
    assert torch.equal(ours_t, ref_t)

    # the module, calibrated by min-max, is torch's op with the module's own parameters
    qc = IntQuantizer(bits, symmetric=symmetric, granularity="channel")
    y = qc(x)
    assert torch.equal(y, torch.fake_quantize_per_channel_affine(
        x, qc.scale, qc.zero_point.round().to(torch.int32), 0, qc.qmin, qc.qmax))
    qt = IntQuantizer(bits, symmetric=symmetric, granularity="tensor", init="mse")
    yt = qt(x)
    assert torch.equal(yt, torch.fake_quantize_per_tensor_affine(
        x, qt.scale, qt.zero_point.round().to(torch.int32), qt.qmin, qt.qmax))
    # codes round trip, codes inside the range
    for q, out in ((qc, y), (qt, yt)):
        codes = q.quantize(x)
        assert codes.dtype == torch.int32 and int(codes.min()) >= qmin and int(codes.max()) <= qmax
        assert torch.equal(q.dequantize(codes), out)


def test_fake_quant_int_gradient_matches_torch_inside_range():
    g = _gen(1)
    x = (torch.randn(4, 30, generator=g) * 2).requires_grad_(True)
    scale = torch.tensor([0.05, 0.1, 0.2, 0.3])
    zp = torch.tensor([0, 3, 7, 10], dtype=torch.int32)
    fake_quant_int(x, scale.reshape(-1, 1), zp.float().reshape(-1, 1), 0, 15).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    torch.fake_quantize_per_channel_affine(x2, scale, zp, 0, 0, 15).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
    assert (x2.grad == 0).any() and (x2.grad == 1).any()  # both clipped and unclipped elements exist


def test_fake_quant_int_inference_path_is_bit_identical_to_the_autograd_path():
    """Without autograd, fake_quant_int runs in place on one buffer; values (signed zeros included) must
    equal the straight-through path's, for per-sample (timestep-gathered) and per-tensor parameters, and a
    zero point that broadcasts wider than x still gives the broadcast result."""
    g = _gen(3)
    x = torch.randn(8, 5, 7, generator=g) * 2
    x[0, 0, :3] = torch.tensor([0.0, -0.0, -1e-9])
    cases = [(torch.rand(8, 1, 1, generator=g) * 0.3 + 0.01, torch.randint(0, 16, (8, 1, 1), generator=g).float()),
             (torch.tensor(0.07), torch.tensor(7.0)),
             (torch.tensor(0.1), torch.randint(0, 16, (3, 8, 5, 7), generator=g).float())]
    for scale, zp in cases:
        with torch.no_grad():
            fast = fake_quant_int(x, scale, zp, 0, 15)
        slow = fake_quant_int(x.clone().requires_grad_(True), scale, zp, 0, 15).detach()
        assert fast.shape == slow.shape
        assert torch.equal(fast, slow) and torch.equal(torch.signbit(fast), torch.signbit(slow))


def test_round_ste_is_half_even_with_identity_gradient():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0.49], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 0.0]
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(6))


# ------------------------------------------------------------------------------------------------
# FP grid vs ml_dtypes
# ------------------------------------------------------------------------------------------------
def _ml_grid(name):
    dt = getattr(ml_dtypes, name)
    nbits = {"float4": 4, "float6": 6, "float8": 8}[name[:6]]
    codes = np.arange(2 ** nbits, dtype=np.uint8)
    vals = codes.view(dt).astype(np.float32)
    finite = np.isfinite(vals)
    return dt, codes[finite], vals[finite]


@pytest.mark.parametrize("name,E,M,maxval,limit", ML_FORMATS)
def test_fp_quantize_matches_ml_dtypes(name, E, M, maxval, limit):
    """float8_e4m3fn spends its top mantissa code on NaN, so its largest finite value 448 is not the
    full-mantissa maximum 480 of our all-finite grid: we quantize with maxval=480 and only compare on
    |x| <= 448, where both grids coincide. The other three formats are all-finite: maxval = format max."""
    dt, codes, grid = _ml_grid(name)
    pos = np.unique(grid[grid >= 0])
    mids = (pos[1:] + pos[:-1]) / 2  # exact ties, resolved to the even mantissa by ml_dtypes
    g = _gen(E * 10 + M)
    rand = ((torch.rand(4000, generator=g) * 2 - 1) * limit).numpy()
    small = ((torch.rand(1000, generator=g) * 2 - 1) * pos[1] * 4).numpy()  # subnormal region
    vals = np.concatenate([rand, small, mids, -mids, pos, -pos, [limit, -limit]]).astype(np.float32)
    x = torch.from_numpy(vals)
    ref = torch.from_numpy(vals.astype(dt).astype(np.float32))
    mv = torch.tensor(maxval)
    out = fp_quantize(x, mv, E, M)
    assert torch.equal(out, ref)
    assert torch.equal(torch.signbit(out), torch.signbit(ref))
    # every representable value maps to itself
    gt = torch.from_numpy(grid)
    assert torch.equal(fp_quantize(gt, mv, E, M), gt)
    # codes are ml_dtypes' bit patterns; decode inverts them exactly
    enc = fp_encode(x, mv, E, M)
    assert enc.dtype == torch.uint8
    assert torch.equal(enc, torch.from_numpy(vals.astype(dt).view(np.uint8).copy()))
    dec = fp_decode(enc, mv, E, M)
    assert torch.equal(dec, out) and torch.equal(torch.signbit(dec), torch.signbit(out))
    assert torch.equal(fp_decode(torch.from_numpy(codes), mv, E, M), gt)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group", "token"])
@pytest.mark.parametrize("E,M,signed", [(2, 1, True), (3, 0, True), (1, 2, True), (4, 3, False), (5, 2, True)])
def test_fp_quantizer_encode_decode_round_trip(granularity, E, M, signed):
    x = torch.randn(8, 40, generator=_gen(3)) * torch.logspace(-2, 1, 8).reshape(-1, 1)
    q = FPQuantizer(E, M, signed=signed, granularity=granularity, group_size=16)
    out = q(x)
    codes = q.encode(x)
    maxval = FPQuantizer.token_maxval(x) if granularity == "token" else None
    assert torch.equal(q.decode(codes, maxval=maxval), out)
    assert q.bits == E + M + (1 if signed else 0)
    assert int(codes.max()) < 2 ** q.bits
    # idempotent: the output is on the grid (token: on the grid of the original rows' maxval)
    if granularity == "token":
        assert torch.equal(fp_quantize(out, maxval, E, M, signed), out)
    else:
        assert torch.equal(q(out), out)
    if not signed:
        assert (out >= 0).all()
    # the largest value of each channel's grid is its maxval (up to float rounding of maxval/(2-2^-M))
    if granularity == "channel":
        ref = x.abs().amax(dim=1) if signed else x.clamp_min(0).amax(dim=1)
        assert torch.allclose(out.abs().amax(dim=1), ref, rtol=1e-6, atol=0)


def test_fp_exponent_is_exact_at_powers_of_two_for_arbitrary_maxval():
    # maxval not a power of two: the grid of E2M1 with maxval m is m/6 * {0, .5, 1, 1.5, 2, 3, 4, 6}
    for m in (0.37, 1.0, 5.5, 123.4):
        mv = torch.tensor(m)
        grid = (mv / 1.5) * torch.tensor([0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0, 1.5])
        assert torch.equal(fp_quantize(grid, mv, 2, 1), grid)
        assert torch.equal(fp_quantize(-grid, mv, 2, 1), -grid)


# ------------------------------------------------------------------------------------------------
# error behaviour
# ------------------------------------------------------------------------------------------------
def _mse(a, b):
    return float(((a - b) ** 2).mean())


@pytest.mark.parametrize("dist", ["gauss", "student_t"])
def test_error_decreases_with_bits(dist):
    x = torch.randn(16, 128, generator=_gen(5)) if dist == "gauss" else _student_t((16, 128), seed=5)
    for init in ("minmax", "mse"):
        errs = [_mse(IntQuantizer(b, granularity="channel", init=init)(x), x) for b in range(2, 9)]
        assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:])), (init, errs)
    fp_seq = [(2, 1), (2, 2), (2, 3), (3, 4), (4, 7)]  # 4, 5, 6, 8, 12 bits (FP4DiT: W E2M1, A6 E2M3, A8 E3M4)
    errs = [_mse(FPQuantizer(e, m, granularity="channel")(x), x) for e, m in fp_seq]
    assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:])), errs
    # and 4-bit FP beats 4-bit int on heavy tails (more levels near 0), sanity of the FP grid
    if dist == "student_t":
        assert errs[0] < _mse(IntQuantizer(4, symmetric=True, granularity="channel")(x), x)


def test_mse_init_beats_minmax_on_heavy_tails():
    x = _student_t((32, 256), seed=7)
    for gran in ("channel", "tensor"):
        e_mm = _mse(IntQuantizer(4, granularity=gran, init="minmax")(x), x)
        e_mse = _mse(IntQuantizer(4, granularity=gran, init="mse")(x), x)
        assert e_mse < 0.95 * e_mm, (gran, e_mse, e_mm)
    e_abs = _mse(FPQuantizer(2, 1, granularity="channel")(x), x)
    e_fmse = _mse(FPQuantizer(2, 1, granularity="channel", init="mse")(x), x)
    assert e_fmse < e_abs


# ------------------------------------------------------------------------------------------------
# granularity and masks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K", [96, 100])  # 100: last group of each channel has 4 elements
@pytest.mark.parametrize("init", ["minmax", "mse"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_group_equals_per_tensor_per_group(K, init, symmetric):
    gs = 32
    x = _student_t((5, K), seed=K)
    q = IntQuantizer(3, symmetric=symmetric, granularity="group", group_size=gs, init=init)
    out = q(x)
    assert q.scale.shape == (5, -(-K // gs))
    for c in range(5):
        for start in range(0, K, gs):
            chunk = x[c, start:start + gs]
            ref = IntQuantizer(3, symmetric=symmetric, granularity="tensor", init=init)(chunk)
            assert torch.equal(out[c, start:start + gs], ref), (c, start)
    assert torch.equal(q.dequantize(q.quantize(x)), out)
    fq = FPQuantizer(2, 1, granularity="group", group_size=gs)
    fout = fq(x)
    for c in range(5):
        for start in range(0, K, gs):
            chunk = x[c, start:start + gs]
            assert torch.equal(fout[c, start:start + gs], FPQuantizer(2, 1, granularity="tensor")(chunk))


def test_group_runs_along_flattened_input_of_conv_weight():
    w = torch.randn(4, 3, 3, 3, generator=_gen(2))  # 27 inputs per output channel
    q = IntQuantizer(4, granularity="group", group_size=9)
    out = q(w)
    ref = IntQuantizer(4, granularity="group", group_size=9)(w.reshape(4, 27)).reshape(w.shape)
    assert torch.equal(out, ref)
    ref2 = torch.stack([IntQuantizer(4, granularity="channel")(w.reshape(4, 27)[:, i * 9:(i + 1) * 9])
                        for i in range(3)], dim=1).reshape(w.shape)
    assert torch.equal(out, ref2)


def test_ch_axis_other_than_zero():
    x = torch.randn(7, 5, generator=_gen(4))
    q = IntQuantizer(4, granularity="channel", ch_axis=1)
    out = q(x)
    ref = torch.fake_quantize_per_channel_affine(x, q.scale, q.zero_point.round().int(), 1, q.qmin, q.qmax)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("granularity", ["channel", "group", "tensor"])
def test_channel_masks_partition_the_tensor(granularity):
    x = _student_t((10, 24), seed=11)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[1, 4, 7]] = True
    q_in = IntQuantizer(4, granularity=granularity, group_size=8, channel_mask=mask)
    q_out = IntQuantizer(3, granularity=granularity, group_size=8, channel_mask=~mask)
    y_in, y_out = q_in(x), q_out(x)
    assert (y_in[~mask] == 0).all() and (y_out[mask] == 0).all()
    # on its channels a masked quantizer equals an unmasked one run on those channels only
    assert torch.equal(y_in[mask], IntQuantizer(4, granularity=granularity, group_size=8)(x[mask]))
    assert torch.equal(y_out[~mask], IntQuantizer(3, granularity=granularity, group_size=8)(x[~mask]))
    assert torch.equal(q_in.dequantize(q_in.quantize(x)), y_in)
    fq = FPQuantizer(2, 1, granularity=granularity, group_size=8, channel_mask=mask)
    fy = fq(x)
    assert (fy[~mask] == 0).all()
    assert torch.equal(fy[mask], FPQuantizer(2, 1, granularity=granularity, group_size=8)(x[mask]))
    assert torch.equal(fq.decode(fq.encode(x)), fy)


def test_bits_change_and_state_dict_reload():
    x = torch.randn(6, 20, generator=_gen(8))
    q = IntQuantizer(4, granularity="group", group_size=8, init="mse")
    q(x)
    q.bits = 6
    assert torch.equal(q(x), IntQuantizer(6, granularity="group", group_size=8, init="mse")(x))
    fresh = IntQuantizer(6, granularity="group", group_size=8, init="mse")
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x * 1.5), q(x * 1.5))  # uses loaded parameters, not a new calibration
    fq = FPQuantizer(2, 1, granularity="channel")
    fq(x)
    f2 = FPQuantizer(2, 1, granularity="channel")
    f2.load_state_dict(fq.state_dict())
    assert torch.equal(f2(x * 2), fq(x * 2))


# ------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------
def test_learnable_scale_and_zero_point_receive_gradients():
    x = torch.randn(4, 64, generator=_gen(9))
    q = IntQuantizer(3, granularity="channel", learnable=True)
    q.calibrate(x)
    assert isinstance(q.scale, torch.nn.Parameter) and isinstance(q.zero_point, torch.nn.Parameter)
    xin = (x * 2).requires_grad_(True)  # doubled: many values are clipped
    out = q(xin)
    ((out - xin) ** 2).sum().backward()
    assert q.scale.grad is not None and (q.scale.grad.abs() > 0).all()
    assert q.zero_point.grad is not None and (q.zero_point.grad.abs() > 0).all()
    assert xin.grad is not None and (xin.grad != 0).any()
    # a step along -grad of the scale lowers the clipping error
    with torch.no_grad():
        before = float(((q(x * 2) - x * 2) ** 2).sum())
        q.scale -= 1e-3 * q.scale.grad.sign()
        after = float(((q(x * 2) - x * 2) ** 2).sum())
    assert after < before


def test_binary_residual():
    w = _student_t((8, 32), seed=12)
    mask = torch.tensor([True, False] * 4)
    base = IntQuantizer(2, granularity="channel")
    w_q = base(w)
    res = BinaryResidual(8, mask)
    res.init_from(w, w_q)
    r = w - w_q
    assert torch.allclose(res.alpha[mask], r[mask].abs().mean(dim=1))
    out = res(w, w_q)
    assert (out[~mask] == 0).all()
    assert torch.equal(out[mask].abs(), res.alpha[mask].reshape(-1, 1).expand(-1, 32).detach())
    # closed-form alpha strictly lowers the error on the salient channels
    assert ((w - w_q - out) ** 2)[mask].sum() < (r ** 2)[mask].sum()
    assert torch.equal(res.from_bits(BinaryResidual.sign_bits(w, w_q)), out)
    out.pow(2).sum().backward()
    assert res.alpha.grad is not None and (res.alpha.grad[mask] != 0).all()


# ------------------------------------------------------------------------------------------------
# AdaRound
# ------------------------------------------------------------------------------------------------
def test_adaround_int_init_hard_and_grid():
    w = torch.randn(6, 40, generator=_gen(13))
    q = IntQuantizer(3, granularity="channel")
    ada = AdaRoundWeight(q, w)
    soft = ada()
    # h = frac(w/Δ) at init: the soft weight is the weight itself, clipped to the grid's range
    # (the rounded zero point shifts the range by up to Δ/2, so min-max extremes can be clipped)
    step = q.scale.reshape(-1, 1)
    z = q.zero_point.reshape(-1, 1)
    w_clip = torch.minimum(torch.maximum(w, step * (q.qmin - z)), step * (q.qmax - z))
    assert torch.allclose(soft, w_clip, atol=1e-5)
    ws = w / q.scale.reshape(-1, 1)
    assert torch.allclose(ada.soft_rounding().reshape(6, 40), ws - ws.floor(), atol=1e-5)
    soft.sum().backward()
    assert ada.V.grad is not None and (ada.V.grad != 0).any()
    ada.harden()
    hard = ada()
    assert torch.equal(hard, ada.quantized_weight())
    codes = ada.codes()
    assert torch.equal(q.dequantize(codes), hard)  # exactly Δ·(k − z)
    assert torch.equal(q(hard), hard)  # on the grid: quantizing again changes nothing
    assert ((hard - w_clip).abs() <= step * (1 + 1e-5)).all()  # rounded up or down, never further


@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_adaround_fp_init_hard_and_grid(granularity):
    w = _student_t((6, 40), seed=14) * 0.1
    q = FPQuantizer(2, 1, granularity=granularity, group_size=16)
    ada = AdaRoundWeight(q, w)
    soft = ada()
    # soft = s(w)·(⌊w/s⌋ + frac) = w at init (maxval = absmax: nothing is clipped)
    assert torch.allclose(soft, w, atol=1e-6, rtol=1e-5)
    soft.sum().backward()
    assert ada.V.grad is not None and (ada.V.grad != 0).any()
    ada.harden()
    hard = ada()
    assert torch.equal(hard, ada.quantized_weight())
    assert torch.equal(q(hard), hard)  # on the FP grid of each group's maxval
    assert torch.equal(q.decode(ada.codes()), hard)


def test_adaround_respects_mask():
    w = torch.randn(6, 16, generator=_gen(15))
    mask = torch.tensor([True, True, False, False, True, False])
    q = IntQuantizer(4, granularity="channel", channel_mask=mask)
    ada = AdaRoundWeight(q, w)
    assert (ada()[~mask] == 0).all()
    assert torch.equal(q.dequantize(ada.codes()), ada.quantized_weight())
    # the regulariser counts only covered weights: at β→∞ limit each covered weight contributes ≈ 1
    assert float(ada.regularizer(1e6).detach()) <= int(mask.sum()) * 16 + 1e-3


def test_beta_schedule():
    sched = BetaSchedule()
    assert sched(0, 100) is None and sched(19, 100) is None
    assert sched(20, 100) == pytest.approx(20.0)
    assert sched(60, 100) == pytest.approx(11.0)
    assert sched(100, 100) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="warmup"):
        BetaSchedule(warmup=1.5)


def _layer_recon(fmt, steps=300, seed=16):
    """BRECQ-style layer reconstruction of a random linear layer. λ is raised from BRECQ's 0.01 to 0.1
    because a few hundred steps (instead of 20k) must also finish pushing h to 0/1."""
    g = _gen(seed)
    w = torch.randn(16, 32, generator=g) / 32 ** 0.5
    x = torch.randn(256, 32, generator=g)
    y = x @ w.t()
    q = IntQuantizer(3, symmetric=True, granularity="channel") if fmt == "int" else \
        FPQuantizer(2, 1, granularity="channel")
    rtn_err = float(((x @ q(w).t() - y) ** 2).sum(1).mean())
    ada = AdaRoundWeight(q, w)
    lr = 3e-2 if fmt == "int" else 3e-3  # FP logits live on the scale of the local step s(w)
    opt = torch.optim.Adam([ada.V], lr=lr)
    sched = BetaSchedule()
    for step in range(steps):
        rec = ((x @ ada().t() - y) ** 2).sum(1).mean()
        beta = sched(step, steps)
        loss = rec if beta is None else rec + 10 * REG_WEIGHT * ada.regularizer(beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ada.harden()
    h = ada.soft_rounding()
    undecided = float(((h > 0.01) & (h < 0.99)).float().mean())
    with torch.no_grad():
        ada_err = float(((x @ ada().t() - y) ** 2).sum(1).mean())
    return rtn_err, ada_err, undecided


@pytest.mark.parametrize("fmt", ["int", "fp"])
def test_adaround_lowers_output_error_vs_round_to_nearest(fmt):
    rtn_err, ada_err, undecided = _layer_recon(fmt)
    assert ada_err < 0.95 * rtn_err, (rtn_err, ada_err)
    assert undecided < 0.1  # the annealed regulariser has driven h to 0 or 1


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_bad_input_errors():
    for b in (1, 9, 0, 16):
        with pytest.raises(ValueError, match=r"bits must be one of \[2, 3, 4, 5, 6, 7, 8\]"):
            IntQuantizer(b)
    with pytest.raises(ValueError, match="bits"):
        int_range(9, True)
    with pytest.raises(TypeError, match="bits"):
        IntQuantizer(4.0)
    with pytest.raises(ValueError, match=r"granularity must be one of \['tensor', 'channel', 'group'\]"):
        IntQuantizer(4, granularity="row")
    with pytest.raises(ValueError, match="granularity must be one of"):
        IntQuantizer(4, granularity="token")  # token is FP/activation-only
    with pytest.raises(ValueError, match="granularity must be one of"):
        FPQuantizer(2, 1, granularity="block")
    with pytest.raises(ValueError, match="exp_bits must be >= 1.*IntQuantizer"):
        FPQuantizer(0, 3)
    with pytest.raises(ValueError, match="exp_bits must be >= 1"):
        fp_quantize(torch.ones(3), 1.0, 0, 3)
    with pytest.raises(ValueError, match="man_bits must be >= 0"):
        FPQuantizer(2, -1)
    with pytest.raises(ValueError, match="init must be one of"):
        IntQuantizer(4, init="percentile")
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        IntQuantizer(4, granularity="group", group_size=0)
    with pytest.raises(ValueError, match="channel_mask has 3 entries"):
        IntQuantizer(4, channel_mask=torch.ones(3, dtype=torch.bool))(torch.randn(4, 5))
    q = IntQuantizer(4)
    with pytest.raises(ValueError, match="bits must be one of"):
        q.bits = 1
    with pytest.raises(RuntimeError, match="not calibrated"):
        IntQuantizer(4).dequantize(torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="IntQuantizer or FPQuantizer"):
        AdaRoundWeight(torch.nn.Identity(), torch.randn(2, 2))
