"""Fréchet distance between feature statistics of generated and reference images (FID).

FID (Heusel et al. 2017) = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) over the features
of the reference set (r) and the generated set (g).

Feature extractor (one per metric object):

* default: the :class:`~pipeline.train.classifier.DigitClassifier`'s penultimate embedding
  (``features``), trained on the reference data -- a pipeline-internal FID, not comparable to
  published numbers;
* ``inception_weights``: the standard FID Inception-v3 (:mod:`pipeline.metrics.inception`) loaded
  from a local pytorch-fid weight file; 2048-d pool features, inputs resized to 299;
* ``feature_extractor``: any module mapping [N, C, H, W] images in [0, 1] to [N, D].

Image convention of :meth:`FIDMetric.set_reference` / :meth:`FIDMetric.compute`: the project's
float images in [-1, 1] (values outside are clamped) or uint8 images in [0, 255], shape
[N, C, H, W], C in {1, 3}. Floats are rounded to 8-bit levels first, as a saved PNG would be, so
both backends see the same pixels; the extractor then receives float [0, 1] images (torchmetrics
``normalize=True``) and gray images are repeated to 3 channels for a 3-channel extractor (colour
averaged for a 1-channel one).

Backends:

* ``"torchmetrics"`` (default): ``FrechetInceptionDistance(feature=<module>,
  reset_real_features=False, normalize=True)``; reference statistics are accumulated once in
  :meth:`set_reference` and kept across :meth:`compute` calls.
* ``"clean-fid"``: clean-fid's ``compute_fid`` on two PNG folders with ``custom_feat_extractor``
  (only importable with a working torchvision, see the error message). The classifier sees the
  images at their own size (identity ``custom_fn_resize``); Inception uses clean-fid's own
  anti-aliased resize to 299 ("clean" mode).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from pipeline.images import check_images, match_channels, to_uint8

log = logging.getLogger("pipeline")

BACKENDS = ("torchmetrics", "clean-fid")

CLEANFID_MISSING = (
    "FID backend 'clean-fid' is not available: importing cleanfid failed ({err}). clean-fid needs a "
    "working torchvision that matches the installed torch (the CUDA torchvision wheel from PyPI breaks "
    "the CPU torch used here). Where a matching torchvision exists, install the optional extra with "
    "`pip install -c constraints.txt '.[cleanfid]'`, or use eval.fid.backend: torchmetrics."
)


class UnitImageFeatures(nn.Module):
    """Adapter: float [0, 1] images [N, C, H, W] -> features [N, D] of a wrapped extractor.

    ``scale_to`` is the range the wrapped extractor expects: ``"unit"`` ([0, 1], e.g. the FID
    Inception, which rescales itself) or ``"signed"`` ([-1, 1], e.g. the digit classifier).
    Channels are matched to ``in_channels``. Works on torchmetrics' random dummy image, so the
    feature size can be inferred from a forward pass.
    """

    def __init__(self, extractor: nn.Module, in_channels: int, scale_to: str = "unit",
                 num_features: Optional[int] = None, input_scale: float = 1.0):
        super().__init__()
        if scale_to not in ("unit", "signed"):
            raise ValueError(f"scale_to: must be 'unit' or 'signed', got {scale_to!r}")
        self.extractor = extractor
        self.in_channels = in_channels
        self.scale_to = scale_to
        self.input_scale = input_scale  # 255 for clean-fid, which passes floats in [0, 255]
        if num_features is not None:
            self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / self.input_scale
        x = match_channels(x, self.in_channels)
        if self.scale_to == "signed":
            x = x * 2.0 - 1.0
        device = next(self.extractor.parameters()).device
        with torch.no_grad():
            return self.extractor(x.to(device)).float()


class _ClassifierEmbedding(nn.Module):
    """``classifier.features`` as a module's forward (inputs in [-1, 1])."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, x):
        return self.classifier.features(x)


class FIDMetric:
    """FID of generated images against a fixed reference set.

    ``FIDMetric(classifier)`` (digit-classifier features), ``FIDMetric(inception_weights=path)``
    or ``FIDMetric(feature_extractor=module, in_channels=3)``; ``backend`` in {"torchmetrics",
    "clean-fid"}. Precedence: ``inception_weights`` or ``feature_extractor`` replace the classifier
    when given (so ``FIDMetric(classifier, inception_weights=cfg.fid.inception_weights)`` falls back
    to the classifier when the path is None). Call :meth:`set_reference` once, then :meth:`compute`
    for every model. Features are computed on the device of the extractor's parameters (``device``
    moves the extractor first).
    """

    def __init__(self, classifier: Optional[nn.Module] = None, *, inception_weights: Optional[str | Path] = None,
                 feature_extractor: Optional[nn.Module] = None, in_channels: int = 3,
                 backend: str = "torchmetrics", device: Optional[torch.device | str] = None,
                 batch_size: int = 250):
        if backend not in BACKENDS:
            raise ValueError(f"backend: {backend!r} is not allowed (allowed values: {', '.join(BACKENDS)})")
        if classifier is None and inception_weights is None and feature_extractor is None:
            raise ValueError("FIDMetric: give a classifier, inception_weights or a feature_extractor")
        if inception_weights is not None and feature_extractor is not None:
            raise ValueError("FIDMetric: give either inception_weights or feature_extractor, not both")
        if batch_size <= 0:
            raise ValueError(f"batch_size: must be > 0, got {batch_size}")
        self.backend = backend
        self.batch_size = batch_size
        if inception_weights is not None:
            from pipeline.metrics.inception import FID_FEATURE_DIM, load_fid_inception

            net = load_fid_inception(inception_weights)
            self.feature_source = "inception"
            self.features_module = UnitImageFeatures(net, 3, "unit", num_features=FID_FEATURE_DIM)
        elif feature_extractor is None:
            if not hasattr(classifier, "features"):
                raise TypeError("classifier: expected a DigitClassifier (a module with a features(x) method)")
            classifier.eval()
            self.feature_source = "classifier"
            self.features_module = UnitImageFeatures(_ClassifierEmbedding(classifier),
                                                     int(getattr(classifier, "in_channels", 1)), "signed")
        else:
            if not isinstance(feature_extractor, nn.Module):
                raise TypeError(f"feature_extractor: expected an nn.Module, got {type(feature_extractor).__name__}")
            if in_channels not in (1, 3):
                raise ValueError(f"in_channels: must be 1 or 3, got {in_channels}")
            self.feature_source = "custom"
            self.features_module = UnitImageFeatures(feature_extractor, in_channels, "unit")
        self.features_module.eval().requires_grad_(False)
        if device is not None:
            self.features_module.to(device)
        self._metric = None
        self._ref_shape: Optional[tuple] = None
        self._ref_dir: Optional[tempfile.TemporaryDirectory] = None
        if backend == "clean-fid":
            self._cleanfid = import_cleanfid()

    @property
    def device(self) -> torch.device:
        return next(self.features_module.parameters()).device

    # -- inputs ---------------------------------------------------------------------------------
    def _check(self, images: torch.Tensor, name: str) -> torch.Tensor:
        check_images(images, name)
        if images.shape[0] < 2:
            raise ValueError(f"{name}: FID needs at least 2 images, got {images.shape[0]}")
        if self._ref_shape is not None and tuple(images.shape[2:]) != self._ref_shape[1:]:
            raise ValueError(f"{name}: image size {tuple(images.shape[2:])} differs from the reference set's "
                             f"{self._ref_shape[1:]}")
        return to_uint8(images)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Features [N, D] of images (same preprocessing as the metric itself)."""
        check_images(images)
        u8 = to_uint8(images)
        out = [self.features_module(u8[i:i + self.batch_size].float() / 255.0).cpu()
               for i in range(0, u8.shape[0], self.batch_size)]
        return torch.cat(out)

    # -- API ------------------------------------------------------------------------------------
    def set_reference(self, images: torch.Tensor) -> None:
        """Accumulate the reference statistics (once; a second call replaces them)."""
        u8 = self._check(images, "images")
        self._ref_shape = tuple(u8.shape[1:])
        if self.backend == "clean-fid":
            if self._ref_dir is not None:
                self._ref_dir.cleanup()
            self._ref_dir = tempfile.TemporaryDirectory(prefix="fid-ref-")
            write_png_folder(u8, Path(self._ref_dir.name))
            return
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(feature=self.features_module, reset_real_features=False,
                                          normalize=True, input_img_size=self._ref_shape)
        metric.to(self.device)
        for i in range(0, u8.shape[0], self.batch_size):
            metric.update(u8[i:i + self.batch_size].to(self.device).float() / 255.0, real=True)
        self._metric = metric

    def compute(self, images: torch.Tensor) -> float:
        """FID of ``images`` against the reference set."""
        if self._ref_shape is None:
            raise RuntimeError("FIDMetric.compute: call set_reference(images) first")
        u8 = self._check(images, "images")
        if self.backend == "clean-fid":
            return self._compute_cleanfid(u8)
        self._metric.reset()  # keeps the real statistics (reset_real_features=False)
        for i in range(0, u8.shape[0], self.batch_size):
            self._metric.update(u8[i:i + self.batch_size].to(self.device).float() / 255.0, real=False)
        return float(self._metric.compute())

    def _compute_cleanfid(self, u8: torch.Tensor) -> float:
        import numpy as np

        extractor = UnitImageFeatures(self.features_module.extractor, self.features_module.in_channels,
                                      self.features_module.scale_to, input_scale=255.0)
        # the digit classifier works at the images' own size; Inception gets clean-fid's resize to 299
        resize = None if self.feature_source == "inception" else (lambda a: a.astype(np.float32))
        with tempfile.TemporaryDirectory(prefix="fid-gen-") as gen_dir:
            write_png_folder(u8, Path(gen_dir))
            score = self._cleanfid.compute_fid(
                self._ref_dir.name, gen_dir, mode="clean", custom_feat_extractor=extractor,
                custom_fn_resize=resize, device=self.device, num_workers=0,
                batch_size=self.batch_size, verbose=False)
        return float(score)

    def __del__(self):  # pragma: no cover - best effort temp cleanup
        if getattr(self, "_ref_dir", None) is not None:
            self._ref_dir.cleanup()


def import_cleanfid():
    """``cleanfid.fid`` or a RuntimeError explaining how to get it."""
    try:
        import cleanfid.fid as cleanfid_fid
    except Exception as exc:  # ModuleNotFoundError, or torchvision's RuntimeError on import
        raise RuntimeError(CLEANFID_MISSING.format(err=f"{type(exc).__name__}: {exc}")) from exc
    return cleanfid_fid


def write_png_folder(u8: torch.Tensor, folder: Path) -> None:
    """Write uint8 [N, C, H, W] images as PNG files 000000.png ... (gray for C=1, RGB for C=3)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    arr = u8.cpu().permute(0, 2, 3, 1).numpy()
    for i, a in enumerate(arr):
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(folder / f"{i:06d}.png")
