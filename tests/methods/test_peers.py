"""The peer tools (optimum-quanto, torchao) as a method family: each row from a deep copy (the FP model is
unchanged), the evaluate stage's loader reproduces the peer's own forward exactly, the core-format emulation
of a weight-only row matches it, coverage is read off the quantized model, a peer that cannot be imported
is a failed row while the other peer runs, and bad options / settings are clear ConfigErrors."""
import copy
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import ConfigError, from_dict, parse_setting
from pipeline.methods import MethodContext, get_family
from pipeline.methods.peers import PeersConfig, coverage, load_peer_model, run_peer, save_peer

ROOT = Path(__file__).resolve().parents[2]
ROWS = [("quanto", "W8A32"), ("quanto", "W4A32"), ("quanto", "W8A8"), ("torchao", "W8A32"), ("torchao", "W4A32"),
        ("torchao", "W8A8"), ("torchao", "W4A8")]


def _batch(calib):
    return next(iter(calib.batches(8, "cpu", shuffle=False)))


def _quantize(fp, calib, peer, setting, workdir=None, **options):
    cfg = from_dict(PeersConfig, {**options, "peer": peer}, "peers")
    return get_family("peers").quantize(fp, calib, parse_setting(setting), cfg,
                                        MethodContext(device="cpu", workdir=workdir))


@pytest.mark.parametrize("peer,setting", [("quanto", "W8A8"), ("torchao", "W8A8"), ("torchao", "W4A32")])
def test_each_row_is_made_from_a_deep_copy(tiny_calibrated, tmp_path, peer, setting):
    fp, calib = tiny_calibrated["unet"]
    before = {k: v.clone() for k, v in fp.state_dict().items()}
    modules = [type(m) for m in fp.modules()]
    res = _quantize(fp, calib, peer, setting, workdir=tmp_path)
    after = fp.state_dict()
    assert set(after) == set(before) and [type(m) for m in fp.modules()] == modules
    for k, v in before.items():
        assert type(after[k]) is torch.Tensor and torch.equal(after[k], v), k
    assert res.backbone is not fp and res.backbone.net is not fp.net


@pytest.mark.parametrize("kind", ["unet", "dit"])
@pytest.mark.parametrize("peer,setting", ROWS)
def test_evaluate_loader_reproduces_the_peer_forward(tiny_backbone, tiny_calibrated, tmp_path, kind, peer, setting):
    """What evaluate loads (load_entry -> the folder's loader) gives exactly the peer model's output; the
    core-format emulation (dequantized weights) matches the weight-only rows to float rounding."""
    from pipeline import models
    from pipeline.evaluation import ModelEntry, load_entry, model_bytes
    from pipeline.quant.packing import load_quantized
    from pipeline.runner import _save_packed

    _, calib = tiny_calibrated[kind]
    fp = tiny_backbone(kind, patch=4, randomise=True)
    models.save_backbone(fp, tmp_path / "fp")
    fp = models.load_backbone(tmp_path / "fp")
    st, cfg = parse_setting(setting), PeersConfig()
    peer_bb, _ = run_peer(peer, fp, calib, st, cfg)
    res = _quantize(fp, calib, peer, setting, workdir=tmp_path / "q")
    _save_packed(res.backbone.net, res.spec, tmp_path / "q", {})  # what the runner adds
    x, t, y = _batch(calib)
    with torch.no_grad():
        ref, want = fp(x, t, y), peer_bb(x, t, y)
        got = load_entry(ModelEntry(kind, "peers", peer, setting, tmp_path / "fp", tmp_path / "q"), "cpu")(x, t, y)
        emu_bb = copy.deepcopy(fp)
        emu_bb.net = load_quantized(emu_bb.net, tmp_path / "q")
        emu = emu_bb(x, t, y)
    assert torch.equal(got, want)
    from pipeline.quant.cost import bitops, count_macs  # what evaluate runs on the loaded model too

    loaded = load_entry(ModelEntry(kind, "peers", peer, setting, tmp_path / "fp", tmp_path / "q"), "cpu")
    macs = count_macs(loaded.net, lambda: loaded(x, t, y))
    assert macs and bitops(loaded.net, macs, 3) > 0
    assert 0 < float((want - ref).norm() / ref.norm()) < 0.5  # quantized, and still the same function
    if not st.act_quantized:
        torch.testing.assert_close(emu, want, rtol=1e-5, atol=1e-5)
    else:
        assert not torch.equal(emu, want)  # the emulation holds the weights only: activations need the loader
    entry = ModelEntry(kind, "peers", peer, setting, tmp_path / "fp", tmp_path / "q")
    assert model_bytes(entry) == (tmp_path / "q" / "peer.safetensors").stat().st_size == res.info["peer_bytes"]


def test_coverage_is_read_off_the_quantized_model(tiny_calibrated):
    fp, calib = tiny_calibrated["unet"]

    def share(pred):
        sizes = [(m.weight.numel(), pred(m)) for m in fp.net.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        return sum(n for n, keep in sizes if keep) / sum(n for n, _ in sizes)

    linear = share(lambda m: isinstance(m, torch.nn.Linear))
    assert 0 < linear < 1  # the UNet has convolutions
    # torchao converts Linear only: coverage is the Linear share, not 1
    assert _quantize(fp, calib, "torchao", "W8A32").info["coverage"] == pytest.approx(linear)
    # PerGroup(32): a Linear whose input size is not a multiple of 32 stays FP (and counts as FP)
    grouped = share(lambda m: isinstance(m, torch.nn.Linear) and m.in_features % 32 == 0)
    info = _quantize(fp, calib, "torchao", "W4A32").info
    assert grouped < linear and info["coverage"] == pytest.approx(grouped) and info["kept_fp_indivisible"] > 0
    assert _quantize(fp, calib, "torchao", "W4A32", torchao_group_size=8).info["coverage"] == pytest.approx(linear)
    # quanto converts Linear and Conv2d
    q = _quantize(fp, calib, "quanto", "W8A32").info
    assert q["coverage"] == 1.0 and q["peer_package"] == "optimum-quanto" and q["peer_version"]
    # a model nobody touched covers nothing
    assert coverage(fp.net)["coverage"] == 0.0


def test_quanto_calibration_uses_the_calibration_inputs(tiny_calibrated):
    fp, calib = tiny_calibrated["dit"]
    assert _quantize(fp, calib, "quanto", "W8A8").info["calib_inputs"] == len(calib)
    assert _quantize(fp, calib, "quanto", "W8A8", calib_batches=1, calib_batch_size=4).info["calib_inputs"] == 4
    assert _quantize(fp, calib, "quanto", "W8A32").info["calib_inputs"] == 0


def test_bad_options_and_settings_are_config_errors():
    from pipeline.validation import load_family

    for bad, msg in (({"torchao_group_size": 0}, "torchao_group_size"), ({"calib_batches": 0}, "calib_batches"),
                     ({"group": 32}, "group")):
        with pytest.raises(ConfigError, match=msg):
            from_dict(PeersConfig, bad, "peers")
    base = {"variants": ["quanto", "torchao"], "backbones": ["unet"]}
    family, _, _ = load_family("peers", {"peers": {**base, "settings": ["W8A8", "W4A8", "W8A32", "W4A32", "W2A32"]}})
    assert family.name == "peers"
    for settings, msg in ((["W3A32"], "quanto"), (["W3A8"], "variant 'quanto'"), (["W8A4"], "8 bits only")):
        with pytest.raises(ConfigError, match=msg):
            load_family("peers", {"peers": {**base, "settings": settings}})
    with pytest.raises(ConfigError, match="unknown variant"):
        load_family("peers", {"peers": {**base, "variants": ["bitsandbytes"], "settings": ["W8A8"]}})


@pytest.fixture(scope="module")
def runner_inputs(tmp_path_factory):
    """A tiny FP UNet and its calibration file on disk, as train_fp / calibrate write them."""
    from pipeline.calibration import collect_calibration, save_calibration
    from pipeline.config import BackboneModel, CalibrateConfig, DiffusionConfig, SamplingConfig, UNetArch
    from pipeline.models import build_backbone, save_backbone

    root = tmp_path_factory.mktemp("peers_runner")
    fp = build_backbone("unet", BackboneModel(unet=UNetArch(block_out_channels=[8, 16], norm_num_groups=4)),
                        8, 1, 10, seed=0).eval()
    save_backbone(fp, root / "fp" / "unet")
    calib = collect_calibration(fp, CalibrateConfig(n_samples=4, n_timesteps=2, batch_size=4), DiffusionConfig(),
                                SamplingConfig(steps=3))
    save_calibration(calib, root / "calib" / "unet")
    return root


def test_a_peer_that_fails_to_import_is_a_failed_row_and_the_other_runs(runner_inputs, monkeypatch):
    from pipeline.io import read_json
    from pipeline.runner import FamilyRunner

    root = runner_inputs
    monkeypatch.chdir(root)
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["quantize"]["n_workers"] = 1  # in this process: the monkeypatched torchao must reach the jobs
    p["sampling"]["steps"] = 3
    p["model"]["backbones"] = ["unet"]
    p["peers"] = {**p["peers"], "variants": ["quanto", "torchao"], "settings": ["W8A8"], "backbones": ["unet"]}
    (root / "params.yaml").write_text(yaml.safe_dump(p))
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao` now raises ImportError
    failed = FamilyRunner("peers", root / "params.yaml", root / "fp", root / "calib", root / "out").run()
    manifest = read_json(root / "out" / "manifest.json")
    status = {m["variant"]: m["status"] for m in manifest["models"]}
    assert status == {"quanto": "ok", "torchao": "failed"}
    assert len(failed) == 1 and "ImportError" in failed[0]["error"] and "torchao" in failed[0]["error"]
    ok = root / "out" / "W8A8" / "quanto" / "unet" / "seed0"
    assert {"packed.safetensors", "quant_spec.json", "peer.safetensors", "peer.json", "loader.json",
            "info.json"} <= {f.name for f in ok.iterdir()}
    info = read_json(ok / "info.json")["info"]
    assert info["coverage"] == 1.0 and info["peer_version"] and info["calib_inputs"] == 8
    assert not any((root / "out" / "W8A8" / "torchao" / "unet" / "seed0").glob("*.safetensors"))
    assert [t["baselines"] for t in manifest["tables"]][0][0] == "naive/naive"


def test_loader_of_a_model_folder_must_be_a_pipeline_function(tmp_path):
    from pipeline.evaluation import ModelEntry, model_bytes

    (tmp_path / "loader.json").write_text('{"loader": "os:system"}')
    with pytest.raises(ValueError, match="pipeline package"):
        model_bytes(ModelEntry("unet", "peers", "quanto", "W8A8", tmp_path, tmp_path))


def test_saved_peer_reloads_onto_a_fresh_fp_net(tiny_calibrated, tmp_path):
    """save_peer / load_peer_model directly: the loader rebuilds the peer's own module types."""
    fp, calib = tiny_calibrated["dit"]
    peer_bb, _ = run_peer("quanto", fp, calib, parse_setting("W4A32"), PeersConfig())
    save_peer(peer_bb.net, "quanto", tmp_path, {})
    net = load_peer_model(copy.deepcopy(fp.net), tmp_path)
    assert [type(m).__name__ for m in net.modules()] == [type(m).__name__ for m in peer_bb.net.modules()]


@pytest.mark.parametrize("peer,setting", [("quanto", "W8A8"), ("torchao", "W4A8")])
def test_pixart_round_trip(tiny_backbone, tmp_path, peer, setting):
    """PixArt has top-level parameters (``scale_shift_table``): the saved state still reloads exactly."""
    from pipeline.calibration import collect_calibration
    from pipeline.config import CalibrateConfig, DiffusionConfig, SamplingConfig

    fp = tiny_backbone("pixart", patch=4, randomise=True)
    calib = collect_calibration(fp, CalibrateConfig(n_samples=4, n_timesteps=2, batch_size=4), DiffusionConfig(),
                                SamplingConfig(steps=3))
    peer_bb, _ = run_peer(peer, fp, calib, parse_setting(setting), PeersConfig())
    save_peer(peer_bb.net, peer, tmp_path, {})
    reloaded = copy.deepcopy(fp)
    reloaded.net = load_peer_model(reloaded.net, tmp_path)
    x, t, y = _batch(calib)
    with torch.no_grad():
        assert torch.equal(reloaded(x, t, y), peer_bb(x, t, y))
    assert 0 < coverage(peer_bb.net)["coverage"] <= 1


def test_coverage_reaches_the_results_table():
    from pipeline.report import COLUMNS, aggregate, markdown_table, results_frame, summary

    rows = [{"backbone": "unet", "family": f, "variant": v, "setting": s, "seed": 0, "fid": fid, "model_bytes": 2**20,
             **({"coverage": cov} if cov is not None else {})}
            for f, v, s, fid, cov in (("fp", "fp", "FP32", 1.0, None), ("naive", "naive", "W8A8", 1.2, None),
                                      ("peers", "torchao", "W8A8", 1.1, 0.2001))]
    agg, _ = aggregate(results_frame(rows))
    out = summary(agg)
    assert out["unet/peers/torchao/W8A8"]["coverage"] == 0.2001 and "coverage" not in out["unet/naive/naive/W8A8"]
    assert "coverage" in COLUMNS and "0.200" in markdown_table(agg)
