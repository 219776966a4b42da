"""Block / layer reconstruction (BRECQ-style AdaRound, pipeline.train.recon) on tiny models."""
import copy

import pytest
import torch
import torch.nn as nn

from pipeline.quant.layers import QuantLinear
from pipeline.quant.surgery import LayerQuant, QuantSpec, quant_layers, quantize_model
from pipeline.train.recon import (ReconConfig, collect_unit_data, output_error, reconstruct_model,
                                  reconstruction_units)


class Toy(nn.Module):
    """A two-block MLP behind a ``net`` attribute, like DiffusionBackbone."""

    def __init__(self, d_in=48, d_hidden=64, d_out=24):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Module()
        self.net.stem = nn.Linear(d_in, d_hidden)
        self.net.transformer_blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(d_hidden, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_hidden)) for _ in range(2))
        self.net.head = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        h = self.net.stem(x)
        for b in self.net.transformer_blocks:
            h = h + b(h)
        return self.net.head(h)


def _inputs(n=256, d=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(d, generator=g))  # uneven input channels make rounding matter
    return torch.randn(n, d, generator=g) * scale


def _int_spec(bits=3):
    return QuantSpec(default=LayerQuant(w_bits=bits, w_format="int", w_granularity="channel", a_bits=None,
                                        a_mode="none"))


def _quantized_toy(spec):
    fp = Toy().eval()
    q = copy.deepcopy(fp)
    quantize_model(q.net, spec)
    return q, fp


def test_units_are_blocks_then_leftover_layers_in_module_order():
    q, _ = _quantized_toy(_int_spec())
    units = reconstruction_units(q.net)
    assert [u.name for u in units] == ["stem", "transformer_blocks.0", "transformer_blocks.1", "head"]
    assert [u.kind for u in units] == ["layer", "block", "block", "layer"]
    assert [n for n, _ in units[1].layers] == ["transformer_blocks.0.0", "transformer_blocks.0.2"]
    # a skipped (FP) layer is not a unit, and a block without quantized layers is dropped
    spec = QuantSpec(default=_int_spec().default, rules=[("stem", {"skip": True}),
                                                       ("transformer_blocks.1.*", {"skip": True})])
    q2, _ = _quantized_toy(spec)
    assert [u.name for u in reconstruction_units(q2.net)] == ["transformer_blocks.0", "head"]
    with pytest.raises(ValueError, match="block_patterns"):
        reconstruction_units(q.net, [""])


def test_unit_inputs_come_from_the_quantized_model_when_asym():
    q, fp = _quantized_toy(_int_spec(2))
    x = _inputs(32)
    qb, fb = q.net.transformer_blocks[1], fp.net.transformer_blocks[1]
    asym = collect_unit_data(q, fp, qb, fb, [x], asym=True, chunk_size=10)
    sym = collect_unit_data(q, fp, qb, fb, [x], asym=False, chunk_size=10)
    assert asym.args[0].shape == (32, 64) and torch.equal(asym.target, sym.target)
    with torch.no_grad():
        h = fp.net.stem(x)
        h = h + fp.net.transformer_blocks[0](h)
        assert torch.allclose(sym.args[0], h, atol=1e-6)
        assert torch.allclose(sym.target, fb(h), atol=1e-6)
    assert not torch.allclose(asym.args[0], sym.args[0], atol=1e-3)  # 2-bit earlier layers change the input


def test_reconstruction_beats_round_to_nearest_and_ends_on_the_int_grid():
    q, fp = _quantized_toy(_int_spec(3))
    rtn = copy.deepcopy(q)
    x = _inputs(256)
    cfg = ReconConfig(iters=100, batch_size=32, lr=1e-2, error_inputs=256)
    res = reconstruct_model(q, fp, [x], cfg, root="net")
    assert res["n_units"] == 4 and res["n_inputs"] == 256
    for name, r in res["units"].items():
        assert r["error_recon"] < r["error_rtn"], name
    with torch.no_grad():
        ref = fp(x)
        assert output_error(q(x), ref) < 0.9 * output_error(rtn(x), ref)
    for name, layer in quant_layers(q.net):
        qz = layer.weight_quantizers[0]
        w = layer.quantized_weight().detach()
        assert all(bool(a.hardened) for a in layer.adaround), name
        codes = w / qz.scale.reshape(-1, 1) + torch.round(qz.zero_point).reshape(-1, 1)
        assert torch.allclose(codes, codes.round(), atol=1e-3), name
        assert codes.round().min() >= qz.qmin and codes.round().max() <= qz.qmax
        assert torch.equal(w, qz.dequantize(layer.adaround[0].codes()))
        assert not layer.weight.requires_grad and layer.bias.requires_grad  # trainability restored


def test_reconstruction_logs_into_the_stage_run(monkeypatch, tmp_path):
    import mlflow

    from pipeline.tracking import stage_run, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    q, fp = _quantized_toy(_int_spec(4))
    with stage_run("quantize", params={}, experiment="t") as run:
        reconstruct_model(q, fp, [_inputs(64)], ReconConfig(iters=4, batch_size=16, log_every=1), run=run)
        client = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri())
        assert client.get_run(run.run_id).info.status == "RUNNING"  # Lightning did not close our run
    r = client.get_run(run.run_id)
    assert r.info.status == "FINISHED"
    keys = set(r.data.metrics)
    for unit in ("stem", "transformer_blocks.0", "transformer_blocks.1", "head"):
        assert f"recon/{unit}/loss" in keys and f"recon/{unit}/beta" in keys
    hist = client.get_metric_history(run.run_id, "recon/head/rec")
    assert len(hist) >= 3


def test_bad_config_and_inputs_raise():
    with pytest.raises(ValueError, match="iters"):
        ReconConfig(iters=0)
    with pytest.raises(ValueError, match="warmup"):
        ReconConfig(warmup=1.0)
    with pytest.raises(ValueError, match="lr"):
        ReconConfig(lr=0.0)
    q, fp = _quantized_toy(_int_spec())
    with pytest.raises(ValueError, match="same first dim"):
        reconstruct_model(q, fp, [_inputs(8), torch.zeros(7)], ReconConfig(iters=1))
    with pytest.raises(TypeError, match="ReconConfig"):
        reconstruct_model(q, fp, [_inputs(8)], {"iters": 1})
    assert isinstance(q.net.head, QuantLinear)


def test_heldout_curve_per_unit_and_option_off_unchanged(monkeypatch, tmp_path):
    import mlflow

    from pipeline.tracking import stage_run, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)

    x = _inputs(128)
    q_off, fp = _quantized_toy(_int_spec(3))
    q_def, _ = _quantized_toy(_int_spec(3))
    q_on, _ = _quantized_toy(_int_spec(3))
    base = dict(iters=12, batch_size=16, lr=1e-2)
    r_off = reconstruct_model(q_off, fp, [x], ReconConfig(**base, curve_every=0), root="net")
    reconstruct_model(q_def, fp, [x], ReconConfig(**base), root="net")
    for a, b in zip(q_off.state_dict().values(), q_def.state_dict().values()):
        assert torch.equal(a, b)  # option off = the run without it
    assert all("curve" not in r for r in r_off["units"].values()) and r_off["n_inputs"] == 128
    with stage_run("quantize", params={}, experiment="t") as run:
        r_on = reconstruct_model(q_on, fp, [x], ReconConfig(**base, curve_every=5, curve_inputs=32), root="net",
                                 run=run)
    assert r_on["n_inputs"] == 96  # 32 held out
    for name, r in r_on["units"].items():
        steps = [s for s, _ in r["curve"]]
        assert steps == [0, 5, 10, 12], name
        assert all(v == v and v >= 0 for _, v in r["curve"])
        assert r["curve"][-1][1] == pytest.approx(r["error_heldout"], rel=1e-5)
    client = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri())
    hist = client.get_metric_history(run.run_id, "recon/head/heldout")
    assert sorted(m.step for m in hist) == [0, 5, 10, 12]


def test_summarize_units_means_and_parameter_counts():
    from pipeline.train.recon import summarize_units

    rec = {"seconds": 2.0, "n_units": 2, "n_inputs": 16,
           "units": {"a": {"error_rtn": 1.0, "error_recon": 0.5}, "b": {"error_rtn": 3.0, "error_recon": 0.25}}}
    assert summarize_units(rec, "recon") == {"recon_seconds": 2.0, "recon_units": 2, "recon_inputs": 16,
                                             "recon_error_rtn": 2.0, "recon_error": 0.375}
    dist = {"seconds": 1.0, "n_units": 2, "n_inputs": 8,
            "units": {"a": {"mse_before": 0.4, "mse_after": 0.2, "params": {"weight": 10, "act_quant": 2}},
                      "b": {"mse_before": 0.2, "mse_after": 0.1, "params": {"weight": 5}}}}
    out = summarize_units(dist, "bkd")
    assert out["bkd_mse_before"] == pytest.approx(0.3) and out["bkd_mse_after"] == pytest.approx(0.15)
    assert out["bkd_weight_params"] == 15 and out["bkd_act_quant_params"] == 2 and out["bkd_inputs"] == 8
