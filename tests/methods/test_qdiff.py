"""Q-Diffusion family: block reconstruction beats round-to-nearest on held-out inputs, AdaRound weights on
the RTN grid, the shortcut split (two activation quantizers with their own scales, exact split-quantize-concat,
the split point the real forward uses), the FP model untouched, config errors naming the key, and the packed
export reloading bit for bit."""
import copy

import pytest
import torch

from pipeline.config import ConfigError, from_dict, parse_setting
from pipeline.methods import MethodContext, get_family
from pipeline.methods.qdiff import QDiffConfig, qdiff_spec, shortcut_splits
from pipeline.quant.act import SplitActQuantizer, StaticActQuantizer
from pipeline.quant.surgery import quant_layers, quant_state, quantize_model

W4A8 = parse_setting("W4A8")
FAST = {"calib_batches": 1, "recon": {"iters": 4, "batch_size": 8}, "act_recon": {"iters": 4, "batch_size": 8,
                                                                                  "weight_lr": 0.0, "weight_quant_lr": 0.0}}


def _run(fp, calib, variant="qdiff", setting=W4A8, **options):
    fam = get_family("qdiff")
    cfg = from_dict(QDiffConfig, {**FAST, **options}, "qdiff")
    student = copy.deepcopy(fp)
    return fam.quantize(student, calib, setting, fam.config_for(variant, cfg), MethodContext(device="cpu"))


def test_reconstruction_lowers_block_error_vs_rtn_on_heldout_inputs(tiny_calibrated):
    from pipeline.train.configs import ReconConfig
    from pipeline.train.recon import reconstruct_model

    fp, calib = tiny_calibrated["unet"]
    student = copy.deepcopy(fp)
    net = student.net
    spec = qdiff_spec(W4A8, QDiffConfig(split=False))
    quantize_model(net, spec, timesteps=calib.timesteps)
    quant_state(net, weight=True, act=False)
    inputs = [calib.x, calib.t, calib.labels]
    # curve_every: 8 calibration inputs are held out; curve[0] = hard rounding at init = round to nearest
    cfg = ReconConfig(iters=60, batch_size=8, curve_every=60, curve_inputs=8)
    res = reconstruct_model(student, fp, inputs, cfg, root="net")
    units = list(res["units"].values())
    assert len(units) == res["n_units"] >= 10
    rtn = sum(u["curve"][0][1] for u in units)
    recon = sum(u["error_heldout"] for u in units)
    assert recon < 0.95 * rtn, (rtn, recon)
    better = sum(u["error_heldout"] < u["curve"][0][1] for u in units)
    assert better >= len(units) // 2, [(u["curve"][0][1], u["error_heldout"]) for u in units]


def test_adaround_weights_lie_on_the_rtn_grid(tiny_calibrated):
    fp, calib = tiny_calibrated["unet"]
    res = _run(fp, calib)
    checked = 0
    moved = 0
    for name, layer in quant_layers(res.backbone.net):
        q = layer.weight_quantizers[0]
        assert layer.adaround is not None and all(bool(a.hardened) for a in layer.adaround), name
        w = layer.weight.detach()
        with torch.no_grad():
            wq = layer.quantized_weight()
        if q.granularity == "channel":
            view = (-1,) + (1,) * (w.dim() - 1)
            s, z = q.scale.detach().reshape(view), torch.round(q.zero_point.detach()).reshape(view)
            code = wq / s
            lo = torch.clamp(torch.floor(w / s) + z, q.qmin, q.qmax) - z
            hi = torch.clamp(torch.ceil(w / s) + z, q.qmin, q.qmax) - z
            assert bool(((code - lo).abs() < 1e-3).logical_or((code - hi).abs() < 1e-3).all()), name
            rtn = torch.clamp(torch.round(w / s) + z, q.qmin, q.qmax) - z
            moved += int(((code - rtn).abs() > 0.5).sum())
            checked += 1
        else:  # the split layers' per-(channel, part) ranges: on the grid and within one step of RTN
            with torch.no_grad():
                assert torch.allclose(q(wq), wq, atol=1e-6), name
                step = q.scale.detach().amax()
                assert float((wq - q(w)).abs().max()) <= float(step) * 1.001, name
    assert checked > 10
    assert moved > 0  # AdaRound did change some roundings


def test_shortcut_split_uses_two_activation_quantizers_and_the_real_split_point(tiny_calibrated):
    fp, calib = tiny_calibrated["unet"]
    splits = shortcut_splits(fp.net)
    assert splits and all(n.startswith("up_blocks.") and n.rsplit(".", 1)[1] in ("conv1", "conv_shortcut")
                          for n in splits)
    # the split point is the hidden_states channel count of the concatenation the forward actually builds
    seen: dict = {}
    handles = []
    for b, block in enumerate(fp.net.up_blocks):
        def hook(mod, args, kwargs, b=b):
            hidden = args[0] if args else kwargs["hidden_states"]
            skips = args[1] if len(args) > 1 else kwargs["res_hidden_states_tuple"]
            h = hidden.shape[1]
            for i, r in enumerate(mod.resnets):
                seen[f"up_blocks.{b}.resnets.{i}.conv1"] = h
                assert h + skips[-1 - i].shape[1] == r.in_channels
                h = r.out_channels
        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        fp(calib.x[:2], calib.t[:2], calib.labels[:2])
    for h in handles:
        h.remove()
    assert seen == {n: s for n, s in splits.items() if n.endswith("conv1")}

    res = _run(fp, calib, split_weights=True)  # the per-part weight ranges too (off in the default run)
    net = res.backbone.net
    assert res.info["n_split_layers"] == len(splits)
    name = "up_blocks.0.resnets.0.conv1"
    layer = net.get_submodule(name)
    q = layer.act_quantizer
    assert isinstance(q, SplitActQuantizer) and q.split == splits[name]
    a, b = (p.quantizer for p in q.parts)
    assert not torch.allclose(a.scale, b.scale)  # the two parts got their own ranges
    assert layer.weight_quantizers[0].granularity == "group"
    assert layer.weight_quantizers[0].group_size == splits[name] * 9
    # layer input captured in the quantized model; output = conv(manual split-quantize-concat, W_q)
    got = {}
    hdl = layer.register_forward_pre_hook(lambda m, args: got.setdefault("x", args[0].detach()))
    with torch.no_grad():
        res.backbone(calib.x[:4], calib.t[:4], calib.labels[:4])
    hdl.remove()
    x = got["x"]

    def manual(v, qz):
        s, z = qz.scale.detach(), torch.round(qz.zero_point.detach())
        return (torch.clamp(torch.round(v / s) + z, qz.qmin, qz.qmax) - z) * s

    s = q.split
    ref_x = torch.cat([manual(x[:, :s], a), manual(x[:, s:], b)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(q(x), ref_x, rtol=0, atol=1e-6)
        ref_out = torch.nn.functional.conv2d(ref_x, layer.quantized_weight(), layer.bias, layer.stride,
                                             layer.padding, layer.dilation, layer.groups)
        torch.testing.assert_close(layer(x), ref_out, rtol=1e-5, atol=1e-5)
    # the ablation keeps one static quantizer there
    plain = _run(fp, calib, "qdiff_no_split").backbone.net.get_submodule(name)
    assert isinstance(plain.act_quantizer, StaticActQuantizer)
    assert plain.weight_quantizers[0].granularity == "channel"


def test_fp_model_unchanged_and_learned_activation_steps(tiny_calibrated):
    fp, calib = tiny_calibrated["unet"]
    before = {k: v.clone() for k, v in fp.state_dict().items()}
    given = copy.deepcopy(fp)
    res = get_family("qdiff").quantize(given, calib, W4A8, from_dict(QDiffConfig, {**FAST, "split": True}, "qdiff"),
                                       MethodContext())
    assert res.backbone is given  # quantized in place on the copy it was given
    after = fp.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(True for _ in quant_layers(fp.net))
    info = res.info
    assert info["recon_units"] >= 10 and info["act_recon_units"] == info["recon_units"]
    assert info["recon_error"] <= info["recon_error_rtn"]
    steps = [m for m in res.backbone.net.modules() if isinstance(m, StaticActQuantizer)]
    assert steps and all(m.quantizer.learnable for m in steps)
    brecq = _run(fp, calib, "brecq_w").info
    assert "act_recon_units" not in brecq
    x, t, y = calib.x[:8], calib.t[:8], calib.labels[:8]
    with torch.no_grad():
        err = float((res.backbone(x, t, y) - fp(x, t, y)).pow(2).mean() / fp(x, t, y).pow(2).mean())
    assert err < 0.2


def test_dit_runs_without_split_layers(tiny_calibrated):
    fp, calib = tiny_calibrated["dit"]
    res = _run(fp, calib, setting=parse_setting("W8A8"))
    assert res.info["n_split_layers"] == 0 and res.info["recon_units"] >= 1


@pytest.mark.parametrize("bad, match", [
    ({"keep_first_last_bits": 9}, r"qdiff\.keep_first_last_bits: must be 0 \(FP\) or one of"),
    ({"calib_batches": 0}, r"qdiff\.calib_batches: must be a positive int"),
    ({"act_init": "percentile"}, r"qdiff\.act_init"),
    ({"split_weights": "yes"}, r"qdiff\.split_weights"),
    # the core's ReconConfig checks itself when built (its own prefix, the key still named)
    ({"recon": {"iters": 0}}, r"ReconConfig\.iters: must be a positive int"),
    ({"recon": {"act_quant": True}}, r"qdiff\.recon\.act_quant: must be false"),
    ({"act_recon": {"weight_lr": 1e-4}}, r"qdiff\.act_recon\.weight_lr: must be 0"),
    ({"act_recon": {"weight_lr": 0.0, "weight_quant_lr": 0.0, "act_quant_lr": 0.0}},
     r"qdiff\.act_recon\.act_quant_lr: must be > 0"),
    ({"bits": 4}, r"qdiff\.bits: unknown key"),
])
def test_config_errors_name_the_key(bad, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(QDiffConfig, bad, "qdiff")


def test_packed_model_reloads_bit_for_bit(tiny_calibrated, tmp_path):
    from pipeline.quant.packing import load_quantized, save_quantized

    fp, calib = tiny_calibrated["unet"]
    res = _run(fp, calib)
    save_quantized(res.backbone.net, res.spec, tmp_path / "q")
    loaded = copy.deepcopy(fp)
    loaded.net = load_quantized(loaded.net, tmp_path / "q")
    name = "up_blocks.0.resnets.0.conv1"
    q0, q1 = res.backbone.net.get_submodule(name).act_quantizer, loaded.net.get_submodule(name).act_quantizer
    assert isinstance(q1, SplitActQuantizer) and q1.split == q0.split
    for p0, p1 in zip(q0.parts, q1.parts):
        assert torch.equal(p0.quantizer.scale, p1.quantizer.scale)
        assert torch.equal(p0.quantizer.zero_point, p1.quantizer.zero_point)
    x, t, y = calib.x[:6], calib.t[:6], calib.labels[:6]
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), res.backbone(x, t, y))


def test_runner_job_saves_a_loadable_model(tiny_calibrated, tmp_path, monkeypatch):
    """One qdiff job (method seed 1) through the generic runner (seeded config, packing, manifest) and the
    evaluate stage's loader: the reloaded model keeps its split quantizers and stays close to FP."""
    from pathlib import Path

    import yaml

    from pipeline.calibration import save_calibration
    from pipeline.evaluation import ModelEntry, load_entry
    from pipeline.models import save_backbone
    from pipeline.runner import FamilyRunner

    fp, calib = tiny_calibrated["unet"]
    save_backbone(fp, tmp_path / "fp" / "unet")
    save_calibration(calib, tmp_path / "calib" / "unet")
    root = Path(__file__).resolve().parents[2]
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["quantize"]["n_workers"] = 1
    p["model"]["backbones"] = ["unet"]
    p["families"] = ["qdiff"]
    p["qdiff"].update(variants=["qdiff"], settings=["W4A8"], seeds=[1], seeded_variants=["qdiff"], calib_batches=1)
    p["qdiff"]["recon"]["iters"] = 2
    p["qdiff"]["act_recon"]["iters"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    monkeypatch.chdir(tmp_path)
    FamilyRunner("qdiff", tmp_path / "params.yaml", tmp_path / "fp", tmp_path / "calib", tmp_path / "out").run()
    entry = ModelEntry("unet", "qdiff", "qdiff", "W4A8", tmp_path / "fp" / "unet",
                       tmp_path / "out" / "W4A8" / "qdiff" / "unet" / "seed1")
    loaded = load_entry(entry, "cpu")
    split = loaded.net.get_submodule("up_blocks.0.resnets.0.conv1").act_quantizer
    assert isinstance(split, SplitActQuantizer)
    x, t, y = calib.x[:4], calib.t[:4], calib.labels[:4]
    with torch.no_grad():
        err = float((loaded(x, t, y) - fp(x, t, y)).pow(2).mean() / fp(x, t, y).pow(2).mean())
    assert 0 < err < 0.2
