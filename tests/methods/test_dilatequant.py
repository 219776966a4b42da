"""DilateQuant: weight dilation (range-preserving per-input-channel scaling), the temporal parallel quantizer
(per-sample timestep parameters), block-wise knowledge distillation, the family end to end, and config errors."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import ConfigError, from_dict, parse_setting
from pipeline.methods import MethodContext, get_family
from pipeline.methods.dilatequant import (DilateQuantConfig, apply_weight_dilation, dilatequant_spec,
                                          dilation_factors, saturated_channels)
from pipeline.quant.act import StaticActQuantizer, TimestepActQuantizer
from pipeline.quant.layers import QuantConv2d, QuantLinear
from pipeline.quant.surgery import calibrate_activations, quant_attention, quant_layers, quant_state, quantize_model

W4A4, W6A6, W4A8 = parse_setting("W4A4"), parse_setting("W6A6"), parse_setting("W4A8")


def options(**kw):
    base = {"bkd": {"iters": 4, "batch_size": 8}, "calib_batches": 1, "act_mse_samples": 256}
    for k, v in kw.items():
        if k == "bkd":
            base["bkd"] = {**base["bkd"], **v}
        else:
            base[k] = v
    return from_dict(DilateQuantConfig, base, "dilatequant")


def run_variant(name, backbone, calib, setting=W4A4, **kw):
    fam = get_family("dilatequant")
    return fam.quantize(backbone, calib, setting, fam.config_for(name, options(**kw)), MethodContext(device="cpu"))


def _weights(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.05
    w.view(shape[0], shape[1], -1)[:, 0] *= 3.0  # one heavy input channel, as trained layers have
    w.view(shape[0], shape[1], -1)[:, 1] = 0.0  # an all-zero input channel
    w.view(shape[0], shape[1], -1)[0, 2] = 0.0  # and isolated zeros
    return w


def _per_out_range(w):
    v = w.reshape(w.shape[0], -1)
    return v.amin(dim=1), v.amax(dim=1)


# ---------------------------------------------------------------------------------------------
# weight dilation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(12, 20), (6, 10, 3, 3)], ids=["linear", "conv"])
def test_dilation_keeps_every_output_channel_range_and_is_maximal(shape):
    w = _weights(shape, seed=1)
    s = dilation_factors(w)
    view = (1, -1) + (1,) * (w.dim() - 2)
    ws = w * s.reshape(view)
    lo, hi = _per_out_range(w)
    lo_s, hi_s = _per_out_range(ws)
    assert torch.equal(lo, lo_s) and torch.equal(hi, hi_s)  # exactly, in float32
    sat = saturated_channels(w)
    assert sat.any() and (~sat).any()
    assert torch.equal(s[sat], torch.ones(int(sat.sum())))
    assert (s[~sat] >= 1).all() and (s > 1).any()
    assert s[1] == 1.0  # the all-zero column is left alone
    # independent check of saturation: channel k holds an output channel's max or min
    wv = w.reshape(w.shape[0], w.shape[1], -1)
    for k in range(w.shape[1]):
        holds = any(bool((wv[j, k] == hi[j]).any() or (wv[j, k] == lo[j]).any()) for j in range(w.shape[0]))
        assert bool(sat[k]) == holds, k
    # the largest such factor: 0.1 % more pushes some entry of every dilated channel out of its range
    for k in torch.nonzero(s > 1).reshape(-1).tolist():
        bigger = wv[:, k] * (s[k] * 1.001)
        assert ((bigger > hi.reshape(-1, 1)) | (bigger < lo.reshape(-1, 1))).any(), k


def test_max_dilation_caps_the_factor():
    w = _weights((12, 20), seed=2)
    assert dilation_factors(w, max_dilation=1.05).max() <= 1.05
    assert dilation_factors(w).max() > 1.05


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_dilated_layer_keeps_fp_output_and_weight_quantizer_and_shrinks_activations(kind):
    torch.manual_seed(0)
    mod = nn.Linear(20, 12) if kind == "linear" else nn.Conv2d(10, 6, 3, padding=1)
    with torch.no_grad():
        mod.weight.copy_(_weights(tuple(mod.weight.shape), seed=3))
    x = torch.randn(4, 7, 20) if kind == "linear" else torch.randn(4, 10, 5, 5)
    x = x * 5.0  # activations with a range much wider than the weights'
    model = nn.Sequential(mod)
    quantize_model(model, dilatequant_spec(W4A8, options(), tpq=False))
    layer = model[0]
    assert isinstance(layer, QuantLinear if kind == "linear" else QuantConv2d)
    q = layer.weight_quantizers[0]
    scale0, zp0 = q.scale.detach().clone(), q.zero_point.detach().clone()
    factors = apply_weight_dilation(model, options())
    s = factors["0"]
    assert torch.equal(layer.in_scale, s) and (s > 1).any()
    # the weight quantization parameters (min-max, per output channel) are unchanged
    assert torch.equal(q.scale.detach(), scale0) and torch.equal(q.zero_point.detach(), zp0)
    lo, hi = _per_out_range(layer.weight)
    lo_s, hi_s = _per_out_range(layer.effective_weight())
    assert torch.equal(lo, lo_s) and torch.equal(hi, hi_s)
    # Y = (X / s)(s W): the FP layer output is unchanged
    x_s = x / layer.in_scale_input_view(x)
    with torch.no_grad():
        assert torch.allclose(layer.op(x_s, layer.effective_weight()), mod(x), rtol=1e-5, atol=1e-5)
    # the activation range shrinks on every channel (and strictly on dilated ones)
    ch = -1 if kind == "linear" else 1
    amax = x.abs().transpose(0, ch).reshape(x.shape[ch], -1).amax(dim=1)
    amax_s = x_s.abs().transpose(0, ch).reshape(x.shape[ch], -1).amax(dim=1)
    assert (amax_s <= amax).all() and (amax_s[s > 1] < amax[s > 1]).all()


def test_dilation_shrinks_the_per_tensor_range_when_the_outlier_channel_is_unsaturated():
    lin = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -1.0, 0.5, 0.1], [-0.8, 0.9, 0.2, -0.05], [0.4, 0.6, -1.2, 0.02]]))
    s = dilation_factors(lin.weight)
    assert s[3] > 1 and torch.equal(s[:3], torch.ones(3))
    x = torch.tensor([[0.3, -0.2, 0.1, 8.0], [0.1, 0.4, -0.3, -6.0]])  # channel 3 is the activation outlier
    assert (x / s).abs().max() < x.abs().max()


def test_foldable_mode_dilates_only_foldable_layers_with_one_s_for_self_attention_qkv(tiny_backbone):
    bb = tiny_backbone("dit", head_dim=16)
    quantize_model(bb.net, dilatequant_spec(W4A8, options(), tpq=False))
    factors = apply_weight_dilation(bb.net, options(dilation_layers="foldable"))
    blk = "transformer_blocks.0.attn1"
    assert {f"{blk}.to_q", f"{blk}.to_k", f"{blk}.to_v", "transformer_blocks.0.ff.net.0.proj"} <= set(factors)
    assert torch.equal(factors[f"{blk}.to_q"], factors[f"{blk}.to_k"])
    assert torch.equal(factors[f"{blk}.to_q"], factors[f"{blk}.to_v"])
    layers = dict(quant_layers(bb.net))
    for name in ("transformer_blocks.0.ff.net.2", f"{blk}.to_out.0", "transformer_blocks.0.norm1.linear"):
        assert layers[name].in_scale is None, name  # after a nonlinearity / the attention matmul: not foldable
    for name in factors:  # the joint s keeps every member's weight range
        w = layers[name].weight
        assert torch.equal(_per_out_range(w)[1], _per_out_range(layers[name].effective_weight())[1]), name


# ---------------------------------------------------------------------------------------------
# temporal parallel quantizer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_tpq_mixed_timestep_batch_equals_per_sample_evaluation(tiny_calibrated, kind):
    fp, calib = tiny_calibrated[kind]
    res = run_variant("dilatequant", copy.deepcopy(fp), calib, W4A4, bkd={"iters": 0})
    bb = res.backbone
    qs = [l.act_quantizer for _, l in quant_layers(bb.net) if l.act_quantizer is not None]
    assert qs and all(isinstance(q, TimestepActQuantizer) and q.learnable for q in qs)
    for _, proc in quant_attention(bb.net):
        assert all(isinstance(q, TimestepActQuantizer) for q in proc.quantizers().values())
    # the per-step parameters really differ between timesteps
    assert any(q.scale.detach().unique().numel() > 1 for q in qs)
    ts = calib.timesteps
    x = calib.x[:3]
    t = torch.tensor([ts[0], ts[-1], ts[len(ts) // 2]])
    y = calib.labels[:3]
    with torch.no_grad():
        batch = bb(x, t, y)
        single = torch.cat([bb(x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(3)])
        # each sample uses its own timestep's parameters: evaluating all at one timestep changes the result
        same_t = bb(x, torch.full_like(t, ts[0]), y)
    assert torch.allclose(batch, single, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batch[1:], same_t[1:], rtol=1e-5, atol=1e-6)
    # and at the quantizer itself, exactly
    q = qs[len(qs) // 2]
    a = torch.randn(3, 5, 4) * 3
    q.context.set(t, 3)
    together = q(a)
    parts = []
    for i in range(3):
        q.context.set(t[i:i + 1], 1)
        parts.append(q(a[i:i + 1]))
    assert torch.equal(together, torch.cat(parts))


def test_no_tpq_variant_has_one_activation_step_for_all_timesteps(tiny_calibrated):
    fp, calib = tiny_calibrated["dit"]
    res = run_variant("dilatequant_no_tpq", copy.deepcopy(fp), calib, W4A4, bkd={"iters": 0})
    qs = [l.act_quantizer for _, l in quant_layers(res.backbone.net) if l.act_quantizer is not None]
    assert qs and all(isinstance(q, StaticActQuantizer) for q in qs)
    assert all(q.quantizer.scale.numel() == 1 and q.quantizer.learnable for q in qs)


# ---------------------------------------------------------------------------------------------
# block-wise knowledge distillation
# ---------------------------------------------------------------------------------------------
def test_bkd_lowers_block_output_mse_and_caches_each_inputs_timestep(tiny_backbone):
    from pipeline.calibration import CalibrationSet
    from pipeline.train.configs import BlockDistillConfig
    from pipeline.train.recon import collect_unit_data, distill_model, timestep_context

    fp = tiny_backbone("dit", head_dim=16, randomise=True)
    g = torch.Generator().manual_seed(0)
    n = 64
    ts = [999, 666, 333, 0]
    calib = CalibrationSet(torch.randn(n, 1, 8, 8, generator=g), torch.tensor(ts * (n // 4)),
                           torch.randint(0, 10, (n,), generator=g), torch.zeros(n, dtype=torch.long), ts)
    qm = copy.deepcopy(fp)
    quantize_model(qm.net, dilatequant_spec(W4A4, options()), timesteps=ts)
    apply_weight_dilation(qm.net, options())

    def run():
        qm(calib.x, calib.t, calib.labels)

    calibrate_activations(qm.net, run)
    quant_state(qm.net, weight=True, act=True)
    inputs = [calib.x, calib.t, calib.labels]
    block = qm.net.transformer_blocks[0]
    data = collect_unit_data(qm, fp, block, fp.net.transformer_blocks[0], inputs, context=timestep_context(qm.net))
    assert torch.equal(data.timesteps, calib.t)  # t cached with the block inputs
    w0 = block.attn1.to_q.weight.detach().clone()
    s0 = block.attn1.to_q.act_quantizer.scale.detach().clone()
    cfg = BlockDistillConfig(iters=60, batch_size=16, weight_lr=1e-3, weight_quant_lr=1e-4, act_quant_lr=1e-3,
                             error_inputs=64)
    res = distill_model(qm, fp, inputs, cfg, root="net", act_quant=True)
    unit = res["units"]["transformer_blocks.0"]
    assert unit["mse_after"] < 0.9 * unit["mse_before"], unit
    assert unit["params"]["weight"] > 0 and unit["params"]["act_quant"] > 0
    # latent weights and per-timestep activation steps were trained; none is left requiring grad
    assert not torch.equal(block.attn1.to_q.weight.detach(), w0)
    assert not torch.equal(block.attn1.to_q.act_quantizer.scale.detach(), s0)
    assert not any(layer.weight.requires_grad for _, layer in quant_layers(qm.net))


# ---------------------------------------------------------------------------------------------
# the family
# ---------------------------------------------------------------------------------------------
def test_variants_tables_and_switches_are_registered():
    fam = get_family("dilatequant")
    assert fam.variant_names == ["dilatequant", "dilatequant_no_wd", "dilatequant_no_tpq", "full_qat"]
    assert fam.variant("dilatequant_no_wd").overrides == {"wd": False, "tpq": True, "training": "bkd"}
    assert fam.config_for("dilatequant_no_tpq").tpq is False
    assert fam.config_for("full_qat", options(calib_batches=2)).training == "full"
    assert fam.config_for("full_qat", options(calib_batches=2)).calib_batches == 2  # the section's options stay
    assert set(fam.backbones) == {"unet", "dit"} and {t.backbone for t in fam.tables} == {"unet", "dit"}
    claims = {(c.better, c.worse) for c in fam.tables[0].claims}
    assert ("dilatequant/dilatequant", "dilatequant/dilatequant_no_wd") in claims
    assert ("dilatequant/dilatequant", "naive/naive") in claims
    with pytest.raises(ValueError, match=r"dilatequant\[full_qat\]\.training: 'lora' is not allowed"):
        fam.config_for("full_qat", training="lora")
    with pytest.raises(ValueError, match=r"dilatequant\[dilatequant\]\.dilate: unknown key"):
        fam.config_for("dilatequant", dilate=True)
    for s in (W4A4, W6A6, W4A8):
        fam.check_setting(s, fam.config_for("dilatequant", options()))


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_family_end_to_end_is_bit_deterministic_and_exports_packed(tiny_calibrated, kind, tmp_path):
    from pipeline.quant.packing import load_quantized, save_quantized

    fp, calib = tiny_calibrated[kind]
    a = run_variant("dilatequant", copy.deepcopy(fp), calib, W4A4)
    b = run_variant("dilatequant", copy.deepcopy(fp), calib, W4A4)
    sa, sb = a.backbone.state_dict(), b.backbone.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    info = a.info
    assert info["bkd_units"] >= 2 and info["wd_layers"] == info["n_quant_layers"]
    assert info["bkd_mse_after"] <= info["bkd_mse_before"] * 1.05
    assert "peak_memory_mb" not in info  # measured by the runner for every family (tests/test_runner.py)
    assert 0 < info["wd_act_range_ratio"] <= 1.0  # dilation never widens a layer's input range
    # trained weights: not the FP ones any more
    fp_w = dict(quant_layers(copy.deepcopy(fp).net)) or {n: m for n, m in fp.net.named_modules()}
    name, layer = next((n, l) for n, l in quant_layers(a.backbone.net) if l.in_scale is not None)
    assert not torch.equal(layer.weight.detach(), fp.net.get_submodule(name).weight.detach())
    del fp_w
    # the packed export reloads to the same fake-quant outputs
    save_quantized(a.backbone.net, a.spec, tmp_path / "q")
    loaded = copy.deepcopy(fp)
    loaded.net = load_quantized(loaded.net, tmp_path / "q")
    x, t, y = calib.x[:3], calib.t[:3], calib.labels[:3]
    with torch.no_grad():
        assert torch.allclose(loaded(x, t, y), a.backbone(x, t, y), rtol=1e-5, atol=1e-6)


def test_full_qat_trains_the_whole_network_as_one_unit(tiny_calibrated):
    fp, calib = tiny_calibrated["dit"]
    res = run_variant("full_qat", copy.deepcopy(fp), calib, W4A8, full_qat_iters=3)
    info = res.info
    assert info["full_qat_units"] == 1 and "bkd_units" not in info
    assert info["full_qat_weight_params"] == sum(l.weight.numel() for _, l in quant_layers(res.backbone.net))


def test_no_wd_variant_leaves_inputs_unscaled(tiny_calibrated):
    fp, calib = tiny_calibrated["unet"]
    res = run_variant("dilatequant_no_wd", copy.deepcopy(fp), calib, W6A6, bkd={"iters": 1})
    assert all(l.in_scale is None for _, l in quant_layers(res.backbone.net))
    assert "wd_layers" not in res.info


@pytest.mark.parametrize("edit, match", [
    ({"bkd": {"iters": -1}}, r"dilatequant\.bkd\.iters"),
    ({"bkd": {"weight_lr": -1.0}}, r"dilatequant\.bkd\.weight_lr"),
    ({"bkd": {"itres": 3}}, r"dilatequant\.bkd\.itres: unknown key"),
    ({"max_dilation": 0.5}, r"dilatequant\.max_dilation"),
    ({"dilation_layers": "some"}, r"dilatequant\.dilation_layers"),
    ({"keep_first_last_bits": 1}, r"dilatequant\.keep_first_last_bits"),
    ({"full_qat_iters": -3}, r"dilatequant\.full_qat_iters"),
    ({"calib_batches": 0}, r"dilatequant\.calib_batches"),
    ({"foldable_patterns": [""]}, r"dilatequant\.foldable_patterns\[0\]"),
])
def test_bad_config_values_name_the_key(edit, match):
    with pytest.raises(ConfigError, match=match):
        options(**edit)


def test_default_params_section_validates():
    """The family is in the default run: params.yaml lists it in `families`, its section passes the validate
    stage and names exactly the family's variants."""
    from pathlib import Path

    import yaml

    from pipeline.validation import validate_params

    root = Path(__file__).resolve().parents[2]
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert "dilatequant" in params["families"]
    out = validate_params(root / "params.yaml")
    assert out["dilatequant"]["bkd"]["iters"] >= 1
    assert set(out["dilatequant"]["variants"]) == set(get_family("dilatequant").variant_names)


def test_linear_output_identity_holds_for_any_batch_of_inputs():
    w = _weights((8, 16), seed=5)
    s = dilation_factors(w)
    x = torch.randn(32, 16) * torch.linspace(0.1, 10, 16)
    assert torch.allclose(F.linear(x / s, w * s), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_runner_runs_the_family_logs_bkd_to_mlflow_and_keeps_peak_memory(tmp_path, monkeypatch):
    """Through the generic runner (as `quantize@dilatequant` would run it): jobs succeed, the packed model and
    info.json (with the peak memory) are written, and BKD's per-unit losses land in the job's MLflow run."""
    from pathlib import Path

    import mlflow
    import yaml

    from pipeline.calibration import collect_calibration, save_calibration
    from pipeline.config import BackboneModel, CalibrateConfig, DiffusionConfig, SamplingConfig, UNetArch
    from pipeline.io import read_json
    from pipeline.models import build_backbone, save_backbone
    from pipeline.runner import FamilyRunner

    root = Path(__file__).resolve().parents[2]
    torch.manual_seed(0)
    fp = build_backbone("unet", BackboneModel(unet=UNetArch(block_out_channels=[8, 16], norm_num_groups=4)),
                        8, 1, 10).eval()
    save_backbone(fp, tmp_path / "fp" / "unet")
    calib = collect_calibration(fp, CalibrateConfig(n_samples=4, n_timesteps=2, batch_size=4), DiffusionConfig(),
                                SamplingConfig(steps=3))
    save_calibration(calib, tmp_path / "calib" / "unet")
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["quantize"]["n_workers"] = 1
    p["sampling"]["steps"] = 3
    p["model"]["backbones"] = ["unet"]
    p["families"] = ["dilatequant"]
    for fam in ("naive", "fp4dit", "mpq"):
        p.pop(fam)
    section = p["dilatequant"]
    section.update(variants=["dilatequant", "full_qat"], settings=["W4A8"], backbones=["unet"], calib_batches=1,
                   seeds=[0], seeded_variants=None)
    section["bkd"].update(iters=2, batch_size=4, log_every=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    monkeypatch.chdir(tmp_path)
    runner = FamilyRunner("dilatequant", tmp_path / "params.yaml", tmp_path / "fp", tmp_path / "calib", tmp_path / "out")
    assert runner.run() == []
    manifest = read_json(tmp_path / "out" / "manifest.json")
    assert {m["variant"]: m["status"] for m in manifest["models"]} == {"dilatequant": "ok", "full_qat": "ok"}
    assert [t["backbone"] for t in manifest["tables"]] == ["unet"]  # the DiT table is left out: no DiT in this run
    job = tmp_path / "out" / "W4A8" / "dilatequant" / "unet" / "seed0"
    assert (job / "packed.safetensors").exists()
    from pipeline.runner import read_job_info

    info = read_job_info(job)
    assert info["method_seconds"] > 0 and info["peak_memory_mb"] > 0 and info["info"]["bkd_units"] >= 2
    runs = mlflow.search_runs(experiment_names=[p["tracking"]["experiment"]], output_format="list")
    keys = {k for r in runs for k in r.data.metrics}
    assert any(k.startswith("bkd/") and k.endswith("/mse") for k in keys), sorted(keys)[:20]
    assert any(k.startswith("full_qat/net/") for k in keys)
