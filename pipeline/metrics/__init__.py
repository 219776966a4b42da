"""Evaluation metrics: FID (digit-classifier or Inception features; torchmetrics or clean-fid),
class-conditional accuracy, CLIPScore (local CLIP) and HPSv2 (local OpenCLIP checkpoint).

Submodules are imported on first use (``from pipeline.metrics import FIDMetric`` imports
``pipeline.metrics.fid`` then), so importing this package stays cheap: torchmetrics and
transformers load only when a metric is built.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "FIDMetric": "fid",
    "FIDInceptionV3": "inception",
    "load_fid_inception": "inception",
    "conditional_accuracy": "accuracy",
    "CLIPScoreMetric": "clip",
    "load_clip": "clip",
    "HPSv2Metric": "hps",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
