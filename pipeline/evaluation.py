"""One evaluation protocol for every model.

Every model — FP or quantized, any method — draws ``eval.n_samples`` images from the *same* initial
noise and the *same* balanced labels (so images are paired across models), with the same sampler,
and is scored by the same evaluators against the same held-out reference set:

- FID (torchmetrics, features of the domain classifier by default; standard Inception features or
  clean-fid when configured),
- conditional accuracy (the classifier's agreement with the requested class),
- CLIP score (torchmetrics ``CLIPScore``; the embedded tiny CLIP by default),
- HPSv2 (only when a local checkpoint is configured; otherwise skipped with the reason recorded),
- BitOPs (MACs x b_w x b_a summed over all sampling steps), model bytes on disk, seconds per image,
- paired fidelity to the FP model's images of the same noise (PSNR, SSIM, feature distance;
  :mod:`pipeline.metrics.paired`).

FID's reference statistics come from all real images by default (``eval.fid.reference: all``; or the
held-out split). Per model, the stage keeps the per-sample arrays (FID features, paired metrics) in
``samples/<slug>.safetensors`` and the reference features in ``reference.safetensors``, so the report
can bootstrap over samples and method seeds (:mod:`pipeline.metrics.stats`). ``results.json`` also
carries the noise floor: FID of the FP model sampled from other noise (``eval.seed +
floor_seed_offset``), and real-vs-real FID of ``n_samples`` real images against the statistics of the
other real images over ``floor_real_splits`` random disjoint splits.

Which models exist comes from the method families' manifests (:func:`discover_entries`). Results are
cached by content (:func:`evaluate_all`): the key hashes the model files, the evaluation / sampling
params, the evaluators, the reference data and the library code, so a re-run only evaluates what changed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .io import TIMING_SUFFIX, data_hash, split_timings, tree_hash, untracked

log = logging.getLogger("pipeline")


@dataclass
class ModelEntry:
    backbone: str
    family: str  # "fp" for the full-precision model
    variant: str  # "fp" for the full-precision model
    setting: str  # "FP32" for the full-precision model
    fp_dir: Path
    quant_dir: Optional[Path] = None
    seed: int = 0  # the method seed of a quantized model

    @property
    def row(self) -> str:
        """The results-table row this model belongs to (its method seeds are aggregated there)."""
        return f"{self.backbone}/{self.family}/{self.variant}/{self.setting}"

    @property
    def label(self) -> str:
        return self.row if self.quant_dir is None else f"{self.row}#seed{self.seed}"

    @property
    def slug(self) -> str:
        base = f"{self.backbone}__{self.family}__{self.variant}__{self.setting}"
        return base if self.quant_dir is None else f"{base}__seed{self.seed}"


def entry_key(entry: ModelEntry, context: dict[str, Any]) -> str:
    parts = {"fp": tree_hash(entry.fp_dir), "context": context}
    if entry.quant_dir is not None:
        # the model files only: not info.json (the job's metadata) nor the side files (timings)
        parts["quant"] = [tree_hash(p) for p in sorted(Path(entry.quant_dir).glob("*"))
                          if p.is_file() and p.name != "info.json" and not untracked(p)]
    return data_hash(parts)[:24]


def entry_fields(entry: ModelEntry) -> dict[str, Any]:
    """The fields of a row that belong to the entry, not to its model files: its identity and what its
    ``info.json`` says about the method. Two entries can hold identical files (e.g. TMPQ-DM picking the same
    configuration for two budgets) and so share one cached evaluation; these fields are never taken from it."""
    out: dict[str, Any] = {"backbone": entry.backbone, "family": entry.family, "variant": entry.variant,
                           "setting": entry.setting, "seed": entry.seed}
    info_file = Path(entry.quant_dir or "") / "info.json"
    if entry.quant_dir is not None and info_file.exists():
        from .runner import read_job_info

        info = read_job_info(entry.quant_dir)
        out["method_seconds"] = float(info.get("method_seconds", 0.0))
        peak = info.get("peak_memory_mb", (info.get("info") or {}).get("peak_memory_mb"))  # runner, all families
        out["method_peak_mb"] = float(peak) if isinstance(peak, (int, float)) else None
        cov = (info.get("info") or {}).get("coverage")  # share of weights stored quantized (e.g. peers)
        out["coverage"] = float(cov) if isinstance(cov, (int, float)) else None
    return out


def evaluation_context(cfg, diffusion, sampling, data_dir: Path, evaluators_dir: Path) -> dict[str, Any]:
    """Everything besides the model files that decides an evaluation's result (part of every entry key):
    the protocol params, the evaluators, the reference data and the code an evaluation can run (this module's
    import closure, :func:`pipeline.codedeps.code_key`: not the report, the search or a family's module --
    a quantized model's own code is in its ``info.json`` key, part of the model folder's hash)."""
    from .codedeps import code_key
    from .config import to_dict

    protocol = {k: v for k, v in to_dict(cfg).items() if k != "n_workers"}  # n_workers changes no result
    return {"eval": protocol, "sampling": to_dict(sampling), "diffusion": to_dict(diffusion),
            "evaluators": tree_hash(evaluators_dir), "data": tree_hash(data_dir),
            "code": code_key(__file__)}


LOADER_FILE = "loader.json"  # a model folder's own loader: {"loader": "pipeline.<module>:<fn>", "files": [...]}


def _folder_loader(quant_dir: Optional[Path]) -> Optional[dict]:
    f = Path(quant_dir) / LOADER_FILE if quant_dir is not None else None
    if f is None or not f.exists():
        return None
    from .io import read_json

    spec = read_json(f)
    if not str(spec.get("loader", "")).startswith("pipeline."):
        raise ValueError(f"{f}: 'loader' must name a function of the pipeline package, got {spec.get('loader')!r}")
    return spec


def model_bytes(entry: ModelEntry) -> int:
    """Bytes on disk of what is needed to run the model (a folder loader's own files, when it lists them)."""
    if entry.quant_dir is not None:
        files = (_folder_loader(entry.quant_dir) or {}).get("files")
        paths = [Path(entry.quant_dir) / n for n in files] if files else Path(entry.quant_dir).glob("*.safetensors")
        return sum(p.stat().st_size for p in paths)
    return sum(p.stat().st_size for p in Path(entry.fp_dir).rglob("*.safetensors"))


def load_entry(entry: ModelEntry, device) -> Any:
    from .models import load_backbone

    backbone = load_backbone(entry.fp_dir, device=device)
    custom = _folder_loader(entry.quant_dir)
    if custom is not None:  # a model stored in another tool's format names its loader (net, folder, device)
        import importlib

        module, fn = custom["loader"].split(":")
        backbone.net = getattr(importlib.import_module(module), fn)(backbone.net, entry.quant_dir, device)
    elif entry.quant_dir is not None:
        from .quant.packing import load_quantized

        backbone.net = load_quantized(backbone.net, entry.quant_dir)
    backbone.eval()
    return backbone


def model_timesteps(entry: ModelEntry) -> Optional[list[int]]:
    """A quantized model's own timestep subsequence (``sampling.json`` beside it: TMPQ-DM rows), or None."""
    f = Path(entry.quant_dir) / "sampling.json" if entry.quant_dir is not None else None
    if f is None or not f.exists():
        return None
    from .io import read_json

    return [int(t) for t in read_json(f, "model sampling")["timesteps"]]


def save_grid(images: torch.Tensor, path: Path, nrow: int, scale: int = 4) -> None:
    """Save images in [-1, 1] as one PNG grid (nearest-neighbour upscaled so 8x8 digits are visible)."""
    import numpy as np
    from PIL import Image

    imgs = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = imgs.shape
    ncol = nrow
    rows = (n + ncol - 1) // ncol
    pad = 1
    canvas = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = (
            imgs[i].permute(1, 2, 0).numpy())
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


class Evaluator:
    """Holds the evaluators and the reference statistics; evaluates one model at a time."""

    def __init__(self, cfg, diffusion, sampling, data_dir: Path, evaluators_dir: Path, device) -> None:
        from . import data
        from .metrics.clip import CLIPScoreMetric
        from .metrics.fid import FIDMetric
        from .train.classifier import load_classifier

        self.cfg, self.diffusion, self.sampling, self.device = cfg, diffusion, sampling, device
        meta = data.load_meta(data_dir)
        self.class_names = list(meta["class_names"])
        self.real_x = reference_images(data_dir, "all")
        ref_x = self.real_x if cfg.fid.reference == "all" else reference_images(data_dir, "heldout")
        self.classifier = load_classifier(Path(evaluators_dir) / "classifier").to(device).eval()
        self.fid = FIDMetric(classifier=self.classifier, backend=cfg.fid.backend,
                             inception_weights=cfg.fid.inception_weights, device=device)
        self.fid.set_reference(ref_x)
        self.reference_features = self.fid.features(ref_x)
        clip_dir = cfg.clip.model_dir or str(Path(evaluators_dir) / "clip")
        self.clip = CLIPScoreMetric(clip_dir, device=device)
        self.hps = None
        self.hps_reason = "eval.hps.checkpoint is not set (HPSv2 needs local weights)"
        if cfg.hps.checkpoint:
            from .metrics.hps import HPSv2Metric

            self.hps = HPSv2Metric(cfg.hps.checkpoint, tokenizer_dir=cfg.hps.tokenizer_dir or clip_dir,
                                   device=device)
            self.hps_reason = ""

    def sample(self, backbone, seed: int, timesteps=None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``eval.n_samples`` images from the noise of ``seed`` and the balanced labels; (images, labels, s).
        ``timesteps``: the model's own timestep subsequence (a TMPQ-DM row), else the ``sampling`` schedule."""
        from .sampling import eval_labels, initial_noise, sample

        n = self.cfg.n_samples
        noise = initial_noise(n, backbone.sample_shape, seed)
        labels = eval_labels(n, backbone.num_classes)
        images = []
        t0 = time.time()
        for i in range(0, n, self.cfg.batch_size):
            images.append(sample(backbone, noise[i:i + self.cfg.batch_size].to(self.device),
                                 labels[i:i + self.cfg.batch_size].to(self.device),
                                 self.diffusion, self.sampling, timesteps=timesteps).cpu())
        return torch.cat(images), labels, time.time() - t0

    def evaluate(self, entry: ModelEntry, fp_pair: Optional[dict] = None
                 ) -> tuple[dict[str, Any], torch.Tensor, dict[str, torch.Tensor]]:
        """(row, images, per-sample arrays) of one model. ``fp_pair``: the FP model's arrays of the same
        backbone (``images``, ``features``), for the paired metrics (none for the FP model itself)."""
        from .metrics.accuracy import conditional_accuracy
        from .metrics.paired import paired_metrics
        from .quant.cost import bitops, count_macs
        from .sampling import eval_labels, initial_noise

        backbone = load_entry(entry, self.device)
        n = self.cfg.n_samples
        timesteps = model_timesteps(entry)
        n_steps = len(timesteps) if timesteps is not None else self.sampling.steps
        images, labels, seconds = self.sample(backbone, self.cfg.seed, timesteps)
        features = self.fid.features(images)
        arrays = {"images": images.contiguous(), "features": features.contiguous()}

        x0 = initial_noise(2, backbone.sample_shape, self.cfg.seed).to(self.device)
        t0_, y0 = torch.full((2,), 500, device=self.device), eval_labels(2, backbone.num_classes).to(self.device)
        with torch.no_grad():
            macs = count_macs(backbone.net, lambda: backbone(x0, t0_, y0))
        per_image_macs = {k: v / 2 for k, v in macs.items()}
        captions, by_class = self.captions(backbone, labels)
        row: dict[str, Any] = {
            "backbone": entry.backbone, "family": entry.family, "variant": entry.variant,
            "setting": entry.setting, "seed": entry.seed,
            "fid": self.fid.compute(images),
            "accuracy": (conditional_accuracy(self.classifier, images.to(self.device), labels.to(self.device))
                         if by_class else None),
            "clip_score": self.clip.compute(images, captions) if captions is not None else None,
            "bitops_g": bitops(backbone.net, per_image_macs, n_steps) / 1e9,
            "macs_m": sum(per_image_macs.values()) * n_steps / 1e6,
            "n_steps": n_steps,
            "model_bytes": model_bytes(entry),
            "sec_per_image": seconds / n,
            "n_samples": n,
        }
        if fp_pair is not None:
            paired = paired_metrics(images, fp_pair["images"], features, fp_pair["features"])
            arrays.update({k: v.contiguous() for k, v in paired.items()})
            row.update({k: float(v.double().mean()) for k, v in paired.items()})
        row.update(entry_fields(entry))
        if self.hps is not None and captions is not None:
            row["hps"] = self.hps.compute(images, captions)
        else:
            row["hps"] = None
            row["hps_skipped"] = self.hps_reason or "an unconditional model has no prompt to score against"
        return row, images, arrays

    def captions(self, backbone, labels: torch.Tensor) -> tuple[Optional[list[str]], bool]:
        """(the text each image is scored against by CLIP / HPSv2, whether its label is a class of the
        dataset): a text model loaded with a prompt file is scored against the prompt of its label; a model
        conditioned on the dataset's classes against ``caption(class name)``, and its conditional accuracy is
        measured; an unconditional model against nothing (its CLIP score, HPSv2 and accuracy stay empty)."""
        from .data import caption

        prompts = getattr(backbone, "prompts", None)
        if prompts is not None:
            return [prompts[int(k)] for k in labels], False
        if backbone.conditioning != "none" and backbone.num_classes == len(self.class_names):
            return [caption(self.class_names[int(k)]) for k in labels], True
        return None, False

    def seed_floor(self, entry: ModelEntry, fp_arrays: dict) -> dict[str, float]:
        """The FP model sampled from other noise (``eval.seed + floor_seed_offset``): its FID, the FID
        between its images and those of ``eval.seed``, and its paired metrics to them — what a "perfect"
        quantized model that only changed the noise would score."""
        from .metrics.paired import paired_metrics
        from .metrics.stats import fid_between

        backbone = load_entry(entry, self.device)
        images, _, _ = self.sample(backbone, self.cfg.seed + self.cfg.floor_seed_offset)
        features = self.fid.features(images)
        paired = paired_metrics(images, fp_arrays["images"], features, fp_arrays["features"])
        return {"fid": self.fid.compute(images), "fid_to_fp": fid_between(features.numpy(), fp_arrays["features"].numpy()),
                **{k: float(v.double().mean()) for k, v in paired.items()}}

    def real_floor(self) -> dict[str, Any]:
        """Real-vs-real FID at the protocol's N: ``n_samples`` real images (capped at half of them)
        against the statistics of the remaining real images, over ``floor_real_splits`` seeded splits."""
        import numpy as np

        from .metrics.stats import Reference

        k = self.cfg.floor_real_splits
        if k == 0:
            return {}
        real = self.reference_features if self.cfg.fid.reference == "all" else self.fid.features(self.real_x)
        feats = real.numpy()
        n = min(self.cfg.n_samples, feats.shape[0] // 2)
        rng = np.random.default_rng(self.cfg.seed)
        vals = []
        for _ in range(k):
            perm = rng.permutation(feats.shape[0])
            vals.append(Reference.from_features(feats[perm[n:]]).fid_of(feats[perm[:n]]))
        return {"n": int(n), "rest": int(feats.shape[0] - n), "splits": k, "fid_mean": float(np.mean(vals)),
                "fid_min": float(np.min(vals)), "fid_max": float(np.max(vals))}


def reference_images(data_dir: Path, which: str) -> torch.Tensor:
    """The real images FID compares against: ``all`` (training + held-out split) or ``heldout``."""
    from . import data

    ref_x, _ = data.load_split(data_dir, "reference")
    if which == "heldout":
        return ref_x
    if which != "all":
        raise ValueError(f"eval.fid.reference: {which!r} is not allowed (allowed values: all, heldout)")
    train_x, _ = data.load_split(data_dir, "train")
    return torch.cat([train_x, ref_x])


def discover_entries(families: list[str], backbones: list[str], fp_root: Path, quant_root: Path):
    """Every model to evaluate: the FP backbones, then each listed family's models as its manifest
    (``<quant_root>/<family>/manifest.json``) lists them. Returns ``(entries, failed, tables)``: failed
    jobs (as rows with their error) and the families' comparison-table declarations."""
    from .runner import read_manifest

    entries = [ModelEntry(b, "fp", "fp", "FP32", Path(fp_root) / b) for b in backbones]
    failed, tables = [], []
    for fam in families:
        manifest = read_manifest(Path(quant_root) / fam)
        tables += manifest.get("tables", [])
        for m in manifest["models"]:
            if m["backbone"] not in backbones:
                continue
            if m["status"] != "ok":
                failed.append({"backbone": m["backbone"], "family": fam, "variant": m["variant"],
                               "setting": m["setting"], "status": m["status"], "error": m.get("error", "")})
                continue
            entries.append(ModelEntry(m["backbone"], fam, m["variant"], m["setting"], Path(fp_root) / m["backbone"],
                                      Path(quant_root) / fam / m["path"], int(m.get("seed", 0))))
    return entries, failed, tables


def _cached(old_cache: Path, stem: str, exts: tuple[str, ...] = (".json", ".png", ".safetensors")) -> bool:
    """Whether the previous output's cache holds every file ``stem + ext``."""
    return all((old_cache / f"{stem}{ext}").exists() for ext in exts)


def _evaluate_many(entries: list, evaluator_args: tuple, fp_arrays: dict, n_workers: int, local):
    """(row, images, arrays) of every entry, in order: ``n_workers`` spawned single-threaded processes
    (:class:`pipeline.parallel.WorkerPool`), or this process (``local()`` -> its Evaluator) when one
    worker suffices."""
    from .parallel import WorkerPool

    n = 1 if len(entries) <= 1 else min(n_workers, len(entries))
    with WorkerPool(n, Evaluator, evaluator_args, local=local) as pool:
        yield from pool.imap("evaluate", [(e, fp_arrays.get(e.backbone)) for e in entries])


def evaluate_all(cfg, diffusion, sampling, tracking, entries, failed, tables, data_dir: Path, evaluators_dir: Path,
                 out: Path) -> list[dict]:
    """Evaluate ``entries`` into ``out``: ``results.json`` (rows, failed jobs, tables, noise floor),
    ``grids/``, ``samples/`` (per-sample arrays), ``reference.safetensors`` and a content-addressed
    ``cache/``. A model whose key (its files, the protocol params, evaluators, reference data, library
    code) is in the previous output's cache is not re-evaluated. The FP model of each backbone comes
    first: its images are the pairs of every other model's. One MLflow run for the stage, one nested
    run per newly evaluated model."""
    import shutil

    import mlflow
    from safetensors.torch import load_file

    from .config import to_dict
    from .io import atomic_dir, read_json, save_safetensors, write_json
    from .tracking import stage_run

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(1)  # as the workers: the numbers do not depend on eval.n_workers or the core count
    context = evaluation_context(cfg, diffusion, sampling, data_dir, evaluators_dir)
    old_cache = Path(out) / "cache"
    entries = sorted(entries, key=lambda e: e.quant_dir is not None)  # FP models first (stable)
    stage_params = {"eval": to_dict(cfg), "sampling": to_dict(sampling), "n_models": len(entries)}
    rows: list[dict] = []
    floor: dict[str, Any] = {}
    evaluator = None

    def get_evaluator():
        nonlocal evaluator
        if evaluator is None:
            evaluator = Evaluator(cfg, diffusion, sampling, Path(data_dir), Path(evaluators_dir), device)
        return evaluator

    with stage_run("evaluate", params=stage_params, experiment=tracking.experiment, uri=tracking.uri,
                   inputs=[data_dir, evaluators_dir], log_file=Path("data") / "logs" / "evaluate.log") as run_:
        with atomic_dir(out) as tmp:
            for d in ("cache", "grids", "samples"):
                (tmp / d).mkdir()
            fp_arrays: dict[str, dict] = {}
            by_index: dict[int, dict] = {}
            pending = []

            def store(i, e, key, row, images, arrays):
                row["key"] = key
                save_grid(images[: cfg.grid_size * cfg.grid_size], tmp / "cache" / f"{key}.png", nrow=cfg.grid_size)
                save_safetensors(arrays, str(tmp / "cache" / f"{key}.safetensors"))
                clean, timing = split_timings(row)  # the clock readings go to an untracked side file
                write_json(tmp / "cache" / f"{key}.json", clean)
                write_json(tmp / "cache" / f"{key}{TIMING_SUFFIX}", timing)
                tags = {"stage": "evaluate", "backbone": e.backbone, "family": e.family, "variant": e.variant,
                        "setting": e.setting, "seed": e.seed, "eval_key": key}
                with mlflow.start_run(run_name=f"evaluate@{e.label}", nested=True, tags=tags):
                    mlflow.log_params({**{k: v for k, v in tags.items() if k != "stage"},
                                       "n_samples": cfg.n_samples})
                    mlflow.log_metrics({k: float(v) for k, v in row.items()
                                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
                    mlflow.log_artifact(str(tmp / "cache" / f"{key}.png"), "samples")
                log.info("[%d/%d] %s: FID %.3f, accuracy %.3f, CLIP %.2f, PSNR vs FP %s, %.4f s/image", i,
                         len(entries), e.label, row["fid"], row["accuracy"], row["clip_score"],
                         f"{row['psnr']:.2f} dB" if "psnr" in row else "-", row["sec_per_image"])
                by_index[i] = row

            # pass 1, in this process: the FP models (their images pair every other model's) and cached results
            for i, e in enumerate(entries, 1):
                key = entry_key(e, context)
                if e.quant_dir is not None and e.backbone not in fp_arrays:
                    raise ValueError(f"{e.label}: no FP model of backbone {e.backbone!r} to pair its images with")
                if _cached(old_cache, key):
                    timing_file = old_cache / f"{key}{TIMING_SUFFIX}"
                    timing = read_json(timing_file) if timing_file.exists() else {}
                    row = {**read_json(old_cache / f"{key}.json"), **timing, **entry_fields(e)}
                    for ext in (".json", ".png", ".safetensors", TIMING_SUFFIX):
                        if (old_cache / f"{key}{ext}").exists():
                            shutil.copy(old_cache / f"{key}{ext}", tmp / "cache" / f"{key}{ext}")
                    log.info("[%d/%d] %s: cached (FID %.3f, acc %.3f)", i, len(entries), e.label, row["fid"],
                             row["accuracy"])
                    by_index[i] = row
                elif e.quant_dir is not None:
                    pending.append((i, e, key))
                    continue
                else:
                    store(i, e, key, *get_evaluator().evaluate(e, None))
                if e.quant_dir is None:
                    fp_arrays[e.backbone] = load_file(str(tmp / "cache" / f"{key}.safetensors"))
                    floor_key = f"{key}-floor"
                    if (old_cache / f"{floor_key}.json").exists():
                        floor[e.backbone] = read_json(old_cache / f"{floor_key}.json")
                    else:
                        floor[e.backbone] = get_evaluator().seed_floor(e, fp_arrays[e.backbone])
                        log.info("noise floor %s: FP at another noise seed: FID %.3f (vs %.3f), PSNR %.2f dB",
                                 e.backbone, floor[e.backbone]["fid"], by_index[i]["fid"], floor[e.backbone]["psnr"])
                    write_json(tmp / "cache" / f"{floor_key}.json", floor[e.backbone])
            # pass 2: the new quantized models, in eval.n_workers processes (results stored in entry order)
            if pending:
                log.info("evaluate: %d new models in %d worker process(es)", len(pending),
                         min(cfg.n_workers, len(pending)))
            args = (cfg, diffusion, sampling, Path(data_dir), Path(evaluators_dir), device)
            for (i, e, key), result in zip(pending, _evaluate_many([p[1] for p in pending], args, fp_arrays,
                                                                     cfg.n_workers, get_evaluator)):
                store(i, e, key, *result)
            for i, e in enumerate(entries, 1):
                key = by_index[i]["key"] if "key" in by_index[i] else entry_key(e, context)
                shutil.copy(tmp / "cache" / f"{key}.png", tmp / "grids" / f"{e.slug}.png")
                shutil.copy(tmp / "cache" / f"{key}.safetensors", tmp / "samples" / f"{e.slug}.safetensors")
                rows.append(by_index[i])
            ref_key = data_hash({"context": context, "what": "reference"})[:24]
            if _cached(old_cache, f"reference-{ref_key}", (".json", ".safetensors")):
                for ext in (".json", ".safetensors"):
                    shutil.copy(old_cache / f"reference-{ref_key}{ext}", tmp / "cache" / f"reference-{ref_key}{ext}")
            else:
                ev = get_evaluator()
                write_json(tmp / "cache" / f"reference-{ref_key}.json", {"real": ev.real_floor()})
                save_safetensors({"features": ev.reference_features.contiguous()},
                          str(tmp / "cache" / f"reference-{ref_key}.safetensors"))
            shutil.copy(tmp / "cache" / f"reference-{ref_key}.safetensors", tmp / "reference.safetensors")
            real = read_json(tmp / "cache" / f"reference-{ref_key}.json")["real"]
            split = [split_timings(r) for r in rows]
            write_json(tmp / f"results{TIMING_SUFFIX}", {"rows": [t for _, t in split]})  # same order as rows
            write_json(tmp / "results.json", {"rows": [c for c, _ in split], "failed": failed, "tables": tables,
                                              "noise_floor": {"seed": floor, "real": real},
                                              "protocol": {"n_samples": cfg.n_samples, "seed": cfg.seed,
                                                           "fid_reference": cfg.fid.reference,
                                                           "floor_seed": cfg.seed + cfg.floor_seed_offset}})
        run_.log_artifact(Path(out) / "results.json")
    return rows
