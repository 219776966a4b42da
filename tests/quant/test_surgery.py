"""Spec rules, resolution and whole-model surgery on tiny diffusers UNet / DiT / PixArt models."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from pipeline.quant.attention import QuantAttnProcessor
from pipeline.quant.layers import QuantConv2d, QuantLinear
from pipeline.quant.surgery import (LayerQuant, QuantSpec, calibrate_activations, default_rules, quant_attention,
                                    quant_layers, quant_state, quantize_model, resolve_model)


# ---------------------------------------------------------------------------------------------
# tiny models (built from config, never from a hub)
# ---------------------------------------------------------------------------------------------
_CAPTIONS = torch.randn(4, 3, 12, generator=torch.Generator().manual_seed(1))


def run_model(kind, model, x, t, labels=None):
    labels = torch.arange(x.shape[0]) % 10 if labels is None else labels
    if kind == "unet":
        return model(x, t, class_labels=labels).sample
    if kind == "dit":
        return model(x, timestep=t, class_labels=labels).sample
    return model(x, encoder_hidden_states=_CAPTIONS[: x.shape[0]], timestep=t,
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


# Relative L2 error bounds at W8A8 (+ 8-bit attention matmuls, static per-tensor activations).
# The random-init UNet amplifies input perturbations ~7x (quantizing only conv_in's input already costs
# ~5 %), so its bound is wider than the transformers' (~1.3 % measured for both).
W8A8_TOL = {"unet": 0.08, "dit": 0.04, "pixart": 0.04}


def _quantized_copy(kind, fp, w_bits, a_bits=8, attn_bits=8, **kw):
    model = copy.deepcopy(fp)
    spec = QuantSpec(LayerQuant(w_bits=w_bits, a_bits=a_bits, attn_bits=attn_bits, **kw), rules=default_rules(8))
    resolved = quantize_model(model, spec)
    gen = torch.Generator().manual_seed(123)
    calib = [(torch.randn(4, 1, 8, 8, generator=gen), torch.randint(0, 1000, (4,), generator=gen)) for _ in range(3)]
    calibrate_activations(model, lambda: [run_model(kind, model, x, t) for x, t in calib])
    return model, resolved


@pytest.mark.parametrize("kind", ["unet", "dit", "pixart"])
def test_w8a8_close_to_fp_and_exact_when_off(diffusers_model, kind):
    fp = diffusers_model(kind)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    t = torch.tensor([10, 400, 999, 3])
    with torch.no_grad():
        ref = run_model(kind, fp, x, t)
        model, resolved = _quantized_copy(kind, fp, 8)
        n_fp_layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in fp.modules())
        wrapped = list(quant_layers(model))
        assert len(wrapped) == n_fp_layers  # every Linear/Conv2d is wrapped
        assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in model.modules())
        assert len(list(quant_attention(model))) == sum(hasattr(m, "set_processor") for m in fp.modules())
        out8 = run_model(kind, model, x, t)
        rel8 = ((out8 - ref).norm() / ref.norm()).item()
        assert 0 < rel8 < W8A8_TOL[kind], rel8
        quant_state(model, False, False)
        assert torch.equal(run_model(kind, model, x, t), ref)
        quant_state(model, True, True)
        assert torch.equal(run_model(kind, model, x, t), out8)

        # monotone in weight bits on the same model (activations stay 8-bit)
        model4, _ = _quantized_copy(kind, fp, 4)
        rel4 = ((run_model(kind, model4, x, t) - ref).norm() / ref.norm()).item()
        assert rel4 > rel8


def test_weight_error_monotone_in_bits_unet(diffusers_model):
    fp = diffusers_model("unet")
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([50, 700])
    with torch.no_grad():
        ref = run_model("unet", fp, x, t)
        errs = []
        for bits in (8, 6, 4, 3):
            model = copy.deepcopy(fp)
            quantize_model(model, QuantSpec(LayerQuant(w_bits=bits)))
            errs.append(((run_model("unet", model, x, t) - ref).norm() / ref.norm()).item())
    assert errs == sorted(errs), errs


def test_timestep_mode_installs_context_and_gathers_per_sample(diffusers_model):
    fp = diffusers_model("dit")
    ts = [999, 500, 10]
    model = copy.deepcopy(fp)
    spec = QuantSpec(LayerQuant(w_bits=8, a_bits=8, a_mode="timestep", attn_bits=8))
    with pytest.raises(ValueError, match="timesteps"):
        quantize_model(copy.deepcopy(fp), spec)
    quantize_model(model, spec, timesteps=ts)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(ts)
    with torch.no_grad():
        calibrate_activations(model, lambda: run_model("dit", model, x, t))
        both = run_model("dit", model, x, t)
        # a sample's output does not depend on which timesteps share its batch
        labels = torch.arange(3)
        single = torch.cat([run_model("dit", model, x[i:i + 1], t[i:i + 1], labels[i:i + 1]) for i in range(3)])
        ref = run_model("dit", fp, x, t)
    assert torch.allclose(both, single, atol=1e-5)
    assert ((both - ref).norm() / ref.norm()) < 0.05
    layer = dict(quant_layers(model))["transformer_blocks.0.attn1.to_q"]
    assert type(layer.act_quantizer).__name__ == "TimestepActQuantizer"


def test_token_mode_and_fp_format(diffusers_model):
    fp = diffusers_model("pixart")
    model = copy.deepcopy(fp)
    spec = QuantSpec(LayerQuant(w_bits=4, w_format="fp", w_granularity="group", group_size=128, a_bits=8,
                                a_format="fp", a_mode="token", attn_bits=8), rules=default_rules(8))
    quantize_model(model, spec)
    layers = dict(quant_layers(model))
    q = layers["transformer_blocks.0.ff.net.0.proj"]
    assert type(q.weight_quantizers[0]).__name__ == "FPQuantizer" and q.w_bits == 4
    assert type(q.act_quantizer).__name__ == "OnlineTokenActQuantizer"
    proc = dict(quant_attention(model))["transformer_blocks.0.attn1"]
    assert isinstance(proc, QuantAttnProcessor)
    assert proc.p_quantizer.signed is False and proc.q_quantizer.signed is True
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([3, 900])
    with torch.no_grad():
        ref = run_model("pixart", fp, x, t)
        out = run_model("pixart", model, x, t)  # no calibration needed
    assert 0 < ((out - ref).norm() / ref.norm()) < 0.2


# ---------------------------------------------------------------------------------------------
# spec rules
# ---------------------------------------------------------------------------------------------
class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3)
        self.time_emb = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)) for _ in range(2)])
        self.head = nn.Linear(4, 2)


def test_rule_resolution_glob_regex_first_last_skip():
    spec = QuantSpec(LayerQuant(w_bits=4), rules=[
        ("blocks.*", {"w_bits": 6}),
        ("re:blocks\\.1\\.\\d", {"w_bits": 3, "a_bits": 8}),
        ("blocks.0.2", {"skip": True}),
        ("@first", {"w_bits": 8}),
        ("@last", {"skip": True}),
        ("*emb*", {"w_bits": 5}),
        ("blocks.1.2", {"w_bits": 2}),  # later rule wins over the regex for w_bits, keeps its a_bits
    ])
    r = resolve_model(Toy(), spec)
    assert r["stem"].w_bits == 8
    assert r["time_emb"].w_bits == 5
    assert r["blocks.0.0"].w_bits == 6 and r["blocks.0.0"].a_bits is None
    assert r["blocks.0.2"] is None
    assert r["blocks.1.0"].w_bits == 3 and r["blocks.1.0"].a_bits == 8
    assert r["blocks.1.2"].w_bits == 2 and r["blocks.1.2"].a_bits == 8
    assert r["head"] is None
    # regex must match the whole name
    assert spec.resolve("xblocks.1.0").w_bits == 4
    # @first/@last only match with the names given
    assert spec.resolve("stem").w_bits == 4
    model = Toy()
    done = quantize_model(model, spec)
    assert set(done) == {"stem", "time_emb", "blocks.0.0", "blocks.1.0", "blocks.1.2"}
    assert isinstance(model.stem, QuantConv2d) and isinstance(model.blocks[1][2], QuantLinear)
    assert type(model.head) is nn.Linear and type(model.blocks[0][2]) is nn.Linear
    # skip can be undone by a later rule
    spec2 = QuantSpec(LayerQuant(w_bits=4), rules=[("*", {"skip": True}), ("head", {"skip": False})])
    assert spec2.resolve("head").w_bits == 4 and spec2.resolve("stem") is None


def test_spec_json_roundtrip_and_fp_split_rederived():
    spec = QuantSpec(LayerQuant(w_bits=4, w_format="fp", a_bits=6, a_format="fp", a_mode="token"),
                     rules=default_rules(8) + [("re:.*ff\\.net\\.0.*", {"w_exp_bits": 3, "w_man_bits": 0})])
    assert spec.default.w_exp_bits == 2 and spec.default.w_man_bits == 1  # E2M1
    assert spec.default.a_exp_bits == 2 and spec.default.a_man_bits == 3  # E2M3
    back = QuantSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec
    assert back.resolve("blocks.0.ff.net.0.proj").w_man_bits == 0
    fp8 = QuantSpec(LayerQuant(w_bits=4, w_format="fp"), rules=[("x", {"w_bits": 8})]).resolve("x")
    assert (fp8.w_exp_bits, fp8.w_man_bits) == (4, 3)


def test_default_rules_keep_first_last_embeddings_at_8_bits(diffusers_model):
    spec = QuantSpec(LayerQuant(w_bits=4, a_bits=8), rules=default_rules(8))
    r = resolve_model(diffusers_model("unet"), spec)
    for name in ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2",
                 "down_blocks.0.resnets.0.time_emb_proj"):
        assert r[name].w_bits == 8, name
    assert r["down_blocks.0.resnets.0.conv1"].w_bits == 4
    assert r["mid_block.attentions.0.to_q"].w_bits == 4
    rp = resolve_model(diffusers_model("pixart"), spec)
    for name in ("pos_embed.proj", "proj_out", "adaln_single.emb.timestep_embedder.linear_1",
                 "caption_projection.linear_2"):
        assert rp[name].w_bits == 8, name
    assert rp["transformer_blocks.0.ff.net.2"].w_bits == 4
    wrapper = nn.Module()
    wrapper.net = diffusers_model("pixart")  # as in DiffusionBackbone: names get a "net." prefix
    rw = resolve_model(wrapper, spec)
    assert rw["net.proj_out"].w_bits == 8 and rw["net.caption_projection.linear_1"].w_bits == 8
    assert rw["net.transformer_blocks.1.attn2.to_out.0"].w_bits == 4
    assert spec.resolve("down_blocks.1.attentions.0.proj_out").w_bits == 4  # inner proj_out stays
    rd = resolve_model(diffusers_model("dit"), QuantSpec(LayerQuant(w_bits=4), rules=default_rules(None)))
    assert rd["pos_embed.proj"] is None and rd["proj_out_2"] is None and rd["proj_out_1"] is None
    assert rd["transformer_blocks.0.attn1.to_k"].w_bits == 4


def test_bad_spec_input_errors():
    with pytest.raises(ValueError, match="unknown key.*'wbits'"):
        QuantSpec(rules=[("*", {"wbits": 4})])
    with pytest.raises(ValueError, match="bits out of range"):
        QuantSpec(rules=[("*", {"w_bits": 9})])
    with pytest.raises(ValueError, match="bits out of range"):
        LayerQuant(w_bits=1)
    with pytest.raises(ValueError, match="a_bits: bits out of range"):
        LayerQuant(a_bits=12)
    with pytest.raises(ValueError, match="w_granularity"):
        LayerQuant(w_granularity="row")
    with pytest.raises(ValueError, match="a_mode"):
        LayerQuant(a_mode="dynamic")
    with pytest.raises(ValueError, match="unknown token"):
        QuantSpec(rules=[("@middle", {"w_bits": 4})])
    with pytest.raises(ValueError, match="invalid regex"):
        QuantSpec(rules=[("re:(", {"w_bits": 4})])
    with pytest.raises(ValueError, match="1 \\+ E \\+ M"):
        LayerQuant(w_bits=4, w_format="fp", w_exp_bits=3, w_man_bits=2)
    with pytest.raises(ValueError, match="timestep"):
        LayerQuant(a_bits=8, a_format="fp", a_mode="timestep")
    with pytest.raises(ValueError, match="unknown key"):
        QuantSpec.from_dict({"default": {}, "rules": [], "extra": 1})
    with pytest.raises(TypeError, match="QuantSpec"):
        quantize_model(Toy(), {"default": {}})
    with pytest.raises(ValueError, match="keep_bits"):
        default_rules(1)


# ---------------------------------------------------------------------------------------------
# the one name-pattern matcher
# ---------------------------------------------------------------------------------------------
def test_matcher_glob_regex_first_last():
    from pipeline.quant.surgery import check_pattern, matches, matches_any

    assert matches("*attn1.to_q", "transformer_blocks.0.attn1.to_q")
    assert not matches("*attn1.to_q", "transformer_blocks.0.attn1.to_k")
    assert matches("*emb*", "time_embedding.linear_1") and not matches("emb*", "time_embedding.linear_1")
    # re: must match the whole name
    assert matches(r"re:([^.]+\.)?proj_out(_\d+)?", "proj_out_2")
    assert matches(r"re:([^.]+\.)?proj_out(_\d+)?", "net.proj_out")
    assert not matches(r"re:([^.]+\.)?proj_out(_\d+)?", "transformer_blocks.0.ff.proj_out")
    assert not matches("re:proj", "proj_out")
    # @first / @last stand for the names given; without them they match nothing
    assert matches("@first", "conv_in", first="conv_in", last="conv_out")
    assert matches("@last", "conv_out", first="conv_in", last="conv_out")
    assert not matches("@first", "conv_out", first="conv_in", last="conv_out")
    assert not matches("@first", "conv_in") and not matches("@last", "conv_in")
    assert matches_any(["x", "re:a\\.\\d+", "@last"], "a.3")
    assert matches_any(["x", "@last"], "y", last="y") and not matches_any([], "y")
    assert check_pattern("re:a+", "here") == "re:a+"
    for bad, msg in (("", "non-empty"), ("@middle", "unknown token"), ("re:(", "invalid regex"), (3, "non-empty")):
        with pytest.raises(ValueError, match=msg):
            check_pattern(bad, "here")


def test_recon_units_and_spec_use_the_same_matcher(diffusers_model):
    """The reconstruction units (pipeline.train.recon) and the spec rules accept the same syntax."""
    from pipeline.train.recon import reconstruction_units

    model = diffusers_model("dit")
    quantize_model(model, QuantSpec(default=LayerQuant(w_bits=8)))
    units = reconstruction_units(model, [r"re:transformer_blocks\.\d+", "pos_embed*"])
    names = [u.name for u in units]
    assert "transformer_blocks.0" in names and "transformer_blocks.1" in names
    with pytest.raises(ValueError, match="block_patterns\\[0\\].*unknown token"):
        reconstruction_units(model, ["@middle"])


# ---------------------------------------------------------------------------------------------
# softmax-probability (P) format fields
# ---------------------------------------------------------------------------------------------
def test_attn_p_fields_build_the_softmax_quantizer(diffusers_model):
    from pipeline.quant.act import OnlineTokenActQuantizer, StaticActQuantizer

    def p_quantizer(**kw):
        model = diffusers_model("dit")
        quantize_model(model, QuantSpec(default=LayerQuant(w_bits=None, **kw)))
        procs = [p for _, p in quant_attention(model)]
        assert procs
        return procs[0].p_quantizer, procs[0].q_quantizer

    # default: P follows attn_bits and the activation format, unsigned (sign bit -> mantissa)
    p, q = p_quantizer(a_bits=6, a_format="fp", a_mode="token", attn_bits=6)
    assert isinstance(p, OnlineTokenActQuantizer) and not p.signed and (p.exp_bits, p.man_bits) == (2, 4)
    assert q.signed and (q.exp_bits, q.man_bits) == (2, 3)
    # own width: table split (8 -> E3M4 -> unsigned E3M5); beyond the table E5 (fp16's exponent)
    p, _ = p_quantizer(a_bits=6, a_format="fp", a_mode="token", attn_bits=6, attn_p_bits=8)
    assert (p.bits, p.exp_bits, p.man_bits) == (8, 3, 5)
    p, _ = p_quantizer(a_bits=6, a_format="fp", a_mode="static", attn_bits=6, attn_p_bits=16)
    assert isinstance(p, StaticActQuantizer) and (p.bits, p.quantizer.exp_bits, p.quantizer.man_bits) == (16, 5, 11)
    # explicit split, other format, kept FP
    p, _ = p_quantizer(a_bits=8, a_format="int", a_mode="token", attn_bits=8, attn_p_format="fp", attn_p_bits=7,
                       attn_p_exp_bits=4, attn_p_man_bits=3)
    assert (p.fmt, p.exp_bits, p.man_bits, p.signed) == ("fp", 4, 3, False)
    p, q = p_quantizer(a_bits=8, a_format="int", a_mode="token", attn_bits=8, attn_p_format="none")
    assert p is None and q is not None
    p, _ = p_quantizer(a_bits=8, a_format="int", a_mode="static", attn_bits=8, attn_p_bits=4)
    assert isinstance(p, StaticActQuantizer) and p.fmt == "int" and p.bits == 4 and not p.symmetric


def test_attn_p_fields_validation_and_json():
    with pytest.raises(ValueError, match="attn_p_format"):
        LayerQuant(attn_bits=8, a_bits=8, attn_p_format="bf16")
    with pytest.raises(ValueError, match="attn_p_bits"):
        LayerQuant(attn_bits=8, a_bits=8, attn_p_bits=12)  # int P: 2..8
    with pytest.raises(ValueError, match="no meaning"):
        LayerQuant(attn_bits=8, a_bits=8, attn_p_format="none", attn_p_bits=8)
    with pytest.raises(ValueError, match="both attn_p_exp_bits"):
        LayerQuant(attn_bits=8, a_bits=8, a_format="fp", a_mode="token", attn_p_exp_bits=3)
    with pytest.raises(ValueError, match="unsigned 8-bit"):
        LayerQuant(attn_bits=8, a_bits=8, a_format="fp", a_mode="token", attn_p_exp_bits=3, attn_p_man_bits=4)
    with pytest.raises(ValueError, match="integer only"):
        LayerQuant(attn_bits=8, a_bits=8, a_mode="timestep", attn_p_format="fp")
    # a rule changing the P width re-derives its split
    spec = QuantSpec(default=LayerQuant(a_bits=8, a_format="fp", a_mode="token", attn_bits=8, attn_p_bits=7,
                                        attn_p_exp_bits=2, attn_p_man_bits=5),
                     rules=[("*attn2", {"attn_p_bits": 8})])
    assert spec.resolve("blocks.0.attn2").p_split() == (3, 5)
    assert spec.resolve("blocks.0.attn1").p_split() == (2, 5)
    again = QuantSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again.to_dict() == spec.to_dict()
    # specs saved before the P fields existed still load
    old = spec.to_dict()
    for k in ("attn_p_bits", "attn_p_format", "attn_p_exp_bits", "attn_p_man_bits"):
        old["default"].pop(k)
    assert QuantSpec.from_dict(old).default.p_bits == 8


def test_with_fields_forces_a_field_on_every_layer():
    spec = QuantSpec(default=LayerQuant(w_init="mse"), rules=[("a*", {"w_init": "mse", "w_bits": 4})])
    forced = spec.with_fields(w_init="minmax")
    assert forced.resolve("ab").w_init == "minmax" and forced.resolve("ab").w_bits == 4
    assert spec.resolve("ab").w_init == "mse"
    with pytest.raises(ValueError, match="unknown field"):
        spec.with_fields(nope=1)


@pytest.mark.parametrize("batches", [2, None])
def test_calibrate_on_equals_an_explicit_observation_loop(tiny_calibrated, batches):
    """The one activation-calibration helper sets the same ranges as observing the batches it names by hand
    (shuffled with the seed and capped, or all in file order), and caps the MSE samples of every quantizer,
    both parts of a split one included."""
    import copy

    from pipeline.quant.act import SplitActQuantizer, StaticActQuantizer
    from pipeline.quant.surgery import activation_quantizers, calibrate_on, set_mse_samples

    fp, calib = tiny_calibrated["unet"]
    spec = QuantSpec(default=LayerQuant(w_bits=4, a_bits=6, a_mode="timestep", a_init="mse"))
    a, b = copy.deepcopy(fp), copy.deepcopy(fp)
    for m in (a, b):
        quantize_model(m.net, spec, timesteps=calib.timesteps)
    calibrate_on(a, calib, batches=batches, seed=3, batch_size=4, mse_samples=256)
    set_mse_samples(b.net, 256)
    shuffled = batches is not None
    calibrate_activations(b.net, lambda: [b(x, t, y) for x, t, y in calib.batches(4, shuffle=shuffled, seed=3,
                                                                                    limit=batches)])
    qa, qb = dict(activation_quantizers(a.net)), dict(activation_quantizers(b.net))
    assert qa and qa.keys() == qb.keys()
    for name in qa:
        assert qa[name].max_samples == 256
        for (k, va), vb in zip(qa[name].state_dict().items(), qb[name].state_dict().values()):
            assert torch.equal(va, vb), (name, k)
    # a split quantizer's two parts are reached too
    split = SplitActQuantizer(2, StaticActQuantizer(4), StaticActQuantizer(4))
    layer = next(l for _, l in quant_layers(a.net) if l.act_quantizer is not None)
    layer.act_quantizer = split
    set_mse_samples(a.net, 77)
    assert [p.max_samples for p in split.parts] == [77, 77]
    with pytest.raises(ValueError, match="batches must be None"):
        calibrate_on(a, calib, batches=0)
