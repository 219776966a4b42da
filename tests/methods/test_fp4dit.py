"""FP4DiT: FP group weights, formats per layer pattern, scale-aware FP AdaRound, online per-token FP
activations, exclusions, variants, and a plain (real-checkpoint style) PixArt directory."""
import copy

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline.calibration import CalibrationSet
from pipeline.config import BackboneModel, ConfigError, from_dict, parse_setting
from pipeline.methods import MethodContext, get_family
from pipeline.methods.fp4dit import (FP4DiTConfig, attach_caption_embeddings, format_at_width, fp4dit_spec,
                                     parse_format)
from pipeline.quant.act import OnlineTokenActQuantizer, StaticActQuantizer
from pipeline.quant.adaround import AdaRoundWeight, rectified_sigmoid
from pipeline.quant.layers import QuantLinear
from pipeline.quant.primitives import FPQuantizer, IntQuantizer, fp_quantize
from pipeline.quant.surgery import quant_attention, quant_layers, quantize_model

W4A6, W4A8 = parse_setting("W4A6"), parse_setting("W4A8")
ARCH = {"layers": 2, "head_dim": 16, "caption_length": 3}  # knobs of the conftest tiny_backbone fixture


def tiny_calib(n=48, num_classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CalibrationSet(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
                          torch.randint(0, num_classes, (n,), generator=g), torch.zeros(n, dtype=torch.long),
                          [999, 666, 333, 0])


def options(**kw):
    base = {"recon": {"iters": 6, "batch_size": 8}}
    base.update(kw)
    return from_dict(FP4DiTConfig, base, "fp4dit")


def run_method(name, backbone, setting=W4A6, calib=None, **kw):
    fam = get_family("fp4dit")
    return fam.quantize(backbone, calib or tiny_calib(), setting, fam.config_for(name, options(**kw)),
                        MethodContext(device="cpu"))


def _grid_check(layer):
    """Every weight of the layer is a point of its FP quantizer's grid (re-quantizing is the identity)."""
    q = layer.weight_quantizers[0]
    w = layer.quantized_weight().detach()
    wv, _, maxval, _ = q.grid_params(w)
    return torch.equal(fp_quantize(wv, maxval, q.exp_bits, q.man_bits), wv)


# ---------------------------------------------------------------------------------------------
# FP group weights and formats
# ---------------------------------------------------------------------------------------------
def test_group128_weights_match_the_core_quantizer_per_group_and_ml_dtypes():
    torch.manual_seed(3)
    lin = nn.Linear(300, 6)  # groups of 128, 128 and 44 per row
    model = nn.Sequential(lin)
    quantize_model(model, fp4dit_spec(W4A6, options(exclude=[])))
    layer = model[0]
    assert isinstance(layer, QuantLinear)
    w = lin.weight.detach()
    got = layer.quantized_weight().detach()
    e2m1 = ml_dtypes.float4_e2m1fn
    for r in range(6):
        for start in (0, 128, 256):
            chunk = w[r, start:start + 128]
            ref_q = FPQuantizer(2, 1, granularity="tensor")
            ref_q.calibrate(chunk)
            assert torch.equal(got[r, start:start + 128], ref_q(chunk))
            # independent grid: E2M1 (max 6) scaled so that the group's absmax maps to 6
            amax = chunk.abs().max().double()
            ref = (chunk.double() * 6.0 / amax).numpy().astype(e2m1).astype(np.float64) * float(amax) / 6.0
            assert np.allclose(got[r, start:start + 128].double().numpy(), ref, rtol=0, atol=1e-6 * float(amax))
    assert layer.weight_quantizers[0].maxval.shape == (6, 3)


def test_rows_shorter_than_a_group_use_one_clipping_value_per_row():
    lin = nn.Linear(32, 4)
    model = nn.Sequential(lin)
    quantize_model(model, fp4dit_spec(W4A8, options(exclude=[])))
    q = model[0].weight_quantizers[0]
    assert q.maxval.shape == (4, 1)
    assert torch.equal(q.maxval.reshape(-1), lin.weight.detach().abs().amax(dim=1))


def test_e3m0_only_for_the_first_ffn_linear_and_exclusions_stay_fp(tiny_backbone):
    bb = tiny_backbone("dit", **ARCH)
    quantize_model(bb.net, fp4dit_spec(W4A6, options()))
    names = dict(quant_layers(bb.net))
    assert names, "nothing was quantized"
    for name, layer in names.items():
        q = layer.weight_quantizers[0]
        fmt = (q.exp_bits, q.man_bits)
        assert fmt == ((3, 0) if name.endswith("ff.net.0.proj") else (2, 1)), name
        assert q.granularity == "group" and q.group_size == 128
    assert sum(n.endswith("ff.net.0.proj") for n in names) == 2
    for excluded in ("pos_embed.proj", "proj_out_1", "proj_out_2"):
        assert isinstance(bb.net.get_submodule(excluded), (nn.Linear, nn.Conv2d)), excluded
    for quantized in ("transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"):
        assert quantized in names, quantized
    # the FFN ablation and a PixArt-Σ style default format
    bb2 = tiny_backbone("dit", **ARCH)
    quantize_model(bb2.net, fp4dit_spec(W4A6, options(ffn1=False)))
    assert {(l.weight_quantizers[0].exp_bits, l.weight_quantizers[0].man_bits) for _, l in quant_layers(bb2.net)} \
        == {(2, 1)}
    bb3 = tiny_backbone("pixart", **ARCH)
    quantize_model(bb3.net, fp4dit_spec(W4A6, options(weight_format="E1M2")))
    fmts = {n: (l.weight_quantizers[0].exp_bits, l.weight_quantizers[0].man_bits) for n, l in quant_layers(bb3.net)}
    assert fmts and all(f == ((3, 0) if n.endswith("ff.net.0.proj") else (1, 2)) for n, f in fmts.items())
    assert not any(n.startswith(("pos_embed", "proj_out")) for n in fmts)
    assert any(n.startswith("adaln_single") for n in fmts)  # official PixArt: adaLN-single quantized


def test_formats_options_and_errors_name_the_key():
    assert parse_format("e2m1", "k") == (2, 1)
    assert format_at_width("E2M1", 4, "k") == (2, 1) and format_at_width("E2M1", 8, "k") is None
    # a sweep to W8A8 uses the core's default 8-bit split everywhere (the FFN-1 E3M0 is a 4-bit choice)
    spec = fp4dit_spec(parse_setting("W8A8"), options())
    assert (spec.default.w_exp_bits, spec.default.w_man_bits) == (4, 3)
    assert (spec.default.a_exp_bits, spec.default.a_man_bits) == (3, 4)
    assert all(r[1] == {"skip": True} for r in spec.rules)
    with pytest.raises(ConfigError, match=r"fp4dit\.weight_format"):
        options(weight_format="FP4")
    with pytest.raises(ConfigError, match=r"fp4dit\.ffn1_format.*exponent"):
        options(ffn1_format="E0M3")
    with pytest.raises(ConfigError, match=r"fp4dit\.softmax_bits"):
        options(softmax_bits=2)
    with pytest.raises(ConfigError, match=r"fp4dit\.recon\.itres: unknown key"):
        options(recon={"itres": 3})


def test_activation_formats_softmax_bits_and_int_variant_spec(tiny_backbone):
    spec6 = fp4dit_spec(W4A6, options())
    assert (spec6.default.a_exp_bits, spec6.default.a_man_bits, spec6.default.a_mode) == (2, 3, "token")
    spec8 = fp4dit_spec(W4A8, options())
    assert (spec8.default.a_exp_bits, spec8.default.a_man_bits) == (3, 4)
    bb = tiny_backbone("dit", **ARCH)
    quantize_model(bb.net, spec6)
    lin = bb.net.transformer_blocks[0].attn1.to_q
    assert isinstance(lin.act_quantizer, OnlineTokenActQuantizer) and lin.act_quantizer.fmt == "fp"
    procs = list(quant_attention(bb.net))
    assert len(procs) == 2
    p = procs[0][1].p_quantizer
    assert not p.signed and p.bits == 16 and (p.exp_bits, p.man_bits) == (13, 3)  # official sm_abit 16
    # softmax bits as their own parameter (the official default is 16)
    res = run_method("fp4dit_no_adaround", tiny_backbone("dit", **ARCH), softmax_bits=16)
    for _, proc in quant_attention(res.backbone.net):
        assert proc.p_quantizer.bits == 16 and not proc.p_quantizer.signed
        assert proc.q_quantizer.bits == 6
    # INT baseline: same group size, INT weights, INT per-token activations
    spec_int = fp4dit_spec(W4A6, options(grid="int"))
    d = spec_int.default
    assert (d.w_format, d.w_granularity, d.group_size, d.a_format, d.a_mode) == ("int", "group", 128, "int", "token")
    assert spec_int.rules == [r for r in spec6.rules if r[1] == {"skip": True}]


def test_fp_kept_share_and_softmax_split_follow_the_official_code():
    from pipeline import models
    from pipeline.config import DiTArch
    from pipeline.methods.fp4dit import LEGACY_EXCLUDE, fp_kept_share

    bb = models.build_backbone("dit", BackboneModel(dit=DiTArch(num_layers=4)), 8, 1, 10, seed=0)
    before = fp_kept_share(bb.net, fp4dit_spec(W4A6, options(exclude=list(LEGACY_EXCLUDE))))
    after = fp_kept_share(bb.net, fp4dit_spec(W4A6, options()))
    assert round(before["share"], 3) == 0.442 and round(after["share"], 3) == 0.024
    assert after["layers"] == ["pos_embed.proj", "proj_out_1", "proj_out_2"]
    for s, split in (("W4A4", (15, 1)), ("W4A6", (13, 3)), ("W4A8", (12, 4))):
        assert fp4dit_spec(parse_setting(s), options()).default.p_split() == split
    assert fp4dit_spec(W4A6, options(softmax_bits=None)).default.p_split() == (3, 3)  # sign bit -> exponent
    assert fp4dit_spec(W4A6, options(grid="int")).default.p_format == "none"


def test_online_token_scale_comes_from_each_token(tiny_backbone):
    bb = tiny_backbone("dit", **ARCH)
    quantize_model(bb.net, fp4dit_spec(W4A6, options()))
    aq = bb.net.transformer_blocks[0].attn1.to_q.act_quantizer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 64, generator=g)
    x[0, 0] *= 1e-3
    x[0, 1] *= 1e3
    xq = aq(x)
    rel = (xq - x).norm(dim=-1) / x.norm(dim=-1)
    assert (rel < 0.08).all(), rel  # E2M3: ~2^-4 relative step on normal numbers, for both tokens
    # a single clipping value for the whole tensor would wipe out the small token
    flat = fp_quantize(x, x.abs().max(), 2, 3)
    assert (flat[0, 0] - x[0, 0]).norm() / x[0, 0].norm() > 0.9
    # no state: nothing calibrated, the same token gives the same result in any company
    assert torch.equal(aq(x[:, :1]), xq[:, :1])


# ---------------------------------------------------------------------------------------------
# scale-aware FP AdaRound
# ---------------------------------------------------------------------------------------------
def test_fp_adaround_starts_at_the_fp_floor_plus_remainder_and_hardens_onto_the_grid():
    torch.manual_seed(0)
    w = torch.randn(8, 200) * 0.05
    q = FPQuantizer(2, 1, granularity="group", group_size=128)
    q.calibrate(w)
    ada = AdaRoundWeight(q, w)
    soft = ada().detach()
    assert torch.allclose(soft, w, atol=1e-6)  # s·(⌊w/s⌋ + h) with h = frac(w/s): the weight itself
    h = rectified_sigmoid(ada.V / ada.step)
    wv, _, maxval, _ = q.grid_params(w)
    frac = wv / ada.step - torch.floor(wv / ada.step)
    assert torch.allclose(h[ada.valid], frac[ada.valid], atol=1e-4)
    assert not torch.equal(soft, q(w))  # not the round-to-nearest value
    ada.harden()
    hard = ada().detach()
    hv, _, _, _ = q.grid_params(hard)
    assert torch.equal(fp_quantize(hv, maxval, 2, 1), hv)
    # with the initial logits, hard rounding rounds each weight to its nearer neighbour (RTN, up to ties)
    assert (hard != q(w)).float().mean() < 0.01


def test_fp_reconstruction_lowers_output_error_on_a_random_layer():
    from pipeline.train.recon import ReconConfig, output_error, reconstruct_model

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.net = nn.Sequential(nn.Linear(96, 32))
            nn.init.normal_(self.net[0].weight, std=0.05)  # bell-shaped, like trained weights

        def forward(self, x):
            return self.net(x)

    fp = One().eval()
    qm = copy.deepcopy(fp)
    quantize_model(qm.net, fp4dit_spec(parse_setting("W4A16"), options(exclude=[])))
    rtn = copy.deepcopy(qm)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 96, generator=g) * torch.exp(torch.randn(96, generator=g))
    res = reconstruct_model(qm, fp, [x], ReconConfig(iters=150, batch_size=32, lr=3e-3, error_inputs=256))
    unit = res["units"]["0"]
    assert unit["error_recon"] < 0.95 * unit["error_rtn"]
    with torch.no_grad():
        assert output_error(qm(x), fp(x)) < output_error(rtn(x), fp(x))
    assert _grid_check(qm.net[0])


def test_fp4dit_end_to_end_on_a_tiny_dit_saves_packed_weights_on_the_grid(tiny_backbone, tmp_path):
    from pipeline.quant.packing import load_quantized, save_quantized

    bb = tiny_backbone("dit", **ARCH)
    fp_copy = copy.deepcopy(bb)
    res = run_method("fp4dit", bb, W4A8)
    info = res.info
    assert info["recon_units"] == 2 and info["recon_inputs"] == 48
    assert info["weight_formats"] == {"E2M1": 16, "E3M0": 2} and info["n_quant_attention"] == 2
    for name, layer in quant_layers(res.backbone.net):
        assert layer.adaround is not None and all(bool(a.hardened) for a in layer.adaround), name
        assert _grid_check(layer), name
        assert layer.weight_quant and layer.act_quant
    save_quantized(res.backbone.net, res.spec, tmp_path / "q")
    fp_copy.net = load_quantized(fp_copy.net, tmp_path / "q")
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 900]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        assert torch.equal(fp_copy(x, t, y), res.backbone(x, t, y))


def test_static_activation_variant_calibrates_fp_per_tensor_scales(tiny_backbone):
    res = run_method("fp4dit_static_act", tiny_backbone("dit", **ARCH))
    layer = res.backbone.net.transformer_blocks[0].ff.net[2]
    aq = layer.act_quantizer
    assert isinstance(aq, StaticActQuantizer) and aq.fmt == "fp" and aq.quantizer.maxval.numel() == 1
    assert aq.quantizer.maxval.item() > 0
    p = next(iter(quant_attention(res.backbone.net)))[1].p_quantizer
    assert isinstance(p, StaticActQuantizer) and not p.signed


def test_int_adaround_variant_uses_int_group_weights_and_int_token_activations(tiny_backbone):
    res = run_method("int_adaround", tiny_backbone("dit", **ARCH))
    for name, layer in quant_layers(res.backbone.net):
        q = layer.weight_quantizers[0]
        assert isinstance(q, IntQuantizer) and q.granularity == "group" and q.bits == 4, name
        assert isinstance(layer.act_quantizer, OnlineTokenActQuantizer) and layer.act_quantizer.fmt == "int"
        assert all(bool(a.hardened) for a in layer.adaround)
    assert res.info["weight_formats"] == {"INT4": 18}


def test_registry_and_unsupported_backbone():
    fam = get_family("fp4dit")
    assert fam.config_cls is FP4DiTConfig and set(fam.backbones) == {"dit", "pixart"}
    from pipeline.methods.fp4dit import CROSS_NAMES

    assert len(CROSS_NAMES) == 12 and CROSS_NAMES[0] == "fp4dit"
    assert fam.variant_names[:12] == list(CROSS_NAMES)
    assert fam.variant("int_adaround").overrides == fam.variant("int-asym_tok_ada").overrides
    from pipeline import models

    unet = models.build_backbone("unet", BackboneModel(), 8, 1, 10)
    with pytest.raises(ValueError, match="backbone.kind"):
        run_method("fp4dit", unet)


def test_plain_pixart_directory_with_caption_embeddings(tiny_backbone, tmp_path):
    """A PixArt saved as a plain diffusers directory (as a real PixArt-α/Σ transformer would be),
    conditioned by a caption-embedding file (one [L, C] sequence per class + the null caption)."""
    from pipeline import models

    src = tiny_backbone("pixart", **ARCH)
    src.net.save_pretrained(str(tmp_path / "pixart"))
    bb = models.load_backbone(tmp_path / "pixart")
    assert bb.kind == "pixart" and bb.caption_table is None
    emb = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(4))  # 4 classes + null
    attach_caption_embeddings(bb, emb)
    assert bb.num_classes == 4
    assert torch.equal(bb.caption_embeddings(torch.tensor([2])), emb[2:3])
    with torch.no_grad():
        x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 700])
        ref = bb.net(x, encoder_hidden_states=emb[[1, 3]], timestep=t,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample[:, :1]
        assert torch.equal(bb(x, t, torch.tensor([1, 3])), ref)
    with pytest.raises(ValueError, match="embeddings"):
        attach_caption_embeddings(bb, torch.randn(5, 8))
    res = run_method("fp4dit", bb, W4A8, calib=tiny_calib(num_classes=4))
    assert res.info["recon_units"] == 7  # 2 blocks + adaln_single (3) + caption_projection (2) layers
    names = [n for n, _ in quant_layers(res.backbone.net)]
    assert any(n.endswith("attn2.to_k") for n in names)  # cross-attention to the captions is quantized
    assert not any(n.startswith(("proj_out", "pos_embed")) for n in names)
    assert all(_grid_check(layer) for _, layer in quant_layers(res.backbone.net))


@pytest.mark.parametrize("setting", [W4A6, W4A8])
def test_sampling_with_the_fp_inference_fast_path_is_bit_identical(tiny_backbone, setting, monkeypatch):
    """DDIM samples of an FP4DiT-quantized tiny DiT (E2M1/E3M0 group weights, online per-token FP
    activations, Q/K/V and unsigned 16-bit P) are the same bit for bit with and without the no-autograd
    FP fast path (pipeline.quant.primitives._fp_quantize_inference / fp_quantize_token)."""
    from pipeline.config import DiffusionConfig, SamplingConfig
    from pipeline.quant import primitives
    from pipeline.quant.primitives import reference_fp_path
    from pipeline.quant.surgery import quant_state
    from pipeline.sampling import eval_labels, initial_noise, sample

    bb = tiny_backbone("dit", **ARCH)
    quantize_model(bb.net, fp4dit_spec(setting, FP4DiTConfig()))
    quant_state(bb.net, weight=True, act=True)
    noise, labels = initial_noise(6, (1, 8, 8), 3), eval_labels(6, 10)
    diff, samp = DiffusionConfig(), SamplingConfig(steps=4)
    calls = []
    step_ = primitives._fp_step_
    monkeypatch.setattr(primitives, "_fp_step_", lambda *a: calls.append(a[2]) or step_(*a))
    fast = sample(bb, noise, labels, diff, samp)
    assert len(calls) > 0 and max(calls) > 7  # the fast path ran, for P (E12/E13) too
    n_fast = len(calls)
    with reference_fp_path():
        ref = sample(bb, noise, labels, diff, samp)
    assert len(calls) == n_fast
    assert torch.isfinite(ref).all() and not torch.equal(ref, noise)
    assert torch.equal(fast, ref)
