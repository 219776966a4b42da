"""pipeline.evaluation without the evaluators: model discovery from the family manifests, content keys
(what invalidates a cached evaluation), bytes on disk, image grids, and the cache path of evaluate_all."""
import json

import pytest
import torch

from pipeline.config import EvalConfig, SamplingConfig, DiffusionConfig, TrackingConfig
from pipeline.evaluation import (ModelEntry, discover_entries, entry_key, evaluate_all, model_bytes, save_grid)


def _write(path, text="x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _manifest(root, family, models, tables=()):
    root.joinpath(family).mkdir(parents=True, exist_ok=True)
    (root / family / "manifest.json").write_text(json.dumps({"family": family, "models": models,
                                                             "tables": list(tables)}))


def _model(variant, setting, backbone, status="ok", **kw):
    return {"variant": variant, "setting": setting, "backbone": backbone, "status": status,
            "path": f"{setting}/{variant}/{backbone}", **kw}


def test_discover_entries_reads_manifests_and_separates_failures(tmp_path):
    fp, q = tmp_path / "fp", tmp_path / "quantized"
    _manifest(q, "naive", [_model("naive", "W8A8", "unet"), _model("naive", "W8A8", "dit")],
              tables=[{"title": "T", "family": "naive"}])
    _manifest(q, "mpq", [_model("mpqdm", "W2A4", "unet"),
                         _model("mpqdm2", "W2A4", "unet", status="failed", error="RuntimeError: boom")])
    entries, failed, tables = discover_entries(["naive", "mpq"], ["unet"], fp, q)
    assert [e.label for e in entries] == ["unet/fp/fp/FP32", "unet/naive/naive/W8A8#seed0",
                                          "unet/mpq/mpqdm/W2A4#seed0"]
    assert [e.row for e in entries] == ["unet/fp/fp/FP32", "unet/naive/naive/W8A8", "unet/mpq/mpqdm/W2A4"]
    assert entries[1].quant_dir == q / "naive" / "W8A8" / "naive" / "unet" and entries[1].fp_dir == fp / "unet"
    assert entries[0].quant_dir is None
    assert failed == [{"backbone": "unet", "family": "mpq", "variant": "mpqdm2", "setting": "W2A4",
                       "status": "failed", "error": "RuntimeError: boom"}]
    assert tables == [{"title": "T", "family": "naive"}]
    # labels and slugs are unique per (backbone, family, variant, setting)
    assert len({e.slug for e in entries}) == len(entries)


def test_discover_entries_names_the_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"quantize@toy"):
        discover_entries(["toy"], ["unet"], tmp_path / "fp", tmp_path / "quantized")


def test_entry_key_tracks_model_files_and_context_but_not_timings(tmp_path):
    fp = tmp_path / "fp"
    _write(fp / "model.safetensors", "fp-weights")
    qd = tmp_path / "q"
    _write(qd / "weights.safetensors", "q-weights")
    _write(qd / "info.json", '{"seconds": 1.0}')
    e = ModelEntry("unet", "naive", "naive", "W8A8", fp, qd)
    ctx = {"eval": {"n_samples": 10}}
    k0 = entry_key(e, ctx)
    _write(qd / "info.json", '{"seconds": 2.0}')
    assert entry_key(e, ctx) == k0  # timings differ between identical results
    assert entry_key(e, {"eval": {"n_samples": 11}}) != k0
    _write(qd / "weights.safetensors", "other")
    assert entry_key(e, ctx) != k0
    _write(fp / "model.safetensors", "fp2")
    assert entry_key(ModelEntry("unet", "fp", "fp", "FP32", fp), ctx) != entry_key(e, ctx)


def test_model_bytes_counts_safetensors_only(tmp_path):
    fp, qd = tmp_path / "fp", tmp_path / "q"
    _write(fp / "sub" / "a.safetensors", "12345")
    _write(fp / "config.json", "{}" * 100)
    _write(qd / "w.safetensors", "123")
    _write(qd / "info.json", "{}" * 100)
    assert model_bytes(ModelEntry("unet", "fp", "fp", "FP32", fp)) == 5
    assert model_bytes(ModelEntry("unet", "naive", "naive", "W8A8", fp, qd)) == 3


def test_save_grid_layout_and_values(tmp_path):
    from PIL import Image

    imgs = torch.stack([torch.full((1, 8, 8), v) for v in (-1.0, 1.0, 0.0)])
    save_grid(imgs, tmp_path / "g" / "grid.png", nrow=2, scale=2)
    img = Image.open(tmp_path / "g" / "grid.png")
    # 2 columns x 2 rows of 8x8 tiles with 1-pixel borders, upscaled 2x
    assert img.size == ((2 * 9 + 1) * 2, (2 * 9 + 1) * 2)
    px = img.load()
    assert px[2 * 1, 2 * 1] == 0 and px[2 * 10, 2 * 1] == 255 and px[2 * 1, 2 * 10] == 128
    assert px[0, 0] == 255  # border


def test_evaluate_all_reuses_cached_rows_without_building_evaluators(tmp_path, monkeypatch):
    """A model whose key is in the previous output's cache is copied, not evaluated: with empty evaluator
    and data folders, any attempt to evaluate would fail."""
    import pipeline.evaluation as ev

    monkeypatch.chdir(tmp_path)
    fp = tmp_path / "fp" / "unet"
    _write(fp / "model.safetensors", "fp-weights")
    data_dir, evaluators_dir, out = tmp_path / "data", tmp_path / "evaluators", tmp_path / "out"
    data_dir.mkdir()
    evaluators_dir.mkdir()
    cfg, samp, diff = EvalConfig(n_samples=4, grid_size=1), SamplingConfig(steps=2), DiffusionConfig()
    entries = [ModelEntry("unet", "fp", "fp", "FP32", fp)]
    context = ev.evaluation_context(cfg, diff, samp, data_dir, evaluators_dir)
    key = entry_key(entries[0], context)
    row = {"key": key, "fid": 1.5, "accuracy": 0.9, "backbone": "unet"}
    _write(out / "cache" / f"{key}.json", json.dumps(row))
    save_grid(torch.zeros(1, 1, 8, 8), out / "cache" / f"{key}.png", nrow=1)
    from safetensors.torch import save_file

    from pipeline.io import data_hash

    save_file({"images": torch.zeros(4, 1, 8, 8), "features": torch.zeros(4, 3)}, str(out / "cache" / f"{key}.safetensors"))
    _write(out / "cache" / f"{key}-floor.json", json.dumps({"fid": 1.6}))
    ref_key = data_hash({"context": context, "what": "reference"})[:24]
    _write(out / "cache" / f"reference-{ref_key}.json", json.dumps({"real": {"fid_mean": 0.5}}))
    save_file({"features": torch.zeros(5, 3)}, str(out / "cache" / f"reference-{ref_key}.safetensors"))

    def no_evaluator(*a, **k):
        raise AssertionError("a cached model was evaluated again")

    monkeypatch.setattr(ev, "Evaluator", no_evaluator)
    failed = [{"backbone": "unet", "family": "mpq", "variant": "x", "setting": "W2A4", "status": "failed",
               "error": "E"}]
    rows = evaluate_all(cfg, diff, samp, TrackingConfig(), entries, failed, [], data_dir, evaluators_dir, out)
    row = {**row, "family": "fp", "variant": "fp", "setting": "FP32", "seed": 0}  # the entry's identity
    assert rows == [row]
    results = json.loads((out / "results.json").read_text())
    assert {k: results[k] for k in ("rows", "failed", "tables")} == {"rows": [row], "failed": failed, "tables": []}
    assert results["noise_floor"] == {"seed": {"unet": {"fid": 1.6}}, "real": {"fid_mean": 0.5}}
    assert (out / "grids" / f"{entries[0].slug}.png").exists()
    assert (out / "samples" / f"{entries[0].slug}.safetensors").exists() and (out / "reference.safetensors").exists()
    # a changed model misses the cache and would be evaluated
    _write(fp / "model.safetensors", "new weights")
    with pytest.raises(AssertionError, match="evaluated again"):
        evaluate_all(cfg, diff, samp, TrackingConfig(), entries, [], [], data_dir, evaluators_dir, out)
    assert json.loads((out / "results.json").read_text())["rows"] == [row]  # the old output survives


def test_identical_models_share_a_cached_evaluation_but_keep_their_own_identity(tmp_path, monkeypatch):
    """Two entries with the same model files (TMPQ-DM picks one configuration for two budgets) share one
    cache key; a cached row still takes its setting, seed and info.json fields from its own entry."""
    import pipeline.evaluation as ev
    from safetensors.torch import save_file

    from pipeline.io import data_hash

    monkeypatch.chdir(tmp_path)
    fp = tmp_path / "fp" / "unet"
    _write(fp / "model.safetensors", "fp-weights")
    data_dir, evaluators_dir, out = tmp_path / "data", tmp_path / "evaluators", tmp_path / "out"
    data_dir.mkdir()
    evaluators_dir.mkdir()
    entries = [ModelEntry("unet", "fp", "fp", "FP32", fp)]
    for setting, seconds in (("W4A4", 1.0), ("W6A6", 2.0)):
        q = tmp_path / "q" / setting
        _write(q / "packed.safetensors", "same packed model")
        _write(q / "info.json", json.dumps({"method_seconds": seconds, "peak_memory_mb": 10.0 * seconds}))
        entries.append(ModelEntry("unet", "tmpq", "tmpq", setting, fp, quant_dir=q, seed=2))
    cfg, samp, diff = EvalConfig(n_samples=4, grid_size=1), SamplingConfig(steps=2), DiffusionConfig()
    context = ev.evaluation_context(cfg, diff, samp, data_dir, evaluators_dir)
    keys = [entry_key(e, context) for e in entries]
    assert keys[1] == keys[2]
    cached = {keys[0]: {"key": keys[0], "fid": 1.5, "accuracy": 0.9, "backbone": "unet", "family": "fp"},
              # as the last writer of a previous run left it: the W6A6 entry's identity and timing
              keys[1]: {"key": keys[1], "fid": 7.0, "accuracy": 0.8, "backbone": "unet", "family": "tmpq",
                        "variant": "tmpq", "setting": "W6A6", "seed": 2, "method_seconds": 2.0, "method_peak_mb": 20.0}}
    for key, row in cached.items():
        _write(out / "cache" / f"{key}.json", json.dumps(row))
        save_grid(torch.zeros(1, 1, 8, 8), out / "cache" / f"{key}.png", nrow=1)
        save_file({"images": torch.zeros(4, 1, 8, 8), "features": torch.zeros(4, 3)},
                  str(out / "cache" / f"{key}.safetensors"))
    _write(out / "cache" / f"{keys[0]}-floor.json", json.dumps({"fid": 1.6}))
    ref_key = data_hash({"context": context, "what": "reference"})[:24]
    _write(out / "cache" / f"reference-{ref_key}.json", json.dumps({"real": {"fid_mean": 0.5}}))
    save_file({"features": torch.zeros(5, 3)}, str(out / "cache" / f"reference-{ref_key}.safetensors"))

    def no_evaluator(*a, **k):
        raise AssertionError("a cached model was evaluated again")

    monkeypatch.setattr(ev, "Evaluator", no_evaluator)
    rows = evaluate_all(cfg, diff, samp, TrackingConfig(), entries, [], [], data_dir, evaluators_dir, out)
    got = {r["setting"]: (r["seed"], r["fid"], r["method_seconds"], r["method_peak_mb"]) for r in rows[1:]}
    assert got == {"W4A4": (2, 7.0, 1.0, 10.0), "W6A6": (2, 7.0, 2.0, 20.0)}
