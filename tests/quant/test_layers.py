"""QuantLinear / QuantConv2d / QuantAttnProcessor: exactness when off, agreement with torch's own
fake-quant ops, mixed masks, in_scale, LoRA, gradients, attention math vs diffusers' processor."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.quant.attention import QuantAttnProcessor
from pipeline.quant.layers import QuantConv2d, QuantLinear
from pipeline.quant.primitives import BinaryResidual, FPQuantizer, IntQuantizer


def _linear(i=48, o=12, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(i, o)


def _conv(i=6, o=8, k=3, seed=0, **kw):
    torch.manual_seed(seed)
    return nn.Conv2d(i, o, k, padding=1, **kw)


def _ref_per_channel(w, bits, symmetric=False):
    """Independent per-channel min-max fake quant via torch's op."""
    wf = w.reshape(w.shape[0], -1)
    lo = wf.amin(1).clamp_max(0)
    hi = wf.amax(1).clamp_min(0)
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = (torch.maximum(-lo, hi) / qmax).clamp_min(1e-8)
        zp = torch.zeros_like(scale)
    else:
        qmin, qmax = 0, 2 ** bits - 1
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-8)
        zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return torch.fake_quantize_per_channel_affine(w, scale, zp.to(torch.int32), 0, qmin, qmax)


# ---------------------------------------------------------------------------------------------
# off == original
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [_linear, _conv, lambda: _conv(groups=2), lambda: _conv(padding_mode="reflect")])
def test_off_is_original_forward_bit_for_bit(make):
    m = make()
    x = torch.randn(3, 6, 5, 5) if isinstance(m, nn.Conv2d) else torch.randn(3, 7, 48)
    ref = m(x)
    cls = QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear
    q = cls.from_float(m, [IntQuantizer(4)], act_quantizer=IntQuantizer(8, granularity="tensor"))
    if getattr(m, "groups", 1) == 1:  # in_scale needs groups=1
        q.set_in_scale(torch.rand(q.weight.shape[1]) + 0.5)
    q.weight_quant = q.act_quant = False
    assert torch.equal(q(x), ref)
    q.weight_quant = True
    assert not torch.equal(q(x), ref)


def test_weight_quant_matches_torch_fake_quantize_per_channel():
    m = _linear()
    x = torch.randn(5, 48)
    for bits, sym in [(8, False), (4, False), (3, True)]:
        q = QuantLinear.from_float(m, [IntQuantizer(bits, symmetric=sym)])
        ref = F.linear(x, _ref_per_channel(m.weight.detach(), bits, sym), m.bias)
        assert torch.equal(q(x), ref)
    c = _conv()
    xc = torch.randn(2, 6, 5, 5)
    qc = QuantConv2d.from_float(c, [IntQuantizer(4)])
    assert torch.equal(qc(xc), F.conv2d(xc, _ref_per_channel(c.weight.detach(), 4), c.bias, padding=1))


def test_mixed_masks_quantize_each_channel_at_its_bits():
    m = _linear(64, 12)
    groups = torch.tensor([0, 1, 2] * 4)
    qs = [IntQuantizer(b, channel_mask=groups == i) for i, b in enumerate((3, 4, 5))]
    layer = QuantLinear.from_float(m, qs)
    wq = layer.quantized_weight()
    w = m.weight.detach()
    for i, b in enumerate((3, 4, 5)):
        rows = groups == i
        assert torch.equal(wq[rows], _ref_per_channel(w[rows], b))
    assert layer.w_bits == pytest.approx(4.0)
    # a binary residual on 3 channels adds 1 bit there
    res_mask = torch.zeros(12, dtype=torch.bool)
    res_mask[:3] = True
    layer.set_weight_quantizers([IntQuantizer(b, channel_mask=groups == i) for i, b in enumerate((3, 4, 5))],
                                residual=BinaryResidual(12, res_mask))
    assert layer.w_bits == pytest.approx(4.0 + 3 / 12)
    base = sum(q(layer.effective_weight()) for q in layer.weight_quantizers)
    err_res = (layer.quantized_weight() - w)[:3].pow(2).sum()
    err_base = (base - w)[:3].pow(2).sum()
    assert err_res < err_base  # the residual reduces the error on its channels
    assert torch.equal(layer.quantized_weight()[3:], base[3:])


def test_mask_validation_errors():
    m = _linear(16, 4)
    a = torch.tensor([True, True, False, False])
    with pytest.raises(ValueError, match="overlaps"):
        QuantLinear.from_float(m, [IntQuantizer(4, channel_mask=a), IntQuantizer(4, channel_mask=a)])
    with pytest.raises(ValueError, match="uncovered"):
        QuantLinear.from_float(m, [IntQuantizer(4, channel_mask=a)])
    with pytest.raises(TypeError, match="IntQuantizer, FPQuantizer or BinaryQuantizer"):
        QuantLinear.from_float(m, [nn.Identity()])
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="in_scale"):
        QuantLinear.from_float(m).set_in_scale(torch.ones(3))
    with pytest.raises(ValueError, match="> 0"):
        QuantLinear.from_float(m).set_in_scale(-torch.ones(16))
    with pytest.raises(ValueError, match="rank"):
        QuantLinear.from_float(m).add_lora(0)


def test_in_scale_form_and_act_quant():
    m = _linear(32, 8)
    s = torch.rand(32) + 0.5
    x = torch.randn(4, 32) * 3
    aq = IntQuantizer(8, granularity="tensor")
    layer = QuantLinear.from_float(m, [IntQuantizer(8)], act_quantizer=aq)
    layer.set_in_scale(s)
    layer.calibrate_weight()
    w_s = m.weight.detach() * s
    assert torch.equal(layer.effective_weight(), w_s)
    xs = x / s
    expected = F.linear(aq(xs), _ref_per_channel(w_s, 8), m.bias)
    assert torch.equal(layer(x), expected)
    # weight-only: input still divided by s (consistent with the scaled weight)
    layer.act_quant = False
    assert torch.allclose(layer(x), m(x), rtol=0, atol=0.05)
    assert layer.a_bits == 8 and layer.w_bits == 8


def test_lora_linear_and_conv_products_and_merge():
    lin = QuantLinear.from_float(_linear(16, 8), [IntQuantizer(4)])
    lin.add_lora(3)
    assert torch.count_nonzero(lin.lora_B) == 0
    bound = 1 / math.sqrt(16)  # kaiming_uniform(a=sqrt(5)) on fan_in 16
    assert lin.lora_A.abs().max() <= bound + 1e-7
    torch.nn.init.normal_(lin.lora_B)
    assert torch.allclose(lin.lora_delta(), lin.lora_B @ lin.lora_A)

    conv = QuantConv2d.from_float(_conv(6, 8), [IntQuantizer(4)])
    conv.add_lora(2)
    torch.nn.init.normal_(conv.lora_B)
    delta = conv.lora_delta()
    assert delta.shape == conv.weight.shape
    for u in range(3):
        for v in range(3):
            assert torch.allclose(delta[:, :, u, v], conv.lora_B[:, :, u, v] @ conv.lora_A[:, :, u, v], atol=1e-6)

    for layer, x in ((lin, torch.randn(3, 16)), (conv, torch.randn(2, 6, 5, 5))):
        layer.calibrate_weight()
        y = layer(x)
        layer.weight_quant = layer.act_quant = False
        # "off" with LoRA attached runs W + ΔW
        y_off = layer(x)
        assert torch.equal(y_off, layer.op(x, layer.weight + layer.lora_delta()))
        layer.weight_quant = True
        layer.merge_lora()
        assert layer.lora_A is None and layer.lora_rank == 0
        assert torch.equal(layer(x), y)


def test_gradients_reach_lora_scales_residual_adaround_and_act():
    torch.manual_seed(0)
    for make, x in ((lambda: _linear(16, 8), torch.randn(4, 16)), (lambda: _conv(6, 8), torch.randn(2, 6, 5, 5))):
        m = make()
        cls = QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear
        mask = torch.zeros(8, dtype=torch.bool)
        mask[:3] = True
        aq = IntQuantizer(8, granularity="tensor", learnable=True)
        layer = cls.from_float(m, [IntQuantizer(3, learnable=True)], act_quantizer=aq,
                               residual=BinaryResidual(8, mask))
        layer.add_lora(2)
        torch.nn.init.normal_(layer.lora_B, std=0.01)  # B = 0 would zero A's gradient
        q = layer.weight_quantizers[0]
        with torch.no_grad():
            q.scale.mul_(0.6)  # clip some weights: inside the range d/dz cancels exactly
        layer(x).pow(2).sum().backward()
        for name, p in [("lora_A", layer.lora_A), ("lora_B", layer.lora_B), ("scale", q.scale),
                        ("zero_point", q.zero_point), ("alpha", layer.residual.alpha), ("act scale", aq.scale)]:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        assert layer.weight.grad is None  # FP weight frozen

        layer.merge_lora()
        ada = layer.use_adaround()
        layer(x).pow(2).sum().backward()
        assert ada[0].V.grad is not None and torch.count_nonzero(ada[0].V.grad) > 0
        layer.harden_adaround()
        assert torch.equal(layer.quantized_weight(), ada[0].quantized_weight() + layer.residual(
            layer.effective_weight(), ada[0].quantized_weight()))


def test_fp_group_quantizer_in_layer():
    m = _linear(256, 8)
    layer = QuantLinear.from_float(m, [FPQuantizer(2, 1, granularity="group", group_size=128)])
    wq = layer.quantized_weight()
    # every group of 128 uses at most 15 distinct values of the E2M1 grid (scaled)
    groups = wq.reshape(8, 2, 128)
    for r in range(8):
        for g in range(2):
            assert groups[r, g].unique().numel() <= 15
    assert layer.w_bits == 4


# ---------------------------------------------------------------------------------------------
# attention processor
# ---------------------------------------------------------------------------------------------
def _attention(**kw):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(**kw).eval()


ATTN_CASES = {
    "self": (dict(query_dim=16, heads=2, dim_head=8), lambda: (torch.randn(2, 5, 16),), {}),
    "cross_mask": (dict(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8),
                   lambda: (torch.randn(2, 5, 16),),
                   {"encoder_hidden_states": torch.randn(2, 3, 12),
                    "attention_mask": torch.tensor([[0.0, 0.0, -10000.0], [0.0, 0.0, 0.0]])}),
    "unet_4d": (dict(query_dim=16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True,
                     rescale_output_factor=2.0, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True),
                lambda: (torch.randn(2, 16, 3, 3),), {}),
}


@pytest.mark.parametrize("case", sorted(ATTN_CASES))
def test_attention_processor_matches_default(case):
    from pipeline.quant.surgery import build_attention_processor, LayerQuant

    kw, make_args, call_kw = ATTN_CASES[case]
    attn = _attention(**kw)
    assert type(attn.processor).__name__ == "AttnProcessor2_0"
    args = make_args()
    ref = attn(*args, **call_kw)
    proc = build_attention_processor(LayerQuant(w_bits=None, a_bits=8, attn_bits=8))
    attn.set_processor(proc)
    proc.act_quant = False  # exact SDPA path
    assert torch.equal(attn(*args, **call_kw), ref)
    proc.act_quant = True  # explicit scores, quantizers disabled
    for q in proc.quantizers().values():
        q.enabled = False
    assert torch.allclose(attn(*args, **call_kw), ref, atol=1e-5, rtol=1e-5)
    assert proc.last_macs == {"qk": proc.last_macs["pv"], "pv": proc.last_macs["pv"]}
    n_q = args[0].shape[2] * args[0].shape[3] if args[0].dim() == 4 else args[0].shape[1]
    n_k = call_kw["encoder_hidden_states"].shape[1] if "encoder_hidden_states" in call_kw else n_q
    assert proc.last_macs["qk"] == 2 * 2 * n_q * n_k * 8
    # quantized at 8 bits: close but not identical
    for q in proc.quantizers().values():
        q.enabled = True
        q.calibrating = True
    attn(*args, **call_kw)
    for q in proc.quantizers().values():
        q.finish_calibration()
    out = attn(*args, **call_kw)
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.03


def test_attention_processor_quantizes_operands():
    """Q, K, P, V reach their quantizers with the documented shapes; P is in [0, 1]."""
    attn = _attention(query_dim=16, heads=2, dim_head=8)
    seen = {}

    class Spy(nn.Module):
        def __init__(self, key):
            super().__init__()
            self.key = key
            self.bits = 8

        def forward(self, x):
            seen[self.key] = x.detach().clone()
            return x

    proc = QuantAttnProcessor(Spy("q"), Spy("k"), Spy("p"), Spy("v"))
    attn.set_processor(proc)
    x = torch.randn(2, 5, 16)
    attn(x)
    assert seen["q"].shape == (2, 2, 5, 8) and seen["k"].shape == (2, 2, 5, 8)
    assert seen["p"].shape == (2, 2, 5, 5) and seen["p"].min() >= 0 and seen["p"].max() <= 1
    assert torch.allclose(seen["p"].sum(-1), torch.ones(2, 2, 5))
    assert proc.operand_bits("q") == 8
    proc.act_quant = False
    assert proc.operand_bits("q") is None


@pytest.mark.parametrize("case", sorted(ATTN_CASES) + ["bool_mask"])
@pytest.mark.parametrize("p_fmt", ["fp16", "fp8", "int8"])
def test_attention_inference_path_is_bit_identical_to_the_autograd_path(case, p_fmt):
    """Without autograd the score scaling / additive mask run in place and the online FP quantizers take their
    fast path; the output equals the autograd forward (reference paths) bit for bit."""
    from pipeline.quant.act import OnlineTokenActQuantizer

    if case == "bool_mask":
        kw, make_args = ATTN_CASES["self"][:2]
        call_kw = {"attention_mask": torch.tensor([[True, True, False, True, True], [True] * 5])}
    else:
        kw, make_args, call_kw = ATTN_CASES[case]
    attn = _attention(**kw)
    qkv = [OnlineTokenActQuantizer(6, fmt="fp", rows="last_dim") for _ in range(3)]
    p = {"fp16": OnlineTokenActQuantizer(16, fmt="fp", exp_bits=13, man_bits=3, signed=False, rows="last_dim"),
         "fp8": OnlineTokenActQuantizer(8, fmt="fp", signed=False, rows="last_dim"),
         "int8": OnlineTokenActQuantizer(8, fmt="int", signed=False, rows="last_dim")}[p_fmt]
    attn.set_processor(QuantAttnProcessor(qkv[0], qkv[1], p, qkv[2]))
    args = make_args()
    ref = attn(*args, **call_kw)
    assert ref.requires_grad
    with torch.no_grad():
        fast = attn(*args, **call_kw)
    assert torch.equal(fast, ref.detach())
