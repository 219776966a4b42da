"""One evaluation protocol for every model.

Every model — FP or quantized, any method — draws ``eval.n_samples`` images from the *same* initial
noise and the *same* balanced labels (so images are paired across models), with the same sampler,
and is scored by the same evaluators against the same held-out reference set:

- FID (torchmetrics, features of the domain classifier by default; standard Inception features or
  clean-fid when configured),
- conditional accuracy (the classifier's agreement with the requested class),
- CLIP score (torchmetrics ``CLIPScore``; the embedded tiny CLIP by default),
- HPSv2 (only when a local checkpoint is configured; otherwise skipped with the reason recorded),
- BitOPs (MACs x b_w x b_a summed over all sampling steps), model bytes on disk, seconds per image.

Results are cached by content: the key hashes the model files, the evaluation / sampling params,
the evaluators, the reference data and the library code, so a re-run only evaluates what changed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .io import data_hash, tree_hash

log = logging.getLogger("pipeline")


@dataclass
class ModelEntry:
    backbone: str
    method: str  # "fp" for the full-precision model
    setting: str  # "FP32" for the full-precision model
    fp_dir: Path
    quant_dir: Optional[Path] = None
    family: str = "fp"  # which params section / stage produced it

    @property
    def label(self) -> str:
        return f"{self.backbone}/{self.method}/{self.setting}"

    @property
    def slug(self) -> str:
        return f"{self.backbone}__{self.method}__{self.setting}"


def code_hash(root: Path) -> str:
    """Hash of the library code: a code change invalidates cached evaluations."""
    return tree_hash(root / "pipeline")[:16]


def entry_key(entry: ModelEntry, context: dict[str, Any]) -> str:
    parts = {"fp": tree_hash(entry.fp_dir), "context": context}
    if entry.quant_dir is not None:
        parts["quant"] = tree_hash(entry.quant_dir)
    return data_hash(parts)[:24]


def model_bytes(entry: ModelEntry) -> int:
    """Bytes on disk of what is needed to run the model."""
    if entry.quant_dir is not None:
        return sum(p.stat().st_size for p in Path(entry.quant_dir).glob("*.safetensors"))
    return sum(p.stat().st_size for p in Path(entry.fp_dir).rglob("*.safetensors"))


def load_entry(entry: ModelEntry, device) -> Any:
    from .models import load_backbone

    backbone = load_backbone(entry.fp_dir, device=device)
    if entry.quant_dir is not None:
        from .quant.packing import load_quantized

        backbone.net = load_quantized(backbone.net, entry.quant_dir)
    backbone.eval()
    return backbone


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
        from .train.evaluators import load_classifier

        self.cfg, self.diffusion, self.sampling, self.device = cfg, diffusion, sampling, device
        meta = data.load_meta(data_dir)
        self.class_names = list(meta["class_names"])
        ref_x, _ = data.load_split(data_dir, "reference")
        self.classifier = load_classifier(Path(evaluators_dir) / "classifier").to(device).eval()
        self.fid = FIDMetric(classifier=self.classifier, backend=cfg.fid.backend,
                             inception_weights=cfg.fid.inception_weights, device=device)
        self.fid.set_reference(ref_x)
        clip_dir = cfg.clip.model_dir or str(Path(evaluators_dir) / "clip")
        self.clip = CLIPScoreMetric(clip_dir, device=device)
        self.hps = None
        self.hps_reason = "eval.hps.checkpoint is not set (HPSv2 needs local weights)"
        if cfg.hps.checkpoint:
            from .metrics.hps import HPSv2Metric

            self.hps = HPSv2Metric(cfg.hps.checkpoint, tokenizer_dir=cfg.hps.tokenizer_dir or clip_dir,
                                   device=device)
            self.hps_reason = ""

    def evaluate(self, entry: ModelEntry) -> tuple[dict[str, Any], torch.Tensor]:
        from .data import caption
        from .metrics.accuracy import conditional_accuracy
        from .quant.cost import bitops, count_macs
        from .sampling import eval_labels, initial_noise, sample

        backbone = load_entry(entry, self.device)
        n = self.cfg.n_samples
        noise = initial_noise(n, backbone.sample_shape, self.cfg.seed)
        labels = eval_labels(n, backbone.num_classes)
        images = []
        t0 = time.time()
        for i in range(0, n, self.cfg.batch_size):
            images.append(sample(backbone, noise[i:i + self.cfg.batch_size].to(self.device),
                                 labels[i:i + self.cfg.batch_size].to(self.device),
                                 self.diffusion, self.sampling).cpu())
        seconds = time.time() - t0
        images = torch.cat(images)

        x0, t0_, y0 = noise[:2].to(self.device), torch.full((2,), 500, device=self.device), labels[:2].to(self.device)
        with torch.no_grad():
            macs = count_macs(backbone.net, lambda: backbone(x0, t0_, y0))
        per_image_macs = {k: v / 2 for k, v in macs.items()}
        row: dict[str, Any] = {
            "backbone": entry.backbone, "method": entry.method, "setting": entry.setting,
            "family": entry.family,
            "fid": self.fid.compute(images),
            "accuracy": conditional_accuracy(self.classifier, images.to(self.device), labels.to(self.device)),
            "clip_score": self.clip.compute(images, [caption(self.class_names[int(k)]) for k in labels]),
            "bitops_g": bitops(backbone.net, per_image_macs, self.sampling.steps) / 1e9,
            "macs_m": sum(per_image_macs.values()) * self.sampling.steps / 1e6,
            "model_bytes": model_bytes(entry),
            "sec_per_image": seconds / n,
            "n_samples": n,
        }
        info_file = Path(entry.quant_dir or "") / "info.json"
        if entry.quant_dir is not None and info_file.exists():
            from .io import read_json

            info = read_json(info_file)
            row["method_seconds"] = sum(float(info.get(k, 0.0)) for k in ("init_seconds", "quantize_seconds",
                                                                            "qat_seconds"))
        if self.hps is not None:
            row["hps"] = self.hps.compute(images, [caption(self.class_names[int(k)]) for k in labels])
        else:
            row["hps"] = None
            row["hps_skipped"] = self.hps_reason
        return row, images


def planned_entries(params: dict, fp_root: Path, layouts: dict[str, str]) -> list[ModelEntry]:
    """Every model the current params ask for: the FP backbones, then each quantizing stage's
    method x setting x backbone. ``layouts`` maps a params section (with ``methods``, ``settings``,
    ``backbones``) to the path template of its outputs, e.g.
    ``"data/quantized/{method}/{setting}/{backbone}"``. Models left on disk by items no longer in
    params are not evaluated."""
    from .methods import get_method

    backbones = list(params["model"]["backbones"])
    entries = [ModelEntry(b, "fp", "FP32", Path(fp_root) / b) for b in backbones]
    for section, layout in layouts.items():
        sec = params.get(section) or {}
        for method_name in sec.get("methods", []):
            method = get_method(method_name)
            for setting in sec.get("settings", []):
                for b in sec.get("backbones", backbones):
                    if b in backbones and b in method.backbones:
                        path = Path(layout.format(method=method_name, setting=setting, backbone=b))
                        entries.append(ModelEntry(b, method_name, setting, Path(fp_root) / b, path, section))
    return entries
