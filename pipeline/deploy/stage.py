"""The ``export`` stage: every ``export.rows`` entry exported, run in ONNX Runtime and measured against the
fake-quant model the results table scored.

For each row (``backbone/family/variant/setting``, method seed 0; variant ``best`` resolved from the
evaluate stage's results by :func:`resolve_rows`):

- the packed model is loaded and planned (:func:`pipeline.deploy.onnx_export.plan_model`); with
  ``export.fallback: error`` a layer that would run as float fails the row, naming the layer, before the
  export;
- the quantized graph is written (:func:`pipeline.deploy.onnx_export.export_onnx`) to ``<key>/quantized``, and
  the FP graph of its backbone (the "ORT float32" reference: the same exporter, no quantized layers) once per
  backbone to ``fp32-<key of the FP model>``;
- fidelity, single-threaded so that the numbers do not depend on the machine's core count: the deployed
  model samples the evaluation protocol's noise and labels (``eval.n_samples``, ``eval.seed``, the same loop
  and batches as the evaluate stage), and its images are compared with the fake-quant model's images that
  the evaluate stage stored (PSNR per image, max |difference|); FID, conditional accuracy and CLIP score
  of the deployed images with the evaluate stage's evaluators; the denoiser's max |deployed - fake-quant|
  on the first ``export.calib_inputs`` calibration inputs. These go to ``<key>/export.json`` and the index
  ``rows.json``;
- speed and memory, on every core (``export.threads``; :func:`pipeline.deploy.measure.measure_speed`):
  seconds per denoiser call at each ``export.batches`` size with one timestep per call (PyTorch float32
  eager, PyTorch fake-quant, the FP32 graph in ORT, the deployed graph), a whole sampling run of
  ``max(batches)`` images, and the peak RSS of a fresh process making one call at the largest batch. Clock readings differ between identical runs, so they
  go to ``<key>/measure.timing.json``, which no output hash includes (``.dvcignore``).

Each row is cached under a content key (the model files, the export / evaluation / sampler params, the
evaluators, the reference data and this module's import closure), as the evaluate stage caches: a rerun
with a changed row list computes only the new rows.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .layout import INDEX_FILE, MEASURE_FILE, RESULT_FILE

log = logging.getLogger("pipeline")

HIGHER_IS_BETTER = {"accuracy", "clip_score", "hps"}


def canonical_row(row: str) -> tuple[str, str, str, str]:
    """(backbone, family, variant, setting) with the setting spelled as the results spell it (``W8A8``)."""
    from ..config import parse_setting

    b, f, v, s = row.split("/")
    return b, f, v, parse_setting(s).name


def resolve_rows(rows: list[str], entries: list, results: list[dict], primary_metric: str) -> list[tuple[str, Any]]:
    """``[(row as written, ModelEntry of its method seed 0)]``. ``best``: among the family's variants at that
    backbone and setting in ``results`` (the evaluate stage's rows), the one with the best mean
    ``primary_metric`` over its method seeds (ties: the first variant name in sorted order). A row with no
    model (its job failed, or the results lack it) raises, naming ``export.rows[i]``."""
    import math

    from ..config import ConfigError

    by_row = {(e.backbone, e.family, e.variant, e.setting): e for e in entries
              if e.quant_dir is not None and e.seed == 0}
    out = []
    for i, row in enumerate(rows):
        b, f, v, s = canonical_row(row)
        if v == "best":
            scores: dict[str, list[float]] = {}
            for r in results:
                if (r.get("backbone"), r.get("family"), r.get("setting")) == (b, f, s):
                    val = r.get(primary_metric)
                    if isinstance(val, (int, float)) and math.isfinite(val):
                        scores.setdefault(r["variant"], []).append(float(val))
            if not scores:
                raise ConfigError(f"export.rows[{i}]: {row!r}: no evaluated {f} model at {b}/{s} to pick the best "
                                  f"from (report.primary_metric {primary_metric!r}); did its jobs fail?")
            sign = -1.0 if primary_metric in HIGHER_IS_BETTER else 1.0
            v = min(sorted(scores), key=lambda k: sign * sum(scores[k]) / len(scores[k]))
        entry = by_row.get((b, f, v, s))
        if entry is None:
            raise ConfigError(f"export.rows[{i}]: {row!r}: no quantized model {b}/{f}/{v}/{s} (method seed 0) in "
                              f"the run (its job failed or did not run: see data/quantized/{f}/manifest.json)")
        out.append((row, entry))
    return out


def check_fallback(plans: list, row: str, fallback: str) -> None:
    """With ``fallback: error``, a layer whose quantized weights would run as float raises naming it."""
    from ..config import ConfigError

    if fallback != "error":
        return
    for p in plans:
        if p.executes == "float" and p.w_bits is not None:
            raise ConfigError(f"export.fallback: 'error', but {row}: layer {p.name} has no kernel on the target "
                              f"({p.reason}); set export.fallback: float to run it on its decoded weight")


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "-"


def export_context(cfg, eval_cfg, diffusion, sampling, data_dir: Path, evaluators_dir: Path) -> dict:
    """What besides the model files decides a row's export and fidelity (part of its cache key)."""
    from ..codedeps import code_key
    from ..config import to_dict
    from ..evaluation import evaluation_context

    ctx = evaluation_context(eval_cfg, diffusion, sampling, data_dir, evaluators_dir)
    ctx["export"] = {k: v for k, v in to_dict(cfg).items() if k != "rows"}
    ctx["code"] = code_key(__file__)
    return ctx


def fidelity(row: str, entry, fake, dep, evaluator, eval_dir: Path, fake_row: dict, calib, calib_inputs: int
             ) -> tuple[dict, float]:
    """(deployed vs fake-quant, single-threaded (module docstring); seconds the deployed sampling took)."""
    from safetensors.torch import load_file

    from ..evaluation import model_timesteps
    from ..metrics.accuracy import conditional_accuracy
    from ..metrics.paired import psnr
    from .measure import denoiser_fidelity

    samples = eval_dir / "samples" / f"{entry.slug}.safetensors"
    if not samples.exists():
        raise FileNotFoundError(f"{samples} not found (the evaluate stage writes the fake-quant images of {row})")
    ref = load_file(str(samples))["images"]
    images, labels, seconds = evaluator.sample(dep, evaluator.cfg.seed, model_timesteps(entry))
    p = psnr(images, ref)
    captions, by_class = evaluator.captions(fake, labels)
    deployed = {"fid": evaluator.fid.compute(images),
                "accuracy": conditional_accuracy(evaluator.classifier, images, labels) if by_class else None,
                "clip_score": evaluator.clip.compute(images, captions) if captions is not None else None}
    n = min(calib_inputs, int(calib.x.shape[0]))
    den = denoiser_fidelity(fake, dep, calib.x[:n], calib.t[:n], None if calib.labels is None else calib.labels[:n])
    return {"images": int(images.shape[0]), "psnr_mean_db": float(p.mean()), "psnr_min_db": float(p.min()),
            "max_abs_image": float((images - ref).abs().max()), "identical_images": int((p >= 100).sum()),
            "denoiser_max_abs": den["max_abs"], "denoiser_ref_max_abs": den["ref_max_abs"],
            "calib_inputs": n, "deployed": deployed,
            "fake_quant": {k: fake_row.get(k) for k in ("fid", "accuracy", "clip_score")}}, seconds


def export_all(cfg, eval_cfg, report_cfg, diffusion, sampling, tracking, families: list[str], backbones: list[str],
               data_dir: Path, fp_root: Path, calib_root: Path, evaluators_dir: Path, quant_root: Path,
               eval_dir: Path, out: Path) -> list[dict]:
    """Export and measure every ``cfg.rows`` entry into ``out`` (module docstring); returns the index rows."""
    import mlflow

    from ..calibration import load_calibration
    from ..config import to_dict
    from ..evaluation import Evaluator, ModelEntry, discover_entries, entry_key, load_entry, model_timesteps
    from ..io import atomic_dir, data_hash, read_json, tree_hash, write_json
    from ..tracking import stage_run
    from .measure import measure_speed
    from .onnx_export import export_onnx, plan_model
    from .runtime import deployed_backbone, require_onnxruntime

    require_onnxruntime()
    results = read_json(eval_dir / "results.json", "evaluation results")["rows"]
    entries, _, _ = discover_entries(families, backbones, fp_root, quant_root)
    resolved = resolve_rows(cfg.rows, entries, results, report_cfg.primary_metric)
    fake_rows = {(r["backbone"], r["family"], r["variant"], r["setting"], int(r.get("seed", 0))): r for r in results}
    context = export_context(cfg, eval_cfg, diffusion, sampling, data_dir, evaluators_dir)
    old = Path(out)
    evaluator = None
    index: list[dict] = []
    fp_models: dict[str, Any] = {}
    fp_graphs: dict[str, tuple[Path, dict]] = {}

    def fp_model(entry):
        if entry.backbone not in fp_models:
            fp_models[entry.backbone] = load_entry(ModelEntry(entry.backbone, "fp", "fp", "FP32", entry.fp_dir), "cpu")
        return fp_models[entry.backbone]

    def fp_graph(entry, tmp: Path) -> tuple[Path, dict]:
        """The FP32 graph of the row's backbone (the "ORT float32" reference), once per backbone: every row of
        the backbone times against it. Kept for every backbone with a row, cached or not, so that the output
        is the same whichever rows a rerun recomputes."""
        if entry.backbone not in fp_graphs:
            name = "fp32-" + data_hash({"fp": tree_hash(entry.fp_dir), "code": context["code"]})[:24]
            if (old / name / "deploy.json").exists():
                shutil.copytree(old / name, tmp / name)
                info = read_json(tmp / name / "deploy.json")
            else:
                info = export_onnx(fp_model(entry), tmp / name)
            fp_graphs[entry.backbone] = (tmp / name, info)
        return fp_graphs[entry.backbone]

    params = {"export": to_dict(cfg), "n_rows": len(resolved)}
    with stage_run("export", params=params, experiment=tracking.experiment, uri=tracking.uri,
                   inputs=[quant_root, eval_dir / "results.json"], log_file=Path("data") / "logs" / "export.log"):
        with atomic_dir(out) as tmp:
            for i, (row, entry) in enumerate(resolved, 1):
                key = data_hash({"entry": entry_key(entry, context)})[:24]
                dst = tmp / key
                t0 = time.time()
                fp32_dir, fp_info = fp_graph(entry, tmp)
                if dst.exists() or (old / key / RESULT_FILE).exists():  # an earlier row named the same model
                    if not dst.exists():
                        shutil.copytree(old / key, dst)
                    result = read_json(dst / RESULT_FILE)
                    log.info("[%d/%d] export %s: cached (%s; %s; PSNR vs fake-quant %.2f dB)", i, len(resolved), row,
                             entry.label, result["executes_label"], result["fidelity"]["psnr_mean_db"])
                else:
                    fake = load_entry(entry, "cpu")
                    plans = plan_model(fake)
                    check_fallback(plans, row, cfg.fallback)
                    dst.mkdir()
                    info = export_onnx(fake, dst / "quantized")
                    torch.set_num_threads(1)  # fidelity: as the evaluate stage, independent of the core count
                    if evaluator is None:
                        evaluator = Evaluator(eval_cfg, diffusion, sampling, data_dir, evaluators_dir, "cpu")
                    dep = deployed_backbone(dst / "quantized", fake, threads=1)
                    calib = load_calibration(calib_root / entry.backbone)
                    fake_row = fake_rows.get((entry.backbone, entry.family, entry.variant, entry.setting, 0), {})
                    fid_, sample_seconds = fidelity(row, entry, fake, dep, evaluator, eval_dir, fake_row, calib,
                                                    cfg.calib_inputs)
                    result = {"row": row, "model": entry.label, "target": cfg.target,
                              "executes": info["executes"], "executes_label": info["executes_label"],
                              "one_timestep_per_call": info["one_timestep_per_call"],
                              "bytes": {"deployed": sum(info["bytes"].values()),
                                        "ort_fp32": sum(fp_info["bytes"].values()),
                                        "layers_stored": info["layer_bytes"]["stored"],
                                        "layers_fp32": info["layer_bytes"]["fp32"]},
                              "fidelity": fid_}
                    write_json(dst / RESULT_FILE, result)
                    measured = measure_speed(fake, fp_model(entry), dst / "quantized", fp32_dir, entry.fp_dir,
                                             batches=cfg.batches, repeats=cfg.repeats, threads=cfg.threads,
                                             diffusion=diffusion, sampling=sampling,
                                             timesteps=model_timesteps(entry))
                    measured["fidelity_sampling_seconds"] = sample_seconds
                    write_json(dst / MEASURE_FILE, measured)
                    log.info("[%d/%d] export %s (%s): %s; graph %.2f MB (FP32 graph %.2f MB); PSNR vs fake-quant "
                             "%.2f dB (min %.2f), FID %.3f (fake-quant %s); batch-%d call time: FP32 graph / deployed "
                             "%.2f, fake-quant / deployed %.2f (%.0f s)", i, len(resolved), row, entry.label,
                             info["executes_label"], result["bytes"]["deployed"] / 1e6,
                             result["bytes"]["ort_fp32"] / 1e6, fid_["psnr_mean_db"], fid_["psnr_min_db"],
                             fid_["deployed"]["fid"], _fmt(fake_row.get("fid")), measured["speedup"]["batch"],
                             measured["speedup"]["vs_ort_fp32"], measured["speedup"]["vs_torch_fake_quant"],
                             time.time() - t0)
                    with mlflow.start_run(run_name=f"export@{row}", nested=True,
                                          tags={"stage": "export", "row": row, "model": entry.label, "export_key": key}):
                        f = result["fidelity"]
                        mlflow.log_metrics({"psnr_vs_fake_quant_db": f["psnr_mean_db"],
                                            "psnr_min_db": f["psnr_min_db"],
                                            "denoiser_max_abs": f["denoiser_max_abs"],
                                            "fid_deployed": f["deployed"]["fid"],
                                            "deployed_bytes": float(result["bytes"]["deployed"]),
                                            "speedup_vs_ort_fp32": measured["speedup"]["vs_ort_fp32"],
                                            "speedup_vs_torch_fp32": measured["speedup"]["vs_torch_fp32"],
                                            **{f"executes_{k}": v for k, v in info["executes"].items()}})
                        mlflow.log_artifact(str(dst / "quantized" / "deploy.json"))
                index.append({"row": row, "key": key, **{k: v for k, v in result.items() if k != "row"}})
            write_json(tmp / INDEX_FILE, {"rows": index})
    return index

