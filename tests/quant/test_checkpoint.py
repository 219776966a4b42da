"""Generic unpacked student checkpoint (pipeline.quant.checkpoint): save_student -> load_student gives the
identical forward for any spec-driven model (INT / FP weights, masked groups, residual, in_scale, LoRA,
AdaRound, timestep / static / per-token activations, spec-built attention quantizers)."""
import copy

import pytest
import torch

from pipeline.quant.checkpoint import CHECKPOINT_FILE, STRUCTURE_FILE, load_student, save_student
from pipeline.quant.primitives import BinaryResidual, IntQuantizer
from pipeline.quant.surgery import (LayerQuant, QuantSpec, calibrate_activations, default_rules, model_timesteps,
                                    quant_attention, quant_layers, quantize_model)

TIMESTEPS = [999, 666, 333, 0]


def _inputs(n=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.tensor(TIMESTEPS[:n]), torch.arange(n) % 10


def _run(model, x, t, y):
    return model(x, timestep=t, class_labels=y).sample


def _calibrate(model):
    x, t, y = _inputs()
    calibrate_activations(model, lambda: _run(model, x, t, y))


def _round_trip(diffusers_model, model, spec, tmp_path, meta=None):
    save_student(model, spec, tmp_path / "ckpt", meta)
    rebuilt, spec2, meta2 = load_student(diffusers_model("dit", layers=1), tmp_path / "ckpt")
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(_run(rebuilt, x, t, y), _run(model, x, t, y))
    assert spec2.to_dict() == spec.to_dict()
    return rebuilt, meta2


def test_int_timestep_student_with_mixed_groups_residual_in_scale_and_lora(diffusers_model, tmp_path):
    spec = QuantSpec(default=LayerQuant(w_bits=4, w_learnable=True, a_bits=8, a_mode="timestep", a_learnable=True,
                                        attn_bits=8, attn_p_bits=6), rules=default_rules(8))
    model = diffusers_model("dit", layers=1)
    quantize_model(model, spec, timesteps=TIMESTEPS)
    _calibrate(model)
    torch.manual_seed(1)
    for name, layer in quant_layers(model):
        if layer.weight.dim() != 2 or "transformer_blocks" not in name:
            continue
        c = layer.num_out_channels
        top = torch.zeros(c, dtype=torch.bool)
        top[: c // 4] = True
        qs = [IntQuantizer(5, channel_mask=top, learnable=True), IntQuantizer(4, channel_mask=~top, learnable=True)]
        layer.set_in_scale(torch.rand(layer.weight.shape[1]) + 0.5)
        layer.set_weight_quantizers(qs, BinaryResidual(c, top))
        layer.add_lora(2)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.01)
    rebuilt, meta = _round_trip(diffusers_model, model, spec, tmp_path, {"family": "test"})
    assert meta == {"family": "test"}
    assert model_timesteps(rebuilt) == TIMESTEPS
    procs = [p for _, p in quant_attention(rebuilt)]
    assert procs and all(p.p_quantizer.bits == 6 and p.q_quantizer.bits == 8 for p in procs)
    layers = dict(quant_layers(rebuilt))
    assert any(l.lora_rank == 2 and l.residual is not None and len(l.weight_quantizers) == 2 for l in layers.values())


@pytest.mark.parametrize("hard", [False, True])
def test_fp_static_student_with_adaround(diffusers_model, tmp_path, hard):
    spec = QuantSpec(default=LayerQuant(w_bits=4, w_format="fp", w_granularity="group", group_size=16, a_bits=8,
                                        a_format="fp", a_mode="static", attn_bits=8, attn_p_bits=12),
                     rules=[("*emb*", {"skip": True}), ("proj_out*", {"skip": True})])
    model = diffusers_model("dit", layers=1)
    quantize_model(model, spec)
    _calibrate(model)
    torch.manual_seed(2)
    for _, layer in quant_layers(model):
        for a in layer.use_adaround():
            with torch.no_grad():
                a.V.add_(torch.randn_like(a.V) * 0.05)
        if hard:
            layer.harden_adaround()
    rebuilt, _ = _round_trip(diffusers_model, model, spec, tmp_path)
    assert all(l.adaround is not None for _, l in quant_layers(rebuilt))
    rounding = [a for _, l in quant_layers(rebuilt) for a in l.adaround]
    assert all(bool(a.hardened) == hard and a.V.requires_grad != hard for a in rounding)


def test_checkpoint_errors(diffusers_model, tmp_path):
    from pipeline.quant.packing import load_quantized, save_quantized

    spec = QuantSpec(default=LayerQuant(w_bits=8))
    with pytest.raises(FileNotFoundError, match="save_student"):
        load_student(diffusers_model("dit", layers=1), tmp_path / "nothing")
    model = diffusers_model("dit", layers=1)
    quantize_model(model, spec)
    with pytest.raises(TypeError, match="QuantSpec"):
        save_student(model, spec.to_dict(), tmp_path / "x")
    save_quantized(model, spec, tmp_path / "packed")
    packed = load_quantized(diffusers_model("dit", layers=1), tmp_path / "packed")
    with pytest.raises(ValueError, match="save_quantized"):
        save_student(packed, spec, tmp_path / "y")
    save_student(model, spec, tmp_path / "ok")
    assert (tmp_path / "ok" / CHECKPOINT_FILE).is_file() and (tmp_path / "ok" / STRUCTURE_FILE).is_file()
    with pytest.raises(ValueError, match="does not exist in the model|does not fit"):
        from diffusers import DiTTransformer2DModel

        other = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                      num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                      norm_num_groups=8).eval()
        load_student(copy.deepcopy(other), tmp_path / "ok")
