"""pipeline.deploy: quantized models exported to ONNX and executed by ONNX Runtime's integer kernels.

Tolerance (deployed vs fake-quant outputs). The integer layers accumulate exactly in int32 and apply Δ_a·Δ_w
once; the fake-quant model multiplies dequantized floats. Both compute the same real number up to float32
rounding (relative ~1e-6) plus a different summation order in norms, attention and MatMulNBits. Such a
difference can move a value that sits within ~1e-6 of a rounding boundary across it, and then one activation
code flips (by one step Δ_a, a few percent of the output range at 4-8 bits) and propagates. So the tests
assert (a) almost every output agrees to float precision (median |Δ| ≤ 1e-5) and (b) no output differs by
more than 5 % of the output range (a flipped code, never a wrong scale or code: a wrong zero point or scale
moves every output by far more)."""
import copy
import json

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def _agree(out, ref):
    diff = (out - ref).abs()
    assert float(diff.median()) <= 1e-5, f"median |deployed - fake-quant| {float(diff.median()):.2e}"
    assert float(diff.max()) <= 0.05 * float(ref.abs().max()), \
        f"max |deployed - fake-quant| {float(diff.max()):.3e} vs output range {float(ref.abs().max()):.3f}"


def _inputs(calib, n=16):
    return calib.x[:n], calib.t[:n], None if calib.labels is None else calib.labels[:n]


@pytest.fixture(scope="module")
def quantized(tiny_calibrated):
    """{(kind, setting): (fp, calib, QuantResult)}: naive W8A8 and weight-only W4 (every layer at 4 bits)."""
    from pipeline.api import quantize

    out = {}
    for kind in ("unet", "dit"):
        fp, calib = tiny_calibrated[kind]
        out[(kind, "W8A8")] = (fp, calib, quantize(fp, "naive", "W8A8", calib))
        out[(kind, "W4A16")] = (fp, calib, quantize(fp, "naive", "W4A16", calib, keep_first_last_bits=4))
    return out


@pytest.mark.parametrize("kind", ["unet", "dit"])
@pytest.mark.parametrize("setting", ["W8A8", "W4A16"])
def test_export_runs_in_onnxruntime_and_matches_fake_quant(quantized, kind, setting, tmp_path):
    from pipeline.deploy.onnx_export import dq_nodes, export_onnx
    from pipeline.deploy.runtime import deployed_backbone, optimized_op_counts

    fp, calib, res = quantized[(kind, setting)]
    info = export_onnx(res.backbone, tmp_path)
    shares = info["executes"]
    if setting == "W8A8":
        assert shares == {"int8": 1.0}, shares
    else:  # every Linear runs MatMulNBits; convolutions have no 4-bit kernel: int8 codes, float activations
        assert shares.get("int4-wo", 0) > 0 and "float" not in shares and "int8" not in shares, shares
        n_int4 = sum(1 for layer in info["layers"] if layer["executes"] == "int4-wo")
        # one weight per layer (a layer the model calls twice runs two nodes on the same initializer)
        assert len({inputs[1] for op, inputs in dq_nodes(tmp_path / "model.onnx") if op == "MatMulNBits"}) == n_int4
    dep = deployed_backbone(tmp_path, res.backbone)
    x, t, y = _inputs(calib)
    with torch.no_grad():
        _agree(dep(x, t, y), res.backbone(x, t, y))
    ops = optimized_op_counts(tmp_path / "model.onnx")
    if setting == "W8A8":  # ORT runs integer kernels, not dequantize-then-float
        assert ops.get("MatMulIntegerToFloat", 0) + ops.get("ConvInteger", 0) >= len(info["layers"])
        assert "DequantizeLinear" not in ops


def test_graph_carries_the_packed_codes_and_scales_bit_for_bit(quantized, tmp_path):
    """Export a model saved and reloaded through the packed format: every integer layer's weight codes in the
    graph are the stored codes, and its activation and weight scales are the packed model's, bit for bit."""
    import onnx
    from onnx import numpy_helper

    from pipeline.deploy.onnx_export import export_onnx, plan_model
    from pipeline.quant.packing import load_quantized, save_quantized
    from pipeline.quant.surgery import quant_layers

    fp, calib, res = quantized[("dit", "W8A8")]
    save_quantized(res.backbone.net, res.spec, tmp_path / "packed")
    loaded = copy.deepcopy(fp)
    loaded.net = load_quantized(loaded.net, tmp_path / "packed")
    export_onnx(loaded, tmp_path / "onnx")
    model = onnx.load_model(str(tmp_path / "onnx" / "model.onnx"))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"}
    value = {**init, **consts}
    fused = [[value.get(i) for i in n.input] for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    q_scales = [value[n.input[1]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    plans = {p.name: p for p in plan_model(loaded)}
    layers = dict(quant_layers(loaded))
    checked = 0
    for name, layer in layers.items():
        if layer.weight_quantizers[0].granularity != "channel" or plans[name].kind != "linear":
            continue
        q = layer.weight_quantizers[0]
        stored = layer.packed_payload["tensors"]
        from pipeline.quant.bitstream import unpack_bits

        key = next(k for k in stored if k.endswith(".w0.codes"))
        codes = unpack_bits(stored[key], q.bits, layer.weight.numel()).reshape(layer.weight.shape)  # code - qmin
        match = [f for f in fused if f[1].shape == tuple(layer.weight.shape[::-1])
                 and (f[1].astype("int64").T + 128 == codes.numpy()).all()]
        assert match, f"{name}: weight codes not found in the graph"  # a layer called twice has two nodes
        a_scale = layer.act_quantizer.quantizer.scale.detach().reshape(1).numpy()
        for m in match:
            assert m[3].tobytes() == q.scale.detach().reshape(-1).numpy().tobytes(), name
            assert m[2].reshape(1).tobytes() == a_scale.tobytes(), name
        assert any(s.reshape(1).tobytes() == a_scale.tobytes() for s in q_scales), name
        checked += 1
    assert checked >= 6


def test_timestep_indexed_scales_each_sample_its_own_step(tiny_calibrated, tmp_path):
    """A TPQ model (DilateQuant: one activation scale per sampling timestep) keeps its table in the graph and runs
    integer kernels with the step's scale; a batch mixing timesteps (run as one call per timestep) equals the
    fake-quant model (which picks each sample's scales by its own timestep), and swapping the samples'
    timesteps changes the output."""
    from pipeline.api import quantize
    from pipeline.deploy.onnx_export import export_onnx
    from pipeline.deploy.runtime import deployed_backbone
    from pipeline.quant.act import TimestepActQuantizer

    fp, calib = tiny_calibrated["unet"]
    res = quantize(fp, "dilatequant", "W8A8", calib, bkd={"iters": 1})
    tpq = [m for m in res.backbone.modules() if isinstance(m, TimestepActQuantizer)]
    assert tpq and len(tpq[0].timesteps) >= 2
    info = export_onnx(res.backbone, tmp_path)
    # integer kernels with the step's Δ_a, gathered from the table in the graph (one timestep per call)
    assert info["executes"].get("int8", 0) > 0.5 and info["one_timestep_per_call"], info["executes"]
    import onnx
    from onnx import numpy_helper

    model = onnx.load_model(str(tmp_path / "model.onnx"))
    arrays = [numpy_helper.to_array(i) for i in model.graph.initializer]
    arrays += [numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"]
    table = tpq[0].scale.detach().to(torch.float32).numpy().tobytes()
    assert any(a.tobytes() == table for a in arrays), "the per-step scale table is not in the graph bit for bit"
    dep = deployed_backbone(tmp_path, res.backbone)
    x, _, y = _inputs(calib, 4)
    steps = torch.tensor(tpq[0].timesteps[:2] * 2)  # two different timesteps in one batch
    with torch.no_grad():
        both = dep(x, steps, y)
        _agree(both, res.backbone(x, steps, y))
        for i in range(4):  # alone (batch 1) too; the fake-quant model is the reference in both cases, since
            # its own batch-1 and batch-4 outputs may differ by a flipped code (float summation order)
            one = (x[i:i + 1], steps[i:i + 1], y[i:i + 1] if y is not None else None)
            _agree(dep(*one), res.backbone(*one))
        # the scales differ per step: the same input at the other step gives another output
        swapped = dep(x, steps.flip(0), y)
    assert not torch.allclose(swapped, both, atol=1e-4)


def test_sampling_through_the_deployed_model(quantized):
    """The project's one sampling loop runs the exported graph (the denoiser call swapped): images from the
    same noise agree with the fake-quant model's."""
    from pipeline.config import DiffusionConfig, SamplingConfig
    from pipeline.deploy.measure import image_fidelity
    from pipeline.deploy.onnx_export import export_onnx
    from pipeline.deploy.runtime import deployed_backbone

    fp, calib, res = quantized[("dit", "W8A8")]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(res.backbone, tmp)
        dep = deployed_backbone(tmp, res.backbone)
        fid = image_fidelity(res.backbone, dep, 8, DiffusionConfig(), SamplingConfig(steps=4))
    assert fid["psnr_min_db"] >= 40, fid


def test_text_conditioned_pixart_exports_and_samples_with_guidance(tiny_backbone, tmp_path):
    """PixArt (captions from the caption table, looked up in the graph; the TorchScript exporter's squeeze
    ``If`` resolved): the deployed model agrees with fake-quant, and guided sampling (both branches through
    the graph) matches."""
    from pipeline.api import quantize
    from pipeline.calibration import collect_calibration
    from pipeline.config import CalibrateConfig, DiffusionConfig, SamplingConfig
    from pipeline.deploy.measure import image_fidelity
    from pipeline.deploy.onnx_export import export_onnx
    from pipeline.deploy.runtime import deployed_backbone

    fp = tiny_backbone("pixart", patch=4, randomise=True)
    calib = collect_calibration(fp, CalibrateConfig(n_samples=8, n_timesteps=3, batch_size=8), DiffusionConfig(),
                                SamplingConfig(steps=3))
    res = quantize(fp, "naive", "W8A8", calib)
    info = export_onnx(res.backbone, tmp_path)
    assert info["executes"] == {"int8": 1.0}
    dep = deployed_backbone(tmp_path, res.backbone)
    x, t, y = _inputs(calib, 8)
    with torch.no_grad():
        _agree(dep(x, t, y), res.backbone(x, t, y))
    res.backbone.set_guidance(2.0)
    dep.guidance_scale = 2.0
    fid = image_fidelity(res.backbone, dep, 8, DiffusionConfig(), SamplingConfig(steps=4))
    assert fid["psnr_min_db"] >= 40, fid


def test_matmulnbits_packing_matches_the_dequantized_weight():
    """The 4-bit packing (two codes per byte, low nibble first; per-block scales and packed zero points; the
    input padded to whole blocks) against ORT's own MatMulNBits kernel and a float reference."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from pipeline.deploy.onnx_export import LayerPlan, matmulnbits_tensors

    g = torch.Generator().manual_seed(0)
    n, k = 24, 40
    for block in (16, 32, 64, 256):
        codes = torch.randint(0, 16, (n, k), generator=g)
        zero = torch.randint(0, 16, (n,), generator=g)
        scale = torch.rand(n, generator=g) + 0.1
        plan = LayerPlan("l", "linear", "int4-wo", n * k, w_codes=codes.to(torch.uint8), w_zero=zero.to(torch.uint8),
                         w_scale=scale, w_block=block)
        b, s, zp = matmulnbits_tensors(plan)
        node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                                block_size=block, accuracy_level=0)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [3, k])],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, n])],
                                  initializer=[numpy_helper.from_array(b.numpy(), "B"),
                                               numpy_helper.from_array(s.numpy(), "S"),
                                               numpy_helper.from_array(zp.numpy(), "Z")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        a = torch.randn(3, k, generator=g)
        y = ort.InferenceSession(model.SerializeToString()).run(None, {"A": a.numpy()})[0]
        w = (codes.double() - zero[:, None].double()) * scale[:, None].double()
        np.testing.assert_allclose(y, (a.double() @ w.t()).numpy(), rtol=0, atol=1e-4)
        # a wrong nibble order would not pass: swapping the halves of each byte changes the product
        swapped = ((b >> 4) | (b << 4)).to(torch.uint8)
        assert not torch.equal(swapped, b)


def test_bad_export_requests_fail_with_the_key_named(quantized, tmp_path, monkeypatch):
    from pipeline.deploy import __main__ as cli
    from pipeline.deploy.onnx_export import ExportError, export_onnx
    from pipeline.deploy.runtime import deployed_backbone, require_onnxruntime

    with pytest.raises(ExportError, match="backbone: expected"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "p")
    fp, calib, res = quantized[("dit", "W8A8")]
    lora = copy.deepcopy(res.backbone)
    from pipeline.quant.surgery import quant_layers

    name, layer = next(iter(quant_layers(lora)))
    layer.add_lora(2)
    with pytest.raises(ExportError, match=f"layer '{name}': unmerged LoRA"):
        export_onnx(lora, tmp_path / "l")
    assert not (tmp_path / "l").exists()  # refused before anything is written
    circular = copy.deepcopy(res.backbone)
    conv_name, conv = next((n, m) for n, m in quant_layers(circular) if hasattr(m, "padding_mode"))
    conv.padding_mode = "circular"
    with pytest.raises(ExportError, match=f"layer '{conv_name}': convolution with padding"):
        export_onnx(circular, tmp_path / "c")
    export_onnx(res.backbone, tmp_path / "ok")
    other = quantized[("unet", "W8A8")][2].backbone
    with pytest.raises(ValueError, match="kind of the exported model"):
        deployed_backbone(tmp_path / "ok", other)
    with pytest.raises(FileNotFoundError, match="run the export first"):
        deployed_backbone(tmp_path / "missing", res.backbone)
    assert cli.main(["--fp", str(tmp_path / "nofp"), "--quantized", str(tmp_path / "ok"), "--out", str(tmp_path / "o")]) == 2
    with pytest.raises(SystemExit):
        cli.main(["--fp", "a", "--quantized", "b", "--out", "c", "--images", "-1"])
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="needs the 'onnxruntime' package"):
        require_onnxruntime()


def test_deploy_json_records_plans_and_bytes(quantized, tmp_path):
    from pipeline.deploy.onnx_export import export_onnx, matmulnbits_tensors, plan_model

    fp, calib, res = quantized[("unet", "W4A16")]
    info = export_onnx(res.backbone, tmp_path / "q")
    fp_info = export_onnx(fp, tmp_path / "fp")
    saved = json.loads((tmp_path / "q" / "deploy.json").read_text())
    assert saved["executes"] == info["executes"] and len(saved["layers"]) == len(info["layers"])
    assert all(layer.get("reason") for layer in saved["layers"] if layer["executes"] in ("int8-wo", "float"))
    assert fp_info["executes"] == {} and fp_info["executes_label"] == "float 100 %"
    # tensors above 1 KiB live in model.onnx.data: the 4-bit weights take under a quarter of the float32 ones
    assert info["bytes"]["data"] < 0.25 * fp_info["bytes"]["data"]
    for plan in plan_model(res.backbone):  # the stored size from the shape = the MatMulNBits tensors written
        if plan.executes == "int4-wo":
            assert plan.stored_bytes() == sum(t.numel() * t.element_size() for t in matmulnbits_tensors(plan))
    lb = info["layer_bytes"]
    assert lb["fp32"] == 4 * sum(layer["weights"] for layer in info["layers"]) and lb["stored"] < 0.25 * lb["fp32"]
    # an int8 layer stores one byte per weight plus a float32 scale and an int8 zero point per output channel
    w8 = export_onnx(quantized[("unet", "W8A8")][2].backbone, tmp_path / "w8")
    for layer, plan in zip(w8["layers"], plan_model(quantized[("unet", "W8A8")][2].backbone)):
        assert layer["stored_bytes"] == layer["weights"] + 5 * plan.w_scale.numel()


def test_cli_exports_and_measures_a_saved_model(quantized, tmp_path, capsys):
    """python -m pipeline.deploy on a saved FP model and packed quantized model: exit 0, both graphs written,
    measure.json with the timings (per batch, per runtime), bytes and fidelity."""
    from pipeline.deploy import __main__ as cli
    from pipeline.models import save_backbone
    from pipeline.quant.packing import save_quantized

    fp, calib, res = quantized[("dit", "W8A8")]
    save_backbone(fp, tmp_path / "fp")
    save_quantized(res.backbone.net, res.spec, tmp_path / "q")
    from pipeline.calibration import save_calibration

    save_calibration(calib, tmp_path / "calib")
    rc = cli.main(["--fp", str(tmp_path / "fp"), "--quantized", str(tmp_path / "q"), "--out", str(tmp_path / "out"),
                   "--calib", str(tmp_path / "calib"), "--images", "2", "--repeats", "1",
                   "--params", str(tmp_path / "none.yaml")])
    assert rc == 0
    m = json.loads((tmp_path / "out" / "measure.json").read_text())
    assert (tmp_path / "out" / "quantized" / "model.onnx").is_file() and (tmp_path / "out" / "fp32" / "model.onnx").is_file()
    assert m["executes"] == {"int8": 1.0} and set(m["call_seconds"]) == {"1", "8"}
    assert set(m["call_seconds"]["8"]) == {"torch_fp32", "torch_fake_quant", "ort_fp32", "deployed"}
    assert m["denoiser"]["max_abs"] <= 0.05 * m["denoiser"]["ref_max_abs"]
    assert m["images"]["images"] == 2 and m["images"]["psnr_min_db"] >= 40
    assert m["bytes"]["deployed"] > 0 and m["bytes"]["ort_fp32"] > 0  # tiny models: graph overhead dominates
    assert json.loads(capsys.readouterr().out)["executes_label"] == "int8 100 %"


def _entry(b, f, v, s, seed=0):
    from pathlib import Path

    from pipeline.evaluation import ModelEntry

    return ModelEntry(b, f, v, s, Path("fp"), Path(f"q/{f}/{v}/{s}/{seed}"), seed)


def test_export_rows_resolve_best_by_the_mean_over_seeds_and_name_the_key_when_missing():
    from pipeline.config import ConfigError
    from pipeline.deploy.stage import resolve_rows

    entries = [_entry("unet", "qdiff", v, "W8A8", s) for v in ("qdiff", "qdiff_no_split") for s in (0, 1)]
    results = [  # qdiff: seeds 30 and 34 (mean 32); qdiff_no_split: one seed at 31 -> best by FID
        {"backbone": "unet", "family": "qdiff", "variant": "qdiff", "setting": "W8A8", "seed": 0, "fid": 30.0,
         "accuracy": 0.9},
        {"backbone": "unet", "family": "qdiff", "variant": "qdiff", "setting": "W8A8", "seed": 1, "fid": 34.0,
         "accuracy": 0.9},
        {"backbone": "unet", "family": "qdiff", "variant": "qdiff_no_split", "setting": "W8A8", "seed": 0,
         "fid": 31.0, "accuracy": 0.8}]
    got = resolve_rows(["unet/qdiff/best/w8a8", "unet/qdiff/qdiff/W8A8"], entries, results, "fid")
    assert [(r, e.variant, e.seed) for r, e in got] == [("unet/qdiff/best/w8a8", "qdiff_no_split", 0),
                                                         ("unet/qdiff/qdiff/W8A8", "qdiff", 0)]
    # accuracy: higher is better
    assert resolve_rows(["unet/qdiff/best/W8A8"], entries, results, "accuracy")[0][1].variant == "qdiff"
    with pytest.raises(ConfigError, match=r"export.rows\[1\]: 'unet/qdiff/best/W4A8': no evaluated qdiff model"):
        resolve_rows(["unet/qdiff/qdiff/W8A8", "unet/qdiff/best/W4A8"], entries, results, "fid")
    with pytest.raises(ConfigError, match=r"export.rows\[0\]: 'unet/naive/naive/W8A8': no quantized model"):
        resolve_rows(["unet/naive/naive/W8A8"], entries, results, "fid")


def test_fallback_error_names_the_layer_that_would_run_as_float(tiny_calibrated):
    """FP4DiT's ExMy weight codes have no kernel on ORT: with export.fallback: error the row fails naming the
    layer before any export; with float it runs on the decoded weight."""
    from pipeline.api import quantize
    from pipeline.config import ConfigError
    from pipeline.deploy.onnx_export import plan_model
    from pipeline.deploy.stage import check_fallback

    fp, calib = tiny_calibrated["dit"]
    res = quantize(fp, "fp4dit", "W4A8", calib, variant="fp_tok_nearest")
    plans = plan_model(res.backbone)
    floats = [p for p in plans if p.executes == "float" and p.w_bits is not None]
    assert floats, [p.executes for p in plans]
    with pytest.raises(ConfigError, match=rf"export.fallback: 'error', but dit/fp4dit/fp_tok_nearest/W4A8: layer "
                                          rf"{floats[0].name} has no kernel"):
        check_fallback(plans, "dit/fp4dit/fp_tok_nearest/W4A8", "error")
    check_fallback(plans, "dit/fp4dit/fp_tok_nearest/W4A8", "float")  # allowed: no error
    w8 = plan_model(quantize(fp, "naive", "W8A8", calib).backbone)
    check_fallback(w8, "dit/naive/naive/W8A8", "error")  # every layer integer: nothing to fall back on


def test_peak_memory_of_a_fresh_process_running_the_graph(quantized, tmp_path):
    from pipeline.deploy.measure import peak_rss_mib, vm_hwm_mib
    from pipeline.deploy.onnx_export import export_onnx

    fp, calib, res = quantized[("dit", "W8A8")]
    export_onnx(res.backbone, tmp_path)
    peak = peak_rss_mib(f"ort:{tmp_path}", 2)
    # a fresh interpreter with torch and ORT loaded holds well over 100 MiB; far less than this test process,
    # which holds the whole suite's models
    assert 100 < peak < 4096 and vm_hwm_mib() > 100
    with pytest.raises(RuntimeError, match="spec must be ort:<dir> or fp:<dir>"):
        peak_rss_mib(f"onnx:{tmp_path}", 2)


def test_report_shows_what_each_exported_row_executes_and_its_fidelity(tmp_path):
    import pandas as pd

    from pipeline.report import deploy_markdown, plot_deploy_speed, summary, with_executes

    deployed = [{"row": "unet/qdiff/best/W8A8", "model": "unet/qdiff/qdiff_no_split/W8A8#seed0", "key": "k",
                 "executes": {"int8": 0.97, "int8-wo": 0.03}, "executes_label": "int8 97 %, int8-wo 3 %",
                 "bytes": {"deployed": 1_000_000, "ort_fp32": 4_000_000},
                 "fidelity": {"psnr_mean_db": 45.5, "psnr_min_db": 40.25, "max_abs_image": 0.01,
                              "denoiser_max_abs": 0.002, "denoiser_ref_max_abs": 2.0,
                              "deployed": {"fid": 36.1}, "fake_quant": {"fid": 36.0}},
                 "timing": {"threads": 2, "speedup": {"vs_torch_fp32": 0.8, "vs_ort_fp32": 1.2, "batch": 8}}}]
    agg = pd.DataFrame([{"backbone": "unet", "family": "qdiff", "variant": v, "setting": "W8A8"}
                        for v in ("qdiff", "qdiff_no_split")])
    got = with_executes(agg, deployed)
    assert pd.isna(got["executes"].iloc[0]) and got["executes"].iloc[1] == "int8 97 %, int8-wo 3 %"
    table = deploy_markdown(deployed)
    assert "| unet/qdiff/best/W8A8 | unet/qdiff/qdiff_no_split/W8A8#seed0 | int8 97 %, int8-wo 3 % | 1.000 | " \
           "0.250 | 45.50 [40.25] |" in table
    s = summary(agg.assign(fid=1.0), deployed=deployed)["deploy/unet/qdiff/best/W8A8"]
    assert s["bytes_vs_fp32_graph"] == 0.25 and s["executes_int8"] == 0.97 and s["psnr_min_db"] == 40.25
    two = deployed + [{**deployed[0], "row": "unet/naive/naive/W8A8", "model": "unet/naive/naive/W8A8#seed0"},
                      {**deployed[0], "row": "dit/naive/naive/W8A8", "model": "dit/naive/naive/W8A8#seed0"}]
    assert plot_deploy_speed(two, tmp_path / "p.timing.png") and (tmp_path / "p.timing.png").stat().st_size
    assert not plot_deploy_speed([{**deployed[0], "timing": {}}], tmp_path / "q.png")


def test_fp_exponent_as_graph_ops_equals_the_bit_read():
    """The traceable exponent read (log2 + two exact comparisons) gives the float32 exponent field's answer on
    powers of two and their neighbours, zeros, subnormals and random magnitudes, for narrow and wide formats."""
    from pipeline.deploy.onnx_export import _fp_step_graph, _rel_exponent_graph
    from pipeline.quant import primitives

    g = torch.Generator().manual_seed(0)
    pows = torch.exp2(torch.arange(-149, 3, dtype=torch.float32))
    r = torch.cat([pows, torch.nextafter(pows, torch.zeros_like(pows)), torch.nextafter(pows, pows * 4),
                   torch.zeros(3), torch.rand(20000, generator=g) * torch.exp2(torch.randint(-140, 2, (20000,),
                                                                                           generator=g).float())])
    for e_top in (1, 3, 7, 15, 127, 8191):
        for exact_zero in (True, False):
            want = primitives._rel_exponent(r.clone(), e_top, exact_zero)
            assert torch.equal(_rel_exponent_graph(r, e_top, exact_zero), want), (e_top, exact_zero)
    maxval = torch.tensor(0.37)
    for exp_bits, man_bits in ((2, 1), (3, 4), (4, 3), (13, 3)):
        for exact_zero in (True, False):
            got, want = _fp_step_graph(r, maxval, exp_bits, man_bits, exact_zero), \
                primitives.fp_step(r, maxval, exp_bits, man_bits, exact_zero)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (exp_bits, man_bits)


def test_fp4dit_fp_weights_and_fp_per_token_activations_export_and_match(tiny_calibrated, tmp_path):
    """FP4DiT's own row (ExMy weights: the float fallback; FP per-token activations emulated in the graph with
    the traceable exponent read) exports and runs in ORT with the fake-quant model's outputs."""
    from pipeline.api import quantize
    from pipeline.deploy.onnx_export import export_onnx
    from pipeline.deploy.runtime import deployed_backbone

    fp, calib = tiny_calibrated["dit"]
    res = quantize(fp, "fp4dit", "W4A8", calib, variant="fp_tok_nearest")
    info = export_onnx(res.backbone, tmp_path)
    assert "float" in info["executes"], info["executes"]
    dep = deployed_backbone(tmp_path, res.backbone)
    x, t, y = _inputs(calib)
    with torch.no_grad():
        _agree(dep(x, t, y), res.backbone(x, t, y))
