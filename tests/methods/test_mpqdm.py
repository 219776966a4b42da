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


def _outlier_layer(bits, seed=0, input_outlier=True):
    """A 32 -> 20 linear layer with heavy-tailed rows 0, 3, 7, calibration inputs (with an outlier input
    channel unless ``input_outlier=False``), and the OMQ pre-scale set."""
    torch.manual_seed(seed)
    lin = nn.Linear(32, 20)
    with torch.no_grad():
        lin.weight.copy_(_heavy_weight(seed=seed))
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(seed + 1))
    if input_outlier:
        x[:, 5] *= 20
    layer = QuantLinear.from_float(lin, [IntQuantizer(bits)])
    layer.act_quant = False
    layer.set_in_scale(mpqdm.prescale_vector(mpqdm.input_channel_absmax(x, False), layer.weight))
    return lin, layer, x


@pytest.mark.parametrize("salient", ["extra_bit", "residual"])
def test_w2_layer_gets_binary_demoted_group_and_keeps_2_bits(salient):
    lin, layer, x = _outlier_layer(2, seed=2, input_outlier=False)
    k, errors, (qs, res) = mpqdm.omq_search(layer, x, 2, [0.0, 0.1, 0.2, 0.3], salient, init="mse",
                                            candidate_init="minmax")
    assert sorted(errors) == [0, 2, 4, 6]  # the search considers the mixed groups at W2
    assert k > 0 and errors[k] < errors[0], errors  # and, with outlier channels, picks one
    kinds = [(type(q).__name__, q.bits) for q in qs]
    if salient == "extra_bit":
        assert kinds == [("IntQuantizer", 3), ("IntQuantizer", 2), ("BinaryQuantizer", 1)] and res is None
    else:
        assert kinds == [("IntQuantizer", 2), ("IntQuantizer", 2), ("BinaryQuantizer", 1)] and res is not None
    layer.set_weight_quantizers(qs, res, calibrate=False)
    assert layer.w_bits == pytest.approx(2.0)  # {3, 2, 1} (or 2 + residual, 2, 1) bits average to 2
    assert int(qs[2].channel_mask.sum()) == k and set(qs[0].channel_mask.nonzero().flatten().tolist()) >= {0, 3, 7}
    assert torch.equal(layer.quantized_weight(), mpqdm.quantized_from(qs, res, layer.effective_weight()))
    # W8 has no 9-bit grid: OMQ's extra bit is not available there (the residual is)
    _, errors8, _ = mpqdm.omq_search(layer, x, 8, [0.0, 0.1], "extra_bit")
    assert list(errors8) == [0]
    _, errors8r, _ = mpqdm.omq_search(layer, x, 8, [0.0, 0.1], "residual")
    assert sorted(errors8r) == [0, 2]


def _ref_minmax(rows: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent per-row asymmetric min-max fake quantization (float64)."""
    r = rows.double()
    lo, hi = r.min(1, keepdim=True).values.clamp(max=0), r.max(1, keepdim=True).values.clamp(min=0)
    n = 2 ** bits - 1
    scale = ((hi - lo) / n).clamp(min=1e-8)
    zp = torch.round(-lo / scale).clamp(0, n)
    return ((torch.clamp(torch.round(r / scale) + zp, 0, n) - zp) * scale)


def _ref_binary(rows: torch.Tensor) -> torch.Tensor:
    r = rows.double()
    mu = r.mean(1, keepdim=True)
    alpha = (r - mu).abs().mean(1, keepdim=True)
    return mu + alpha * torch.where(r - mu >= 0, 1.0, -1.0)


@pytest.mark.parametrize("bits", [2, 3])
def test_omq_search_min_max_candidates_match_a_brute_force_recomputation(bits):
    lin, layer, x = _outlier_layer(bits, seed=3)
    fractions = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    k, errors, (qs, _) = mpqdm.omq_search(layer, x, bits, fractions, "extra_bit", init="mse",
                                          candidate_init="minmax")
    w = (lin.weight.detach() * layer.in_scale).double()  # pre-scaled weight W·diag(s)
    c = w.shape[0]
    d = w - w.mean(1, keepdim=True)
    kurt = (d.pow(4).mean(1) / d.pow(2).mean(1).pow(2))
    order = torch.argsort(kurt, descending=True, stable=True)
    y_fp = (x.double() @ lin.weight.detach().double().T + lin.bias.detach().double())
    xs = x.double() / layer.in_scale.double()
    brute = {}
    for cand in [0, 2, 4, 6, 8, 10]:
        top, bottom = order[:cand], order[c - cand:] if cand else order[:0]
        mid = torch.ones(c, dtype=torch.bool)
        mid[top] = False
        mid[bottom] = False
        w_hat = torch.zeros_like(w)
        w_hat[mid] = _ref_minmax(w[mid], bits)
        if cand:
            w_hat[top] = _ref_minmax(w[top], bits + 1)
            w_hat[bottom] = _ref_binary(w[bottom]) if bits == 2 else _ref_minmax(w[bottom], bits - 1)
        brute[cand] = float(((xs @ w_hat.T + lin.bias.detach().double()) - y_fp).pow(2).mean())
    assert sorted(errors) == sorted(brute)
    for cand in brute:
        assert errors[cand] == pytest.approx(brute[cand], rel=1e-3), cand
    assert k == min(brute, key=brute.get)  # the argmin of the stated objective over the candidates
    # the winner is installed with the configured (MSE) ranges, not the candidates' min-max ones
    for q in qs:
        if isinstance(q, IntQuantizer):
            assert q.init == "mse"
            ref = mpqdm.channel_quantizer_params(layer.effective_weight(), q.bits, init="mse")["scale"]
            assert torch.equal(q.scale.detach()[q.channel_mask], ref[q.channel_mask])


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
    sw = {v.name: v.overrides for v in fam.variants}
    assert sw["mpqdm"] == {"salient": "extra_bit", "lora_init": "zero", "relation": "trd"}
    assert sw["mpqdm2"] == {"salient": "residual", "lora_init": "svd", "relation": "memory"}
    assert sw["mpqdm2_no_residual"]["salient"] == "extra_bit"
    assert sw["mpqdm2_no_lora_init"]["lora_init"] == "zero"
    assert sw["mpqdm2_no_memory"]["relation"] == "trd"
    assert sw["efficientdm"] == {"salient": "none", "lora_init": "zero", "relation": "none"}
    with pytest.raises(ConfigError, match=r"mpq\[mpqdm2\]\.salient: 'bogus' is not allowed"):
        fam.config_for("mpqdm2", salient="bogus")
    assert fam.config_for("mpqdm2_no_memory").relation == "trd" and fam.config_for("mpqdm2").lora_init == "svd"
    with pytest.raises(ConfigError, match=r"mpq\.omq_fractions\[1\]"):
        from_dict(mpqdm.MPQConfig, {"omq_fractions": [0.0, 0.7]}, "mpq")
    with pytest.raises(ConfigError, match=r"mpq\.lora_rnak: unknown key"):
        from_dict(mpqdm.MPQConfig, {"lora_rnak": 4}, "mpq")
    with pytest.raises(ConfigError, match=r"mpq\.qat\.lr: unknown key"):
        from_dict(mpqdm.MPQConfig, {"qat": {"lr": 0.1}}, "mpq")


def _init(fp, calib, name, setting=BitSetting(3, 4), **overrides):
    student = copy.deepcopy(fp)
    torch.manual_seed(0)
    # min-max ranges keep the test fast (the MSE search is the core's, tested there)
    cfg = get_family("mpq").config_for(name, **{**dict(lora_rank=4, calib_inputs=8, act_calib_batches=1,
                                                       act_init="minmax", weight_init="minmax"), **overrides})
    res = mpqdm.quantize(student, calib, setting, cfg, MethodContext())
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


# ------------------------------------------------------------------------------------------------
# OMQ on the whole model: quantized-so-far inputs, W2 with the binary group
# ------------------------------------------------------------------------------------------------
def _record_search_inputs(monkeypatch):
    seen = {}
    real = mpqdm.omq_search

    def spy(layer, inputs, *args, **kwargs):
        seen[id(layer)] = inputs.detach().clone()
        return real(layer, inputs, *args, **kwargs)

    monkeypatch.setattr(mpqdm, "omq_search", spy)
    return seen


def _layer_inputs(backbone, layers, calib, n, seed, weight_quant):
    """{name: input} of one forward of the seeded calibration subset (activations unquantized)."""
    from pipeline.quant.surgery import quant_state

    store = {}
    hs = [l.register_forward_pre_hook(lambda m, inp, name=name: store.setdefault(name, inp[0].detach().clone()))
          for name, l in layers.items()]
    sub = calib.subset(min(n, len(calib)), seed=seed)
    quant_state(backbone.net, weight=weight_quant, act=False)
    try:
        with torch.no_grad():
            for x, t, y in sub.batches(len(sub)):
                backbone(x, t, y)
    finally:
        for h in hs:
            h.remove()
        quant_state(backbone.net, weight=True, act=True)
    return store


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_omq_search_inputs_come_from_the_quantized_so_far_network(tiny_calibrated, monkeypatch, kind):
    from pipeline.quant.surgery import quant_layers

    fp, calib = tiny_calibrated[kind]
    seen = _record_search_inputs(monkeypatch)
    student, res = _init(fp, calib, "mpqdm", BitSetting(2, 4), omq_inputs="quantized")
    layers = {n: l for n, l in quant_layers(student.net) if id(l) in seen}
    assert len(layers) > 3
    # what every layer saw in the search = its input in the final network (weights quantized with every
    # earlier layer's chosen groups, activations off): the quantized-so-far network
    q_inputs = _layer_inputs(student, layers, calib, 8, 0, weight_quant=True)
    fp_inputs = _layer_inputs(student, layers, calib, 8, 0, weight_quant=False)
    differ = 0
    for name, layer in layers.items():
        assert torch.equal(seen[id(layer)], q_inputs[name]), name
        differ += not torch.equal(seen[id(layer)], fp_inputs[name])
    assert differ >= len(layers) - 1  # every non-first layer sees quantized upstream weights
    assert res.info["omq_inputs"] == "quantized" and res.info["omq_init"] == "minmax"
    # omq_inputs="fp": the FP network's inputs
    seen.clear()
    student_fp, _ = _init(fp, calib, "mpqdm", BitSetting(2, 4), omq_inputs="fp")
    layers_fp = {n: l for n, l in quant_layers(student_fp.net) if id(l) in seen}
    fp_inputs = _layer_inputs(student_fp, layers_fp, calib, 8, 0, weight_quant=False)
    for name, layer in layers_fp.items():
        assert torch.equal(seen[id(layer)], fp_inputs[name]), name


@pytest.mark.parametrize("variant", ["mpqdm", "mpqdm2"])
def test_w2_model_uses_binary_groups_keeps_2_bits_and_round_trips_exactly(tiny_calibrated, tmp_path, variant):
    from pipeline.quant.checkpoint import load_student, save_student
    from pipeline.quant.cost import model_bytes
    from pipeline.quant.packing import load_quantized, merge_lora, save_quantized
    from pipeline.quant.primitives import BinaryQuantizer
    from pipeline.quant.surgery import quant_layers

    fp, calib = tiny_calibrated["unet"]
    student, res = _init(fp, calib, variant, BitSetting(2, 4), omq_fractions=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    assert res.info["avg_weight_bits"] == pytest.approx(2.0)
    mixed = [l for _, l in quant_layers(student.net) if any(isinstance(q, BinaryQuantizer) for q in l.weight_quantizers)]
    assert mixed and res.info["mean_salient_fraction"] > 0  # some W2 layers got {1, 2, 3}-bit groups
    assert all(l.w_bits == pytest.approx(2.0) for l in mixed)
    x, t, y = calib.x[:4], calib.t[:4], calib.labels[:4]
    save_student(student.net, res.spec, tmp_path / "ckpt")
    rebuilt = copy.deepcopy(fp)
    load_student(rebuilt.net, tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(rebuilt(x, t, y), student(x, t, y))
    merge_lora(rebuilt.net)
    summary = save_quantized(rebuilt.net, res.spec, tmp_path / "packed")
    loaded = copy.deepcopy(fp)
    loaded.net = load_quantized(loaded.net, tmp_path / "packed")
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), rebuilt(x, t, y))  # save -> load: identical outputs
    assert summary["theoretical_bytes"] < model_bytes(fp.net)


def test_omq_options_are_validated_with_the_key():
    assert mpqdm.MPQConfig().omq_inputs == "quantized" and mpqdm.MPQConfig().omq_init == "minmax"
    with pytest.raises(ConfigError, match=r"mpq\.omq_inputs: 'bogus' is not allowed"):
        from_dict(mpqdm.MPQConfig, {"omq_inputs": "bogus"}, "mpq")
    with pytest.raises(ConfigError, match=r"mpq\.omq_init: 'max' is not allowed"):
        from_dict(mpqdm.MPQConfig, {"omq_init": "max"}, "mpq")
    with pytest.raises(ConfigError, match=r"mpq\.omq_init: must be one of \['minmax', 'mse'\]"):
        mpqdm.MPQConfig(omq_init="max").validate("mpq")
    assert from_dict(mpqdm.MPQConfig, {"omq_inputs": "fp", "omq_init": "mse"}, "mpq").omq_inputs == "fp"


def test_w2_init_is_deterministic(tiny_calibrated):
    fp, calib = tiny_calibrated["unet"]
    a, _ = _init(fp, calib, "mpqdm2", BitSetting(2, 4))
    b, _ = _init(fp, calib, "mpqdm2", BitSetting(2, 4))
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("salient,inputs", [("residual", "quantized"), ("extra_bit", "fp"), ("none", "fp")])
def test_apply_omq_returns_the_choices_it_installed(tiny_calibrated, salient, inputs):
    """OMQ as a function: one choice per layer the network calls, each the lowest-MSE candidate (ties keep the
    smaller k), its gain over k = 0, and the layer left with that many salient channels and the pre-scale."""
    from pipeline.quant.surgery import quant_layers, quantize_model

    fp, calib = tiny_calibrated["unet"]
    student = copy.deepcopy(fp)
    cfg = get_family("mpq").config_for("mpqdm", salient=salient, omq_inputs=inputs, calib_inputs=8,
                                       omq_fractions=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    setting = BitSetting(2, 4)
    resolved = quantize_model(student.net, mpqdm._minmax_spec(mpqdm.mpq_spec(setting, cfg)), timesteps=calib.timesteps)
    layers = {n: l for n, l in quant_layers(student.net) if resolved.get(n) is not None and resolved[n].w_bits == 2}
    choices = mpqdm.apply_omq(student, layers, calib, 2, cfg, "cpu")
    assert set(choices) == set(layers)  # the tiny UNet calls every layer
    for name, c in choices.items():
        layer = layers[name]
        best = min(c.mse.values())
        assert c.mse[c.k] == best and all(k >= c.k for k, e in c.mse.items() if e == best), name
        assert c.salient_fraction == c.k / layer.num_out_channels
        assert c.mse_gain == pytest.approx(c.mse[0] / c.mse[c.k])
        assert c.prescaled == (layer.in_scale is not None)
    if salient == "none":
        assert all(c.k == 0 and set(c.mse) == {0} and not c.prescaled for c in choices.values())
    else:
        assert any(c.k > 0 for c in choices.values())  # W2 with fractions up to 0.5: some layer keeps salient groups
        assert all(c.prescaled for n, c in choices.items() if getattr(layers[n], "groups", 1) == 1)
