"""The no-grad cache of a wrapped layer's quantized weight never serves a stale weight."""
import torch
import torch.nn as nn

from pipeline.quant.surgery import LayerQuant, QuantSpec, quantize_model


def _layer():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 8))
    quantize_model(m, QuantSpec(default=LayerQuant(w_bits=4)))
    return m[0]


def test_cache_matches_fresh_computation_and_follows_updates():
    layer = _layer()
    with torch.no_grad():
        first = layer.quantized_weight()
        assert layer.quantized_weight() is first  # served from the cache
        assert torch.equal(first, layer.compute_quantized_weight())
        layer.weight.mul_(2.0)  # in-place update (like an optimizer step) bumps the version
        layer.calibrate_weight()
        second = layer.quantized_weight()
        assert not torch.equal(first, second)
        assert torch.equal(second, layer.compute_quantized_weight())
        layer.weight_quantizers[0].bits = 2  # a bit-width change invalidates too
        third = layer.quantized_weight()
        assert torch.equal(third, layer.compute_quantized_weight())
        assert not torch.equal(third, second)


def test_no_cache_with_autograd():
    layer = _layer()
    layer.weight.requires_grad_(True)
    w = layer.quantized_weight()
    assert w.requires_grad and getattr(layer, "_wq_cache", None) is None
