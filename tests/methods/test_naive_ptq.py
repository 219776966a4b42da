"""Naive PTQ (round-to-nearest, min-max): weights on torch's own per-channel affine grid, error that
shrinks with bits, the keep-first-last rule, activation calibration, and its config errors."""
import copy

import pytest
import torch

from pipeline.config import ConfigError, from_dict, parse_setting
from pipeline.methods import MethodContext, get_family
from pipeline.methods.naive_ptq import NaivePTQConfig, naive_spec
from pipeline.quant.surgery import quant_attention, quant_layers


def _quantize(fp, calib, setting, **options):
    fam = get_family("naive")
    cfg = from_dict(NaivePTQConfig, {"calib_batches": 1, **options}, "naive")
    student = copy.deepcopy(fp)
    return fam.quantize(student, calib, parse_setting(setting), cfg, MethodContext(device="cpu"))


def _eps_error(fp, student, calib) -> float:
    x, t, y = next(iter(calib.batches(8, "cpu", shuffle=False)))
    with torch.no_grad():
        ref = fp(x, t, y)
        return float((student(x, t, y) - ref).pow(2).sum() / ref.pow(2).sum())


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_weights_equal_torch_per_channel_affine_min_max(tiny_calibrated, kind):
    fp, calib = tiny_calibrated[kind]
    res = _quantize(fp, calib, "W4A8")
    layers = dict(quant_layers(res.backbone.net))
    assert len(layers) > 0 and res.info["n_quant_layers"] >= len(layers)  # + attention modules
    seen_bits = set()
    for name, layer in layers.items():
        bits = int(layer.w_bits)
        seen_bits.add(bits)
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        # the reference: asymmetric min-max over each output channel (range widened to contain 0)
        lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
        qmax = 2 ** bits - 1
        scale = ((hi - lo) / qmax).clamp_min(1e-8)
        zp = (-torch.round(lo / scale)).clamp(0, qmax).to(torch.int32)
        ref = torch.fake_quantize_per_channel_affine(w, scale, zp, 0, 0, qmax)
        with torch.no_grad():
            ours = layer.quantized_weight().reshape_as(w)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6, msg=name)
        assert max(len(torch.unique(row)) for row in ours) <= 2 ** bits
    # keep_first_last_bits=8 keeps the first/last/embedding layers at 8 bits, the rest at 4
    assert seen_bits == {4, 8}


def test_error_shrinks_as_bits_grow_and_keep_rule(tiny_calibrated):
    fp, calib = tiny_calibrated["unet"]
    errs = {s: _eps_error(fp, _quantize(fp, calib, s).backbone, calib) for s in ("W3A16", "W4A16", "W8A16")}
    assert errs["W8A16"] < errs["W4A16"] < errs["W3A16"], errs
    all_low = _quantize(fp, calib, "W3A16", keep_first_last_bits=3).backbone
    assert {int(layer.w_bits) for _, layer in quant_layers(all_low.net)} == {3}
    unquantized = _quantize(fp, calib, "W4A16", keep_first_last_bits=0).backbone
    quantized = {name for name, _ in quant_layers(unquantized.net)}
    kept_fp = [n for n, m in unquantized.net.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not any(n.startswith(q) for q in quantized)]
    assert "conv_in" in kept_fp and "conv_out" in kept_fp  # 0 = the first/last layers stay FP modules


def test_activation_quantizers_are_calibrated_only_when_activations_are_quantized(tiny_calibrated):
    fp, calib = tiny_calibrated["dit"]
    w8a8 = _quantize(fp, calib, "W8A8").backbone
    acts = [layer.a_bits for _, layer in quant_layers(w8a8.net)]
    assert acts and set(acts) == {8}
    assert len(list(quant_attention(w8a8.net))) > 0
    assert _eps_error(fp, w8a8, calib) < 0.05
    w8 = _quantize(fp, calib, "W8A16").backbone
    assert {layer.a_bits for _, layer in quant_layers(w8.net)} == {None}


def test_spec_follows_the_setting_and_options():
    cfg = NaivePTQConfig(weight_init="mse", act_init="mse")
    spec = naive_spec(parse_setting("W4A6"), cfg)
    d = spec.default
    assert (d.w_bits, d.w_format, d.w_granularity, d.w_symmetric, d.w_init) == (4, "int", "channel", False, "mse")
    assert (d.a_bits, d.a_mode, d.a_init, d.attn_bits) == (6, "static", "mse", 6)
    d16 = naive_spec(parse_setting("W4A16"), cfg).default
    assert d16.a_bits is None and d16.a_mode == "none" and d16.attn_bits is None


@pytest.mark.parametrize("bad, match", [
    ({"keep_first_last_bits": 9}, r"naive\.keep_first_last_bits: must be 0 \(FP\) or one of"),
    ({"calib_batches": 0}, r"naive\.calib_batches: must be >= 1"),
    ({"weight_init": "percentile"}, r"naive\.weight_init"),
    ({"bits": 4}, r"naive\.bits: unknown key"),
])
def test_config_errors_name_the_key(bad, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(NaivePTQConfig, bad, "naive")
