"""Quantization method families, registered by name.

A *family* is one module of this package that declares, in one :class:`Family` object passed to
:func:`register_family`:

- ``name``: its params section in ``params.yaml`` and its output folder ``data/quantized/<name>``;
- ``config_cls``: the dataclass of its options (the section's keys besides ``variants``, ``settings`` and
  ``backbones``; nested dataclasses for sub-configs);
- ``variants``: its rows in the results table (the method and its ablations), each a name, a
  description and ``overrides``: values of fields of ``config_cls`` (a variant is its family's config with
  those fields set: :meth:`Family.config_for`; the method reads only its config);
- its phases: ``quantize(backbone, calib, setting, cfg, ctx) -> QuantResult`` (calibration-based PTQ,
  or the initialisation of a fine-tuned method) and, optionally,
  ``finetune(student, teacher, setting, cfg, ctx) -> dict`` (e.g. QAT). ``finetune_field`` names the
  sub-config only the fine-tune phase reads, so changing it never redoes the first phase;
- ``backbones`` it supports, ``tables``: the comparison tables of the report it wants, and optionally
  ``check_setting(setting, cfg)`` (``cfg``: a variant's config), raising ValueError for a bit setting it cannot run (so the
  refusal comes from the ``validate`` stage, before any compute), and ``extra_inputs(cfg, backbone)``:
  other files a job reads (e.g. a search's result), hashed into the job's cache key.

The generic runner (:mod:`pipeline.runner`) does everything else: validation, job planning,
MLflow runs, caching, saving (the core's packed format; a fine-tuned family's first phase is kept as
the core's unpacked student checkpoint), manifests. No stage imports a family module; no code outside
this package branches on a family's or variant's name.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..config import MATRIX_KEYS, merge_dicts  # noqa: E402,F401  (MATRIX_KEYS re-exported)


@dataclass
class QuantResult:
    backbone: Any  # the quantized DiffusionBackbone (fake-quant modules in place)
    spec: Any  # the QuantSpec it was built from
    info: dict = field(default_factory=dict)  # numbers worth logging (times, losses, chosen k, ...)


@dataclass
class MethodContext:
    """What a method may use besides its inputs: the device, the MLflow run of the job (``run.run_id``,
    ``run.uri`` for a Lightning logger), the sampling / diffusion configs (methods that train along
    trajectories), the backbone's name and a scratch folder for extra outputs (files written there are kept
    next to the model). What a variant changes is in its config (:meth:`Family.config_for`)."""

    device: Any = "cpu"
    run: Any = None
    diffusion: Any = None
    sampling: Any = None
    backbone_name: str = ""
    workdir: Any = None


@dataclass(frozen=True)
class Variant:
    """A row of the family: ``overrides`` sets fields of the family's config (a nested sub-config by a
    mapping of its fields); the rest comes from the params section (or the dataclass defaults)."""

    name: str
    description: str
    overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Claim:
    """A paper's claim the report tests: row ``better`` beats row ``worse`` (``"family/variant"``) at each
    of ``settings`` (empty = every setting the table ran), on each of ``metrics`` (FID, and PSNR to the
    FP images as the low-noise check). ``source``: where the paper makes it."""

    better: str
    worse: str
    source: str = ""
    settings: tuple = ()
    metrics: tuple = ("fid", "psnr")

    def as_dict(self) -> dict:
        return {"better": self.better, "worse": self.worse, "source": self.source, "settings": list(self.settings),
                "metrics": list(self.metrics)}


@dataclass(frozen=True)
class Table:
    """A comparison table of the report, declared by its family. Rows: the FP model of ``backbone``,
    then for every bit setting the family ran, the ``baselines`` (``"family/variant"`` rows of other
    families at the same setting, when they ran) and the family's ``variants`` (default: all it ran)."""

    title: str
    backbone: str
    columns: tuple = ("fid_ratio", "accuracy", "clip_score", "model_mb", "method_seconds")
    baselines: tuple = ()
    variants: tuple = ()
    note: str = ""
    claims: tuple = ()  # Claim objects: the orderings the report gives a verdict on

    def as_dict(self, family: str) -> dict:
        return {"family": family, "title": self.title, "backbone": self.backbone, "columns": list(self.columns),
                "baselines": list(self.baselines), "variants": list(self.variants), "note": self.note,
                "claims": [c.as_dict() for c in self.claims]}


@dataclass
class Family:
    name: str
    config_cls: type
    variants: tuple
    quantize: Callable[..., QuantResult]
    description: str = ""
    backbones: tuple = ("unet", "dit", "pixart")
    finetune: Optional[Callable[..., dict]] = None
    finetune_field: Optional[str] = None
    tables: tuple = ()
    check_setting: Optional[Callable[..., None]] = None  # (setting, variant cfg); ValueError = unsupported
    # (cfg, backbone) -> paths besides the FP model and calibration set a job reads (hashed into its cache key)
    extra_inputs: Optional[Callable[..., list]] = None

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"family {self.name!r} has no variant {name!r} "
                       f"(variants: {', '.join(v.name for v in self.variants)})")

    @property
    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants]

    def config_for(self, variant: str, cfg: Any = None, **overrides: Any) -> Any:
        """The config a row runs: ``cfg`` (the params section's options; default: the dataclass defaults)
        with the variant's overrides, then ``overrides``, set; validated like the params section (a wrong
        type or value names the key)."""
        from ..config import from_dict, to_dict

        base = to_dict(cfg) if cfg is not None else to_dict(self.config_cls())
        merged = merge_dicts(merge_dicts(base, self.variant(variant).overrides), overrides)
        return from_dict(self.config_cls, merged, f"{self.name}[{variant}]")


_REGISTRY: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Register ``family`` (called once at the bottom of its module). Checks the declaration itself."""
    if family.name in _REGISTRY:
        raise ValueError(f"family {family.name!r} is registered twice")
    if family.name in ("fp", *MATRIX_KEYS):
        raise ValueError(f"family name {family.name!r} is reserved")
    names = [v.name for v in family.variants]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"family {family.name!r}: variants must be non-empty and unique, got {names}")
    if (family.finetune is None) != (family.finetune_field is None):
        raise ValueError(f"family {family.name!r}: finetune and finetune_field go together")
    for v in family.variants:  # every variant is a valid config (unknown field, wrong type or value: named)
        try:
            family.config_for(v.name)
        except ValueError as exc:
            raise ValueError(f"family {family.name!r}, variant {v.name!r}: {exc}") from None
    _REGISTRY[family.name] = family
    return family


def _load_all() -> None:
    """Import every module of this package once: each registers its family (kept lazy because the
    method modules import torch)."""
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def families() -> dict[str, Family]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_family(name: str) -> Family:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown method family {name!r} (registered: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]
