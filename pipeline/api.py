"""Quantize from Python: one call per model, no runner, no ``params.yaml``, no MLflow.

>>> from pipeline.api import quantize
>>> result = quantize("data/fp/unet", "mpq", "W4A4", "data/calib/unet", variant="mpqdm2", qat={"epochs": 1})
>>> result.backbone   # the quantized model (fake-quant modules in place), result.info: what the method logged

The call runs what a job of ``dvc repro`` runs (the family's ``quantize`` phase, then its ``finetune`` phase
if it has one) on the variant's config (:meth:`pipeline.methods.Family.config_for`: dataclass defaults =
the default run's values, then the variant's overrides, then ``overrides``), with the method seed offset as
the runner offsets it. Differences from a job: no cache, no files (unless ``workdir``), and the fine-tune
phase continues from the first phase's model in memory instead of reloading its checkpoint.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

__all__ = ["quantize"]


def quantize(backbone: Any, family: str, setting: Any, calib: Any, *, variant: Optional[str] = None,
             seed: int = 0, device: Any = None, diffusion: Any = None, sampling: Any = None,
             finetune: bool = True, workdir: Optional[str | Path] = None, **overrides: Any):
    """Quantize ``backbone`` with method family ``family`` at ``setting``; returns its
    :class:`pipeline.methods.QuantResult` (``finetune`` info merged into ``info["finetune"]``).

    backbone: a :class:`pipeline.models.DiffusionBackbone` (left untouched: a copy is quantized) or the path
        of a saved FP model folder. calib: a :class:`pipeline.calibration.CalibrationSet` or its folder.
    setting: ``"W4A8"`` or a :class:`pipeline.config.BitSetting`. variant: a row of the family (default: its
        first, the method itself). seed: the method seed (offsets every ``seed`` of the config, as the
        runner's ``seeds``). diffusion / sampling: the :class:`pipeline.config.DiffusionConfig` /
        :class:`pipeline.config.SamplingConfig` of the FP model (defaults: the dataclasses'), used by the
        families that sample or train along trajectories. finetune: run the family's fine-tune phase (QAT)
        when it has one. workdir: a folder for the method's extra outputs (a peer tool's own file, a
        searched timestep list); None = none written. overrides: config fields of the family (a sub-config by
        a mapping of its fields, e.g. ``qat={"epochs": 1}``).

    Bad input (an unknown family, variant or config key, a wrong type, a setting the variant cannot run, a
    backbone the family does not support) raises before any compute, naming what is wrong.
    """
    import torch

    from .calibration import CalibrationSet, load_calibration
    from .config import BitSetting, DiffusionConfig, SamplingConfig, parse_setting
    from .methods import MethodContext, get_family
    from .models import DiffusionBackbone, load_backbone
    from .runner import seeded_config

    fam = get_family(family)
    variant = fam.variants[0].name if variant is None else variant
    setting = setting if isinstance(setting, BitSetting) else parse_setting(setting)
    cfg = seeded_config(fam.config_for(variant, None, **overrides), int(seed))
    if fam.check_setting is not None:
        try:
            fam.check_setting(setting, cfg)
        except ValueError as exc:
            raise ValueError(f"setting {setting.name} is not supported by {family}/{variant}: {exc}") from None
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(backbone, (str, Path)):
        backbone = load_backbone(backbone, device=device)
    elif not isinstance(backbone, DiffusionBackbone):
        raise TypeError(f"backbone: expected a DiffusionBackbone or the path of a saved FP model, "
                        f"got {type(backbone).__name__}")
    else:
        backbone = copy.deepcopy(backbone).to(device)
    if backbone.kind not in fam.backbones:
        raise ValueError(f"backbone: family {family!r} supports {', '.join(fam.backbones)}, got a "
                         f"{backbone.kind!r} backbone")
    if isinstance(calib, (str, Path)):
        calib = load_calibration(calib)
    elif not isinstance(calib, CalibrationSet):
        raise TypeError(f"calib: expected a CalibrationSet or its folder, got {type(calib).__name__}")
    ctx = MethodContext(device=device, diffusion=diffusion or DiffusionConfig(), sampling=sampling or SamplingConfig(),
                        backbone_name=backbone.kind, workdir=Path(workdir) if workdir is not None else None)
    if ctx.workdir is not None:
        ctx.workdir.mkdir(parents=True, exist_ok=True)
    teacher = copy.deepcopy(backbone).eval() if finetune and fam.finetune is not None else None
    torch.manual_seed(getattr(cfg, "seed", int(seed)))
    result = fam.quantize(backbone, calib, setting, cfg, ctx)
    if teacher is not None:
        result.info = {**result.info, "finetune": fam.finetune(result.backbone, teacher, setting, cfg, ctx)}
    return result
