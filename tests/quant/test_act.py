"""Activation quantizers: timestep-indexed (per-sample gather), online per-token, static per-tensor."""
import copy

import pytest
import torch
import torch.nn as nn

from pipeline.quant.act import (OnlineTokenActQuantizer, StaticActQuantizer, TimestepActQuantizer,
                                TimestepContext, find_timestep_context, install_timestep_context,
                                remove_timestep_context)
from pipeline.quant.primitives import FPQuantizer, IntQuantizer, fp_quantize

TIMESTEPS = [999, 749, 499, 249, 0]
SIGMA = {999: 4.0, 749: 2.0, 499: 1.0, 249: 0.5, 0: 0.25}  # activation ranges shrink over the trajectory


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _student_t(shape, g, df=3):
    z = torch.randn(shape, generator=g)
    chi2 = (torch.randn((df,) + tuple(shape), generator=g) ** 2).sum(0)
    return z / torch.sqrt(chi2 / df)


class TinyNet(nn.Module):
    """forward(x, t): one quantized activation, scaled by a per-timestep factor (like a UNet whose
    ranges depend on t)."""

    def __init__(self, quantizer: nn.Module):
        super().__init__()
        self.act = quantizer

    def forward(self, x, t, labels=None):
        return self.act(x)


def _calibrated_timestep_quantizer(init="minmax", learnable=False, bits=4):
    model = TinyNet(nn.Identity())
    ctx = install_timestep_context(model)
    q = TimestepActQuantizer(bits, TIMESTEPS, ctx, learnable=learnable, init=init)
    model.act = q
    q.calibrating = True
    g = _gen(1)
    for t in TIMESTEPS:
        for _ in range(2):
            model(torch.randn(4, 3, 5, generator=g) * SIGMA[t] + 0.3 * SIGMA[t], torch.tensor(t))
    q.finish_calibration()
    return model, ctx, q


def test_install_timestep_context_reads_positional_and_keyword_timesteps():
    model = TinyNet(nn.Identity())
    ctx = install_timestep_context(model)
    model(torch.zeros(3, 2), torch.tensor(5))
    assert torch.equal(ctx.current, torch.tensor([5, 5, 5]))  # scalar broadcast to the batch
    model(torch.zeros(2, 2), t=torch.tensor([7, 9]))
    assert torch.equal(ctx.current, torch.tensor([7, 9]))

    class Net2(nn.Module):
        def forward(self, sample, timestep=None, class_labels=None):
            return sample

    net = Net2()
    ctx2 = install_timestep_context(net)
    net(torch.zeros(4, 1), timestep=3)
    assert torch.equal(ctx2.current, torch.tensor([3, 3, 3, 3]))
    with pytest.raises(ValueError, match="timestep"):
        net(torch.zeros(4, 1))
    ctx2.remove()
    net(torch.zeros(4, 1))  # hook gone


def test_timestep_calibration_credits_each_sample_to_its_timestep():
    model = TinyNet(nn.Identity())
    ctx = install_timestep_context(model)
    q = TimestepActQuantizer(8, TIMESTEPS, ctx)
    model.act = q
    q.calibrating = True
    g = _gen(2)
    x = torch.randn(6, 10, generator=g) * torch.tensor([1.0, 5.0, 2.0, 0.1, 3.0, 0.5]).reshape(-1, 1)
    t = torch.tensor([999, 0, 999, 249, 0, 499])
    out = model(x, t)
    assert torch.equal(out, x)  # calibration passes activations through
    for ts in TIMESTEPS:
        i = TIMESTEPS.index(ts)
        sel = t == ts
        if sel.any():
            assert float(q.running_min[i]) == float(x[sel].min())
            assert float(q.running_max[i]) == float(x[sel].max())
        else:
            assert torch.isinf(q.running_min[i])
    q.finish_calibration()
    # the unobserved timestep 749 borrows from the nearest observed one (999)
    assert q.scale[1] == q.scale[0] and q.zero_point[1] == q.zero_point[0]


@pytest.mark.parametrize("init", ["minmax", "mse"])
def test_mixed_timestep_batch_equals_samples_alone(init):
    model, ctx, q = _calibrated_timestep_quantizer(init=init)
    assert len(torch.unique(q.scale)) == len(TIMESTEPS)  # one step size per timestep
    assert (q.scale[:-1] > q.scale[1:]).all()  # ranges shrink with t
    g = _gen(3)
    x = torch.randn(5, 3, 5, generator=g) * 2
    t = torch.tensor([0, 999, 499, 999, 249])
    mixed = model(x, t)
    alone = torch.cat([model(x[i:i + 1], t[i]) for i in range(5)])
    assert torch.equal(mixed, alone)
    # each sample used its own timestep's parameters (reference: IntQuantizer-style formula by hand)
    for i in range(5):
        k = TIMESTEPS.index(int(t[i]))
        s, z = q.scale[k], q.zero_point[k]
        ref = torch.fake_quantize_per_tensor_affine(x[i], float(s), int(z), 0, 15)
        assert torch.equal(mixed[i], ref)


def test_unknown_timestep_uses_nearest_and_heads_are_repeated():
    model, ctx, q = _calibrated_timestep_quantizer()
    x = torch.randn(2, 8, generator=_gen(4)) * 3
    assert torch.equal(model(x, torch.tensor(700)), model(x, torch.tensor(749)))
    assert torch.equal(model(x, torch.tensor(10)), model(x, torch.tensor(0)))
    assert torch.equal(model(x, torch.tensor(1200)), model(x, torch.tensor(999)))
    assert not torch.equal(model(x, torch.tensor(999)), model(x, torch.tensor(0)))
    # leading dim B*k (heads folded into the batch, diffusers head_to_batch_dim order)
    ctx.set(torch.tensor([999, 0]))
    xh = torch.randn(2 * 3, 4, 7, generator=_gen(5)) * 3
    out = q(xh)
    ctx.set(torch.tensor([999]))
    assert torch.equal(out[:3], q(xh[:3]))
    ctx.set(torch.tensor([0]))
    assert torch.equal(out[3:], q(xh[3:]))
    ctx.set(torch.tensor([999, 0]))
    with pytest.raises(ValueError, match="not a multiple"):
        q(torch.randn(3, 4))


def test_timestep_mse_init_beats_minmax_on_heavy_tails_and_caps_memory():
    model = TinyNet(nn.Identity())
    ctx = install_timestep_context(model)
    qs = {init: TimestepActQuantizer(4, TIMESTEPS, ctx, init=init, max_samples=500) for init in ("minmax", "mse")}
    data = {}
    g = _gen(6)
    for t in TIMESTEPS:
        data[t] = _student_t((8, 200), g) * SIGMA[t]
    for q in qs.values():
        model.act = q
        q.calibrating = True
        for t in TIMESTEPS:
            model(data[t], torch.tensor(t))
        if q.init == "mse":
            assert q.held_samples and all(n <= 500 for n in q.held_samples.values())
        q.finish_calibration()
    for t in TIMESTEPS:
        errs = {}
        for init, q in qs.items():
            model.act = q
            errs[init] = float(((model(data[t], torch.tensor(t)) - data[t]) ** 2).mean())
        assert errs["mse"] < errs["minmax"], (t, errs)


def test_timestep_quantizer_gradients_and_bits_change():
    model, ctx, q = _calibrated_timestep_quantizer(learnable=True, bits=3)
    assert isinstance(q.scale, nn.Parameter)
    x = torch.randn(3, 20, generator=_gen(7)) * 8  # beyond the calibrated ranges: clipped
    x.requires_grad_(True)
    out = model(x, torch.tensor([999, 0, 0]))
    ((out - x) ** 2).sum().backward()
    assert q.scale.grad[0] != 0 and q.scale.grad[-1] != 0 and (q.scale.grad[1:4] == 0).all()
    assert q.zero_point.grad[0] != 0 and q.zero_point.grad[-1] != 0
    assert x.grad is not None
    # bits change re-derives min-max parameters from the kept statistics
    model8, _, q8 = _calibrated_timestep_quantizer(bits=8)
    q.bits = 8
    assert torch.allclose(q.scale.detach(), q8.scale) and torch.equal(q.zero_point.detach(), q8.zero_point)


def test_deepcopy_keeps_context_and_quantizers_together():
    model, ctx, q = _calibrated_timestep_quantizer()
    clone = copy.deepcopy(model)
    x = torch.randn(2, 6, generator=_gen(8)) * 2
    t = torch.tensor([999, 0])
    assert torch.equal(clone(x, t), model(x, t))
    clone(x, torch.tensor([0, 0]))
    assert torch.equal(ctx.current, t)  # the copy did not write into the original context
    assert install_timestep_context(model) is ctx  # idempotent: one hook per model
    clone_ctx = find_timestep_context(clone)
    assert clone_ctx is clone.act.context and clone_ctx is not ctx
    remove_timestep_context(clone)
    assert find_timestep_context(clone) is None and find_timestep_context(model) is ctx
    model(x, torch.tensor([0, 0]))  # the original's hook still runs
    assert torch.equal(ctx.current, torch.tensor([0, 0]))


def test_timestep_quantizer_errors():
    ctx = TimestepContext()
    q = TimestepActQuantizer(4, TIMESTEPS, ctx)
    with pytest.raises(RuntimeError, match="install_timestep_context"):
        q(torch.randn(2, 3))
    ctx.set(torch.tensor([0, 999]))
    with pytest.raises(RuntimeError, match="before calibration"):
        q(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="no activations were observed"):
        q.finish_calibration()
    with pytest.raises(ValueError, match="non-empty"):
        TimestepActQuantizer(4, [], ctx)
    with pytest.raises(ValueError, match=r"bits must be one of \[2, 3, 4, 5, 6, 7, 8\]"):
        TimestepActQuantizer(9, TIMESTEPS, ctx)
    with pytest.raises(TypeError, match="TimestepContext"):
        TimestepActQuantizer(4, TIMESTEPS, object())


# ------------------------------------------------------------------------------------------------
# online per-token
# ------------------------------------------------------------------------------------------------
def _rel_err(a, b):
    return ((a - b).norm(dim=-1) / b.norm(dim=-1))


@pytest.mark.parametrize("fmt,bits,bound", [("int", 8, 0.01), ("fp", 8, 0.04), ("int", 6, 0.04), ("fp", 6, 0.08)])
def test_online_token_keeps_small_relative_error_across_1000x_ranges(fmt, bits, bound):
    g = _gen(9)
    x = torch.randn(2, 64, generator=g)
    x[0] *= 1000.0
    x[1] *= 1.0
    q = OnlineTokenActQuantizer(bits, fmt=fmt)
    rel = _rel_err(q(x), x)
    assert (rel < bound).all(), rel
    # a static per-tensor quantizer at the same width destroys the small token: the test can fail
    static = IntQuantizer(bits, symmetric=True, granularity="tensor")
    assert _rel_err(static(x), x)[1] > 0.5


def test_online_token_matches_references():
    g = _gen(10)
    x = torch.randn(3, 5, 16, generator=g) * torch.logspace(-2, 2, 5).reshape(1, 5, 1)
    q = OnlineTokenActQuantizer(8, fmt="fp", exp_bits=4, man_bits=3)
    ref = FPQuantizer(4, 3, granularity="token")(x)
    assert torch.equal(q(x), ref)
    qi = OnlineTokenActQuantizer(4, fmt="int")
    rows = x.reshape(-1, 16)
    scale = rows.abs().amax(dim=1) / 7
    ref_i = torch.fake_quantize_per_channel_affine(rows, scale, torch.zeros(15, dtype=torch.int32), 0, -8, 7)
    assert torch.allclose(qi(x).reshape(-1, 16), ref_i, rtol=0, atol=1e-6)
    # conv input: one row per (b, c) plane
    xc = torch.randn(2, 3, 4, 4, generator=g)
    xc[:, 1] *= 1000
    oc = OnlineTokenActQuantizer(8)(xc)
    planes = xc.reshape(6, 16)
    sp = planes.abs().amax(dim=1) / 127
    ref_c = torch.fake_quantize_per_channel_affine(planes, sp, torch.zeros(6, dtype=torch.int32), 0, -128, 127)
    assert torch.allclose(oc.reshape(6, 16), ref_c, rtol=0, atol=1e-4)


def test_online_unsigned_for_probabilities():
    logits = torch.randn(4, 8, 32, generator=_gen(11)) * 3
    p = logits.softmax(-1)
    for fmt in ("int", "fp"):
        q = OnlineTokenActQuantizer(8, fmt=fmt, signed=False)
        out = q(p)
        assert (out >= 0).all()
        assert (_rel_err(out, p) < 0.03).all()
    # unsigned FP spends the sign bit on the mantissa: finer than signed at the same width
    e_u = _rel_err(OnlineTokenActQuantizer(6, fmt="fp", signed=False)(p), p).mean()
    e_s = _rel_err(OnlineTokenActQuantizer(6, fmt="fp", signed=True)(p), p).mean()
    assert e_u < e_s
    assert torch.equal(OnlineTokenActQuantizer(6, fmt="fp", signed=False)(p),
                       fp_quantize(p, p.amax(-1, keepdim=True), 2, 4, signed=False))


def test_online_straight_through_gradient_and_flags():
    x = torch.randn(3, 10, generator=_gen(12), requires_grad=True)
    q = OnlineTokenActQuantizer(4)
    q(x).sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(x))
    q.enabled = False
    assert q(x) is x
    with pytest.raises(ValueError, match="fmt must be one of"):
        OnlineTokenActQuantizer(8, fmt="float")
    with pytest.raises(ValueError, match="does not match"):
        OnlineTokenActQuantizer(8, fmt="fp", exp_bits=2, man_bits=2)
    with pytest.raises(ValueError, match="exp_bits must be >= 1"):
        OnlineTokenActQuantizer(4, fmt="fp", exp_bits=0)
    with pytest.raises(ValueError, match=r"bits must be one of"):
        OnlineTokenActQuantizer(1)


# ------------------------------------------------------------------------------------------------
# static per-tensor
# ------------------------------------------------------------------------------------------------
def test_static_minmax_equals_per_tensor_quantizer_on_all_batches():
    g = _gen(13)
    batches = [torch.randn(4, 16, generator=g) * s for s in (0.5, 3.0, 1.0)]
    full = torch.cat(batches)
    for fmt, ref_q in (("int", IntQuantizer(6, granularity="tensor")),
                       ("fp", FPQuantizer(2, 3, granularity="tensor"))):
        q = StaticActQuantizer(6, fmt=fmt)
        q.calibrating = True
        for b in batches:
            assert torch.equal(q(b), b)
        q.finish_calibration()
        ref_q.calibrate(full)
        assert torch.equal(q(full), ref_q(full))
        assert q.bits == 6
    q.enabled = False
    assert q(full) is full


def test_static_mse_beats_minmax_and_learnable():
    x = _student_t((64, 64), _gen(14))
    errs = {}
    for init in ("minmax", "mse"):
        q = StaticActQuantizer(4, init=init, max_samples=1000)
        q.calibrating = True
        q(x[:32])
        q(x[32:])
        q.finish_calibration()
        errs[init] = float(((q(x) - x) ** 2).mean())
    assert errs["mse"] < errs["minmax"]
    q = StaticActQuantizer(4, learnable=True)
    q.calibrating = True
    q(x)
    q.finish_calibration()
    xin = (x * 2).requires_grad_(True)
    ((q(xin) - xin) ** 2).sum().backward()
    assert q.quantizer.scale.grad is not None and q.quantizer.scale.grad.abs().sum() > 0
    # bits change re-derives parameters from the kept statistics
    q.bits = 8
    ref = IntQuantizer(8, granularity="tensor")
    ref.calibrate(x)
    assert torch.equal(q(x), ref(x))
    with pytest.raises(ValueError, match="init must be one of"):
        StaticActQuantizer(4, init="percentile")
    with pytest.raises(RuntimeError, match="no activations were observed"):
        StaticActQuantizer(4).finish_calibration()


def test_split_act_quantizer_calibrates_each_part_on_its_own_channels():
    from pipeline.quant.act import SplitActQuantizer, StaticActQuantizer
    from pipeline.quant.packing import _build_act_quantizer, act_quantizer_desc

    torch.manual_seed(0)
    q = SplitActQuantizer(3, StaticActQuantizer(8), StaticActQuantizer(8))
    x = torch.cat([torch.randn(4, 3, 5, 5) * 0.1, torch.randn(4, 2, 5, 5) * 10.0], dim=1)
    q.calibrating = True
    assert all(p.calibrating for p in q.parts)
    assert torch.equal(q(x), x)  # observing passes FP values
    q.finish_calibration()
    assert not q.calibrating
    a, b = q.parts
    ref_a, ref_b = StaticActQuantizer(8), StaticActQuantizer(8)
    for ref, part in ((ref_a, x[:, :3]), (ref_b, x[:, 3:])):
        ref.calibrating = True
        ref(part)
        ref.finish_calibration()
    assert torch.equal(a.quantizer.scale, ref_a.quantizer.scale) and torch.equal(b.quantizer.scale, ref_b.quantizer.scale)
    assert float(b.quantizer.scale) > 10 * float(a.quantizer.scale)
    torch.testing.assert_close(q(x), torch.cat([ref_a(x[:, :3]), ref_b(x[:, 3:])], dim=1), rtol=0, atol=0)
    q.bits = 6
    assert q.bits == 6 and all(p.bits == 6 for p in q.parts)
    q.enabled = False
    assert torch.equal(q(x), x) and not any(p.enabled for p in q.parts)
    q.enabled = True
    # the packed description rebuilds the same quantizer (state through the state dict)
    r = _build_act_quantizer(act_quantizer_desc(q), torch.nn.Module(), "test")
    assert isinstance(r, SplitActQuantizer) and r.split == 3
    r.load_state_dict(q.state_dict())
    assert torch.equal(r(x), q(x))
    with pytest.raises(ValueError, match="split point 5"):
        SplitActQuantizer(5, StaticActQuantizer(8), StaticActQuantizer(8))(x)
    with pytest.raises(ValueError, match="split must be a positive int"):
        SplitActQuantizer(0, StaticActQuantizer(8), StaticActQuantizer(8))
