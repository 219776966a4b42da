"""The 1-bit binary weight quantizer (MPQ-DM's b−1 group at W2): reference values, error ordering against the
2- and 3-bit integer grids, codes, straight-through gradients, layer integration, and that 1 bit is accepted
nowhere else (activations, integer grids, W1 settings)."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline.config import ConfigError, parse_setting
from pipeline.quant.layers import QuantConv2d, QuantLinear
from pipeline.quant.primitives import (BinaryQuantizer, IntQuantizer, check_int_bits, weight_quantizer_desc,
                                       weight_quantizer_from_desc)


def _reference(w: np.ndarray, mask=None) -> np.ndarray:
    """Independent float64 reference: per row μ = mean, α = mean |w − μ|, Q = μ + α·(+1 if w >= μ else −1)."""
    rows = w.reshape(w.shape[0], -1).astype(np.float64)
    out = np.zeros_like(rows)
    for i, r in enumerate(rows):
        if mask is not None and not mask[i]:
            continue
        mu = r.mean()
        alpha = np.abs(r - mu).mean()
        out[i] = mu + alpha * np.where(r - mu >= 0, 1.0, -1.0)
    return out.reshape(w.shape)


@pytest.mark.parametrize("shape", [(6, 17), (4, 3, 3, 3)])
def test_binary_quantizer_matches_reference(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.2 + 0.05
    q = BinaryQuantizer()
    out = q(w)
    np.testing.assert_allclose(out.double().numpy(), _reference(w.numpy()), rtol=1e-5, atol=1e-6)
    rows = w.reshape(shape[0], -1).double()
    torch.testing.assert_close(q.mu.double(), rows.mean(1), rtol=1e-5, atol=1e-7)
    # two levels per channel, μ ± α
    for i in range(shape[0]):
        assert set(out[i].reshape(-1).tolist()) <= {float(q.mu[i] + q.alpha[i]), float(q.mu[i] - q.alpha[i])}
    # masked: only the masked channels, 0 elsewhere; statistics per channel are unchanged
    mask = torch.tensor([True, False] * (shape[0] // 2))
    qm = BinaryQuantizer(channel_mask=mask)
    om = qm(w)
    np.testing.assert_allclose(om.double().numpy(), _reference(w.numpy(), mask.numpy()), rtol=1e-5, atol=1e-6)
    assert torch.equal(om[mask], out[mask]) and not om[~mask].any()
    # codes: one bit per weight, exact decode
    codes = qm.quantize(w)
    assert codes.dtype == torch.int32 and set(codes.unique().tolist()) <= {0, 1}
    assert torch.equal(qm.dequantize(codes), om)
    # sign(0) = +1: a weight equal to μ stores bit 1
    flat = torch.tensor([[1.0, 2.0, 3.0]])
    assert BinaryQuantizer().quantize(flat).tolist() == [[0, 1, 1]]


def test_binary_alpha_is_l2_optimal_for_fixed_mu_and_signs():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    q = BinaryQuantizer()
    q.calibrate(w)
    sign = torch.where(w - q.mu[:, None] >= 0, 1.0, -1.0)
    base = ((q(w) - w) ** 2).sum(1)
    for f in (0.9, 1.1):
        alt = q.mu[:, None] + f * q.alpha[:, None] * sign
        assert (((alt - w) ** 2).sum(1) > base).all()


def test_error_falls_from_1_to_2_to_3_bits_on_gaussian_weights():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    errs = {}
    for init in ("minmax", "mse"):
        e1 = ((BinaryQuantizer()(w) - w) ** 2).mean().item()
        e2 = ((IntQuantizer(2, init=init)(w) - w) ** 2).mean().item()
        e3 = ((IntQuantizer(3, init=init)(w) - w) ** 2).mean().item()
        errs[init] = (e1, e2, e3)
        assert e1 > e2 > e3, (init, e1, e2, e3)
    # Gaussian: the binary error is (1 − 2/π)·σ² per weight
    assert errs["mse"][0] == pytest.approx((1 - 2 / np.pi) * 0.05 ** 2, rel=0.1)


def test_straight_through_gradients_reach_weight_alpha_and_mu():
    w = (torch.randn(4, 10, generator=torch.Generator().manual_seed(3))).requires_grad_(True)
    mask = torch.tensor([True, False, True, True])
    q = BinaryQuantizer(learnable=True, channel_mask=mask)
    q.calibrate(w)
    g = torch.randn(4, 10, generator=torch.Generator().manual_seed(4))
    (q(w) * g).sum().backward()
    m = mask[:, None].float()
    sign = torch.where(w.detach() - q.mu.detach()[:, None] >= 0, 1.0, -1.0)
    torch.testing.assert_close(w.grad, g * m)  # identity on the covered channels, 0 elsewhere
    torch.testing.assert_close(q.alpha.grad, (g * sign * m).sum(1))
    torch.testing.assert_close(q.mu.grad, (g * m).sum(1))
    # through a layer: mixed groups 3 / 2 / 1 bits, LoRA gets gradient, the latent weight too
    torch.manual_seed(0)
    lin = nn.Linear(10, 6)
    gid = torch.arange(6) % 3
    layer = QuantLinear.from_float(lin, [IntQuantizer(3, learnable=True, channel_mask=gid == 0),
                                         IntQuantizer(2, learnable=True, channel_mask=gid == 1),
                                         BinaryQuantizer(learnable=True, channel_mask=gid == 2)])
    assert layer.w_bits == pytest.approx(2.0)
    layer.add_lora(2)
    layer(torch.randn(5, 10)).pow(2).mean().backward()
    binq = layer.weight_quantizers[2]
    assert binq.alpha.grad[gid == 2].abs().sum() > 0 and binq.mu.grad[gid == 2].abs().sum() > 0
    assert layer.lora_B.grad[gid == 2].abs().sum() > 0  # the binary rows pass the gradient to the latent weight


def test_binary_descriptor_round_trip_and_conv_layer():
    q = BinaryQuantizer(learnable=True, channel_mask=torch.tensor([True, False]))
    d = weight_quantizer_desc(q)
    assert d == {"format": "binary", "bits": 1, "granularity": "channel", "learnable": True, "masked": True}
    r = weight_quantizer_from_desc(d, torch.tensor([True, False]))
    assert isinstance(r, BinaryQuantizer) and r.learnable
    conv = nn.Conv2d(3, 4, 3)
    layer = QuantConv2d.from_float(conv, [BinaryQuantizer()])
    assert layer.w_bits == 1.0
    np.testing.assert_allclose(layer.quantized_weight().double().numpy(), _reference(conv.weight.detach().numpy()),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="AdaRound|IntQuantizer or FPQuantizer"):
        layer.use_adaround()  # AdaRound has no binary grid


def test_one_bit_is_not_accepted_elsewhere():
    from pipeline.quant.act import StaticActQuantizer

    with pytest.raises(ValueError, match="integer quantization"):
        check_int_bits(1)
    with pytest.raises(ValueError):
        IntQuantizer(1)
    with pytest.raises(ValueError):
        StaticActQuantizer(1)
    from pipeline.quant.surgery import LayerQuant

    with pytest.raises(ValueError, match=r"LayerQuant\.w_bits: bits out of range"):
        LayerQuant(w_bits=1)
    with pytest.raises(ValueError, match=r"LayerQuant\.a_bits: bits out of range"):
        LayerQuant(w_bits=4, a_bits=1)
    with pytest.raises(ConfigError, match="unsupported bit setting 'W1A4'"):
        parse_setting("W1A4")
    with pytest.raises(ConfigError, match="unsupported bit setting"):
        parse_setting("W4A1")
