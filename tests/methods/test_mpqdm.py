"""MPQ-DM / MPQ-DMv2 initialisation: pre-scale, kurtosis ranking, OMQ groups and k search, binary residual,
SVD LoRA init, the registered variants, the student checkpoint round trip and the packed export."""
import copy

import pytest
import scipy.stats
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import (BitSetting, ConfigError, from_dict)
from pipeline.methods import MethodContext, get_family
from pipeline.methods import mpqdm
from pipeline.quant.layers import QuantConv2d, QuantLinear
from pipeline.quant.primitives import IntQuantizer


def _heavy_weight(out=20, inp=32, heavy=(0, 3, 7), seed=0):
    """Gaussian rows, except the ``heavy`` rows: Student-t (df=2) with a few large outliers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.1
    for i in heavy:
        t = torch.distributions.StudentT(2.0).sample((inp,)) * 0.05
        t[:2] = torch.tensor([1.5, -1.2])
        w[i] = t
    return w


# ------------------------------------------------------------------------------------------------
# pre-scale and kurtosis
# ------------------------------------------------------------------------------------------------
def test_prescale_matches_formula_and_keeps_fp_output():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    x = torch.randn(5, 3, 6) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0, 50.0])
    s = mpqdm.prescale_vector(mpqdm.input_channel_absmax(x, conv=False), lin.weight)
    expect = torch.sqrt(x.abs().reshape(-1, 6).max(0).values / lin.weight.abs().max(0).values)
    torch.testing.assert_close(s, expect)
    layer = QuantLinear.from_float(lin, [IntQuantizer(8)])
    layer.set_in_scale(s)
    layer.weight_quant = layer.act_quant = False
    # the scale is an identity of the FP math: X·diag(1/s) · (W·diag(s))ᵀ == X·Wᵀ
    torch.testing.assert_close(F.linear(x / s, layer.effective_weight(), lin.bias), lin(x), rtol=1e-5, atol=1e-5)
    conv = nn.Conv2d(3, 4, 3)
    xc = torch.randn(2, 3, 5, 5)
    sc = mpqdm.prescale_vector(mpqdm.input_channel_absmax(xc, conv=True), conv.weight)
    expect = torch.sqrt(xc.abs().amax(dim=(0, 2, 3)) / conv.weight.abs().amax(dim=(0, 2, 3)))
    torch.testing.assert_close(sc, expect)


def test_kurtosis_matches_scipy_and_ranks_heavy_channels_first():
    w = _heavy_weight()
    k = mpqdm.channel_kurtosis(w)
    ref = torch.tensor(scipy.stats.kurtosis(w.double().numpy(), axis=1, fisher=False, bias=True), dtype=torch.float32)
    torch.testing.assert_close(k, ref, rtol=1e-4, atol=1e-4)
    top, mid, bottom = mpqdm.omq_masks(k, 3)
    assert set(top.nonzero().flatten().tolist()) == {0, 3, 7}
    order = torch.argsort(torch.from_numpy(scipy.stats.kurtosis(w.numpy(), axis=1, fisher=False)))
    assert set(bottom.nonzero().flatten().tolist()) == set(order[:3].tolist())
    assert int(top.sum() + mid.sum() + bottom.sum()) == w.shape[0] and not (top & bottom).any()
    with pytest.raises(ValueError, match="k must satisfy"):
        mpqdm.omq_masks(k, 11)


# ------------------------------------------------------------------------------------------------
# OMQ groups and search
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("salient", ["extra_bit", "residual"])
@pytest.mark.parametrize("bits", [3, 4])
def test_omq_keeps_average_bit_width(bits, salient):
    w = _heavy_weight()
    layer = QuantLinear.from_float(nn.Linear(32, 20), [IntQuantizer(bits)])
    with torch.no_grad():
        layer.weight.copy_(w)
    qs, res = mpqdm.build_mixed_quantizers(w, bits, mpqdm.channel_kurtosis(w), 4, salient)
    layer.set_weight_quantizers(qs, res, calibrate=False)
    assert layer.w_bits == pytest.approx(bits)
    per_channel = torch.zeros(20)
    for q in qs:
        per_channel[q.channel_mask] = q.bits
    top = qs[0].channel_mask
    if salient == "extra_bit":
        assert per_channel[top].eq(bits + 1).all()
    else:
        assert per_channel[top].eq(bits).all() and res is not None and res.channel_mask.equal(top)
    assert set(top.nonzero().flatten().tolist()) >= {0, 3, 7}
    # the groups' sum is the quantized weight; every channel is covered once
    assert torch.equal(layer.quantized_weight(), mpqdm.quantized_from(qs, res, w))


def test_w2_has_no_mixed_groups_without_a_1bit_grid():
    from pipeline.quant.primitives import INT_BITS

    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(32, 20), [IntQuantizer(2)])
    with torch.no_grad():
        layer.weight.copy_(_heavy_weight())
    x = torch.randn(16, 32)
    k, errors, (qs, _) = mpqdm.omq_search(layer, x, 2, [0.0, 0.1, 0.2], "extra_bit")
    if INT_BITS[0] == 2:  # the core has no 1-bit integer grid: OMQ must not buy bits
        assert list(errors) == [0] and k == 0 and [q.bits for q in qs] == [2]
    else:
        assert sorted(errors) == [0, 2, 4]
    k8, errors8, _ = mpqdm.omq_search(layer, x, 8, [0.0, 0.1], "extra_bit")
    assert list(errors8) == [0]


def test_omq_search_picks_the_k_with_the_lowest_layer_mse():
    torch.manual_seed(1)
    lin = nn.Linear(32, 20)
    with torch.no_grad():
        lin.weight.copy_(_heavy_weight(seed=2))
    x = torch.randn(64, 32)
    x[:, 5] *= 20  # an outlier input channel, as in diffusion activations
    layer = QuantLinear.from_float(lin, [IntQuantizer(3)])
    layer.act_quant = False
    layer.set_in_scale(mpqdm.prescale_vector(mpqdm.input_channel_absmax(x, False), layer.weight))
    k, errors, (qs, res) = mpqdm.omq_search(layer, x, 3, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], "extra_bit")
    assert sorted(errors) == mpqdm.candidate_ks(20, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]) == [0, 2, 4, 6, 8, 10]
    assert k == min(errors, key=errors.get)
    y_fp = lin(x)
    # recompute every candidate's error through the layer's own forward path once installed
    kurt = mpqdm.channel_kurtosis(layer.effective_weight())
    for cand, err in errors.items():
        cq, cr = mpqdm.build_mixed_quantizers(layer.effective_weight(), 3, kurt, cand, "extra_bit")
        layer.set_weight_quantizers(cq, cr, calibrate=False)
        with torch.no_grad():
            assert F.mse_loss(layer(x), y_fp).item() == pytest.approx(err, rel=1e-5)
    assert errors[k] < errors[0]  # outlier rows gain from b+1 bits here
    k0, errors0, _ = mpqdm.omq_search(layer, x, 3, [0.0], "extra_bit")
    assert k0 == 0 and list(errors0) == [0]


# ------------------------------------------------------------------------------------------------
# binary residual
# ------------------------------------------------------------------------------------------------
def test_residual_reduces_weight_error_and_trains_alpha_and_base():
    w = _heavy_weight(out=12, inp=64, heavy=tuple(range(12)))  # every channel heavy-tailed
    kurt = mpqdm.channel_kurtosis(w)
    for bits in (2, 3, 4):
        base = IntQuantizer(bits, init="mse")
        base_err = F.mse_loss(base(w), w)
        qs, res = mpqdm.build_mixed_quantizers(w, bits, kurt, 6, "residual")
        top = qs[0].channel_mask
        w_q = sum(q(w) for q in qs)
        with_res = w_q + res(w, w_q)
        # on the salient channels: base b bits vs base + residual
        e_base = F.mse_loss(base(w)[top], w[top])
        e_res = F.mse_loss(with_res[top], w[top])
        assert e_res < 0.8 * e_base, (bits, e_res, e_base)
        assert base_err > 0
    layer = QuantLinear.from_float(nn.Linear(64, 12), [IntQuantizer(3)])
    with torch.no_grad():
        layer.weight.copy_(w)
    qs, res = mpqdm.build_mixed_quantizers(w, 3, kurt, 3, "residual", learnable=True)
    layer.set_weight_quantizers(qs, res, calibrate=False)
    loss = (layer(torch.randn(8, 64)) ** 2).mean()
    loss.backward()
    assert res.alpha.grad is not None and res.alpha.grad[qs[0].channel_mask].abs().sum() > 0
    assert qs[0].scale.grad is not None and qs[0].scale.grad.abs().sum() > 0
    assert qs[0].zero_point.grad is not None


# ------------------------------------------------------------------------------------------------
# SVD LoRA init
# ------------------------------------------------------------------------------------------------
def test_svd_factors_approximate_the_quantization_error():
    w = _heavy_weight()
    q = IntQuantizer(3, init="mse")(w)
    err = w - q
    zero = torch.linalg.norm(w - q)
    prev = zero
    for r in (1, 4, 8):
        b, a = mpqdm.svd_lora_factors(err, r)
        assert b.shape == (20, r) and a.shape == (r, 32)
        d = torch.linalg.norm(w - (q + b @ a))
        assert d < prev  # closer than zero init, more so with rank
        prev = d
    b, a = mpqdm.svd_lora_factors(err, 20)
    torch.testing.assert_close(q + b @ a, w, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="rank must be in"):
        mpqdm.svd_lora_factors(err, 21)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_init_lora_svd_keeps_latent_weight_and_spans_the_error(kind):
    torch.manual_seed(0)
    mod = nn.Linear(16, 12) if kind == "linear" else nn.Conv2d(6, 8, 3, padding=1)
    layer = (QuantLinear if kind == "linear" else QuantConv2d).from_float(mod, [IntQuantizer(3, init="mse")])
    layer.set_in_scale(torch.rand(mod.weight.shape[1]) + 0.5)
    layer.calibrate_weight()
    latent = layer.effective_weight().detach().clone()
    w_q = layer.quantized_weight().detach().clone()
    err = latent - w_q
    full = mpqdm.lora_rank_for(layer, 99)
    assert full == min(mod.weight.shape[0], mod.weight.shape[1])
    for rank in (2, full):
        lay = copy.deepcopy(layer)
        r = mpqdm.init_lora(lay, rank, "svd")
        assert r == rank
        torch.testing.assert_close(lay.effective_weight(), latent, rtol=0, atol=1e-6)  # frozen W − BA + BA
        delta = lay.lora_delta() * lay.in_scale_weight_view()  # B·A in the pre-scaled domain
        assert torch.linalg.norm(err - delta) < torch.linalg.norm(err)
        if rank == full:
            torch.testing.assert_close(delta, err, rtol=0, atol=1e-5)
        assert lay.lora_A.abs().sum() > 0 and lay.lora_B.abs().sum() > 0
    z = copy.deepcopy(layer)
    mpqdm.init_lora(z, 2, "zero")
    assert z.lora_B.abs().sum() == 0 and torch.equal(z.effective_weight(), latent)


# ------------------------------------------------------------------------------------------------
# registry, config, whole-model runs
# ------------------------------------------------------------------------------------------------
def test_variants_are_registered_with_their_switches():
    fam = get_family("mpq")
    assert fam.variant_names == ["mpqdm", "mpqdm2", "mpqdm2_no_residual", "mpqdm2_no_lora_init", "mpqdm2_no_memory",
                                 "efficientdm"]
    assert fam.config_cls is mpqdm.MPQConfig and fam.finetune is not None and fam.finetune_field == "qat"
    sw = {v.name: v.switches for v in fam.variants}
    assert sw["mpqdm"] == {"salient": "extra_bit", "lora_init": "zero", "relation": "trd"}
    assert sw["mpqdm2"] == {"salient": "residual", "lora_init": "svd", "relation": "memory"}
    assert sw["mpqdm2_no_residual"]["salient"] == "extra_bit"
    assert sw["mpqdm2_no_lora_init"]["lora_init"] == "zero"
    assert sw["mpqdm2_no_memory"]["relation"] == "trd"
    assert sw["efficientdm"] == {"salient": "none", "lora_init": "zero", "relation": "none"}
    with pytest.raises(ValueError, match="variant.salient"):
        mpqdm.check_variant({"salient": "bogus"})
    with pytest.raises(ConfigError, match=r"mpq\.omq_fractions\[1\]"):
        from_dict(mpqdm.MPQConfig, {"omq_fractions": [0.0, 0.7]}, "mpq")
    with pytest.raises(ConfigError, match=r"mpq\.lora_rnak: unknown key"):
        from_dict(mpqdm.MPQConfig, {"lora_rnak": 4}, "mpq")
    with pytest.raises(ConfigError, match=r"mpq\.qat\.lr: unknown key"):
        from_dict(mpqdm.MPQConfig, {"qat": {"lr": 0.1}}, "mpq")


def _init(fp, calib, name, setting=BitSetting(3, 4)):
    v = get_family("mpq").variant(name)
    student = copy.deepcopy(fp)
    torch.manual_seed(0)
    # min-max ranges keep the test fast (the MSE search is the core's, tested there)
    cfg = mpqdm.MPQConfig(lora_rank=4, calib_inputs=8, act_calib_batches=1, act_init="minmax",
                          weight_init="minmax")
    res = mpqdm.quantize(student, calib, setting, cfg, MethodContext(variant=v.switches))
    return student, res


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_student_checkpoint_round_trip_and_packed_export(tiny_calibrated, kind, tmp_path):
    from pipeline.quant.checkpoint import load_student, save_student
    from pipeline.quant.packing import load_quantized, merge_lora, save_quantized
    from pipeline.quant.surgery import quant_layers

    fp, calib = tiny_calibrated[kind]
    student, res = _init(fp, calib, "mpqdm2")
    layers = dict(quant_layers(student.net))
    assert any(l.lora_A is not None for l in layers.values())
    assert all(l.in_scale is not None for l in layers.values() if l.lora_A is not None)
    assert res.info["avg_weight_bits"] == pytest.approx(3.0)
    save_student(student.net, res.spec, tmp_path / "ckpt", {"variant": res.info["variant"]})
    rebuilt = copy.deepcopy(fp)
    _, spec, meta = load_student(rebuilt.net, tmp_path / "ckpt")
    assert meta["variant"]["relation"] == "memory" and spec.to_dict() == res.spec.to_dict()
    x, t, y = calib.x[:4], calib.t[:4], calib.labels[:4]
    with torch.no_grad():
        ref = student(x, t, y)
        assert torch.equal(rebuilt(x, t, y), ref)
        # LoRA trained a little: merged + packed model reproduces the fake-quant forward bit for bit
        for l in quant_layers(rebuilt.net):
            if l[1].lora_B is not None:
                l[1].lora_B.add_(0.01)
        before = rebuilt(x, t, y)
    merge_lora(rebuilt.net)
    summary = save_quantized(rebuilt.net, spec, tmp_path / "packed")
    assert summary["packed_bytes"] > 0
    loaded = copy.deepcopy(fp)
    loaded.net = load_quantized(loaded.net, tmp_path / "packed")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="save_student"):
        load_student(copy.deepcopy(fp).net, tmp_path / "nothing")


def test_efficientdm_variant_has_no_omq(tiny_calibrated):
    from pipeline.quant.surgery import quant_layers

    fp, calib = tiny_calibrated["unet"]
    student, res = _init(fp, calib, "efficientdm")
    mixed = [l for _, l in quant_layers(student.net) if l.lora_A is not None]
    assert mixed and all(l.in_scale is None and len(l.weight_quantizers) == 1 and l.residual is None for l in mixed)
    assert all(not bool(l.lora_B.any()) for l in mixed)  # zero-init LoRA
    assert res.info["mean_salient_fraction"] == 0.0 and res.info["avg_weight_bits"] == pytest.approx(3.0)
