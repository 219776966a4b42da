"""Typed parameters for every stage, loaded from ``params.yaml`` and validated before any compute.

Each stage reads one section of ``params.yaml`` into a dataclass below. Validation is strict and
names the offending key: unknown keys, wrong types, values outside an allowed set and unsupported
bit settings all raise :class:`ConfigError` with a message such as
``params.yaml: quantize.settings[1]: unsupported bit setting 'W9A8' (weights 2-8 bits, ...)``.

Only the standard library and PyYAML are imported here, so stages can validate their parameters
and print an error within a fraction of a second, before torch is imported.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

BACKBONES = ("unet", "dit", "pixart")
WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)
ACT_BITS = (2, 3, 4, 5, 6, 7, 8, 16, 32)  # 16/32 mean "activations stay in floating point"


class ConfigError(ValueError):
    """A parameter is missing, unknown, of the wrong type or outside its allowed values."""


def choice(*values: Any, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field whose value must be one of ``values``."""
    meta = {"choices": tuple(values)}
    if default is dataclasses.MISSING:
        return field(metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def layer_patterns(default: Sequence[str]) -> Any:
    """A dataclass field holding layer-name patterns (``pipeline.quant.surgery`` syntax: glob, ``re:``,
    ``@first`` / ``@last``). ``validate`` refuses a pattern that matches no layer of any backbone the family
    runs on, naming the key; the patterns of ``default`` are exempt (a default list may name the layers of
    several layouts, e.g. Hunyuan-DiT's or Stable Diffusion's, that a given backbone does not have)."""
    return field(default_factory=lambda: list(default), metadata={"layer_patterns": tuple(default)})


# ----------------------------------------------------------------------------------------------
# bit settings
# ----------------------------------------------------------------------------------------------
_SETTING_RE = re.compile(r"^W(\d+)A(\d+)$")


@dataclass(frozen=True)
class BitSetting:
    """A uniform bit setting such as ``W4A8`` (4-bit weights, 8-bit activations)."""

    wbits: int
    abits: int

    @property
    def name(self) -> str:
        return f"W{self.wbits}A{self.abits}"

    @property
    def act_quantized(self) -> bool:
        return self.abits < 16

    def __str__(self) -> str:  # pragma: no cover - convenience
        return self.name


def parse_setting(text: Any, where: str = "setting") -> BitSetting:
    """Parse ``'W4A8'`` into a :class:`BitSetting`, with an error naming ``where`` on bad input."""
    m = _SETTING_RE.match(str(text).strip().upper()) if isinstance(text, str) else None
    if not m:
        raise ConfigError(
            f"{where}: {text!r} is not a bit setting; write it as W<bits>A<bits>, e.g. 'W4A8'"
        )
    w, a = int(m.group(1)), int(m.group(2))
    if w not in WEIGHT_BITS or a not in ACT_BITS:
        raise ConfigError(
            f"{where}: unsupported bit setting {text!r} (weight bits must be one of "
            f"{list(WEIGHT_BITS)}, activation bits one of {list(ACT_BITS)}; A16/A32 = FP activations)"
        )
    return BitSetting(w, a)


# ----------------------------------------------------------------------------------------------
# generic loading
# ----------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        out = [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads '1e-3' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover


def from_dict(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix}.{unknown[0]}: unknown key (allowed keys: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: missing required key")
            continue
        value = _convert(data[name], hints[name], key)
        choices = f.metadata.get("choices")
        if choices is not None:
            values = value if isinstance(value, list) else [value]
            for i, v in enumerate(values):
                if v not in choices:
                    where = f"{key}[{i}]" if isinstance(value, list) else key
                    raise ConfigError(
                        f"{where}: {v!r} is not allowed (allowed values: "
                        f"{', '.join(map(str, choices))})"
                    )
        kwargs[name] = value
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(prefix)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config (for logging and hashing)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def merge_dicts(base: dict, over: dict) -> dict:
    """``base`` with ``over`` laid on top, nested mappings merged key by key (neither input is changed)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_params(path: str | Path = "params.yaml") -> dict:
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: parameter file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_section(section: str, cls: type, path: str | Path = "params.yaml") -> Any:
    """Read ``section`` of ``params.yaml`` into ``cls``; errors are prefixed with the file name."""
    data = read_params(path)
    if section not in data:
        raise ConfigError(f"{path}: missing section '{section}'")
    try:
        return from_dict(cls, data[section], section)
    except ConfigError as exc:
        raise ConfigError(f"{Path(path).name}: {exc}") from None


def _check_backbones(values: list[str], key: str) -> None:
    if not values:
        raise ConfigError(f"{key}: list at least one backbone ({', '.join(BACKBONES)})")
    for i, b in enumerate(values):
        if b not in BACKBONES:
            raise ConfigError(
                f"{key}[{i}]: unknown backbone {b!r} (allowed values: {', '.join(BACKBONES)})"
            )


def _check_positive(obj: Any, prefix: str, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if v is not None and v <= 0:
            raise ConfigError(f"{prefix}.{n}: must be > 0, got {v!r}")


# ----------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------
@dataclass
class PrepareConfig:
    """``prepare``: the dataset. ``source: digits`` is scikit-learn's bundled 8x8 digits;
    any other value is a local image folder with one sub-folder per class."""

    source: str = "digits"
    image_size: int = 8
    channels: int = 1
    reference_fraction: float = 0.25
    seed: int = 0

    def validate(self, p: str) -> None:
        _check_positive(self, p, "image_size")
        if self.channels not in (1, 3):
            raise ConfigError(f"{p}.channels: must be 1 or 3, got {self.channels}")
        if not 0.0 < self.reference_fraction < 1.0:
            raise ConfigError(f"{p}.reference_fraction: must be in (0, 1), got {self.reference_fraction}")


@dataclass
class DiffusionConfig:
    """``diffusion``: the forward process shared by training, calibration, QAT and evaluation."""

    num_train_timesteps: int = 1000
    beta_schedule: str = choice("linear", "scaled_linear", "squaredcos_cap_v2", default="squaredcos_cap_v2")
    beta_start: float = 1.0e-4
    beta_end: float = 0.02

    def validate(self, p: str) -> None:
        _check_positive(self, p, "num_train_timesteps")
        if not 0.0 < self.beta_start < 1.0:
            raise ConfigError(f"{p}.beta_start: must be in (0, 1), got {self.beta_start}")
        if not self.beta_start < self.beta_end < 1.0:
            raise ConfigError(f"{p}.beta_end: must be in (beta_start = {self.beta_start}, 1), got {self.beta_end}")


@dataclass
class SamplingConfig:
    """``sampling``: the sampler used to draw images (calibration, QAT, evaluation)."""

    scheduler: str = choice("ddim", "ddpm", "dpm", "own", default="ddim")
    steps: int = 20
    eta: float = 0.0

    def validate(self, p: str) -> None:
        _check_positive(self, p, "steps")
        if self.eta < 0:
            raise ConfigError(f"{p}.eta: must be >= 0, got {self.eta}")


@dataclass
class UNetArch:
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    attention_levels: list[bool] = field(default_factory=lambda: [False, True])
    norm_num_groups: int = 8

    def validate(self, p: str) -> None:
        if not self.block_out_channels:
            raise ConfigError(f"{p}.block_out_channels: list at least one block width")
        _check_positive(self, p, "layers_per_block", "norm_num_groups")
        for i, c in enumerate(self.block_out_channels):
            if c <= 0 or c % self.norm_num_groups:
                raise ConfigError(f"{p}.block_out_channels[{i}]: must be a positive multiple of norm_num_groups "
                                  f"({self.norm_num_groups}), got {c}")
        if len(self.block_out_channels) != len(self.attention_levels):
            raise ConfigError(f"{p}.attention_levels: needs one entry per block_out_channels entry")


@dataclass
class DiTArch:
    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    patch_size: int = 2

    def validate(self, p: str) -> None:
        _check_positive(self, p, "num_layers", "num_attention_heads", "attention_head_dim", "patch_size")


@dataclass
class PixArtArch:
    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    patch_size: int = 2
    caption_channels: int = 32
    caption_length: int = 4

    def validate(self, p: str) -> None:
        _check_positive(self, p, "num_layers", "num_attention_heads", "attention_head_dim", "patch_size",
                        "caption_channels", "caption_length")


@dataclass
class BackboneModel:
    """One backbone: ``source`` (a local diffusers pipeline directory with ``model_index.json``, or a model
    directory; null = train the embedded one), ``prompts`` (a text file, one prompt per line, that a
    text-conditioned source is conditioned on), ``guidance_scale`` (classifier-free guidance in every
    stage that runs the model; 1 = none) and the architecture used when training."""

    source: Optional[str] = None
    prompts: Optional[str] = None
    guidance_scale: float = 1.0
    unet: UNetArch = field(default_factory=UNetArch)
    dit: DiTArch = field(default_factory=DiTArch)
    pixart: PixArtArch = field(default_factory=PixArtArch)

    def validate(self, p: str) -> None:
        if not self.guidance_scale >= 1.0 or self.guidance_scale == float("inf"):
            raise ConfigError(f"{p}.guidance_scale: must be a finite number >= 1 (1 = no guidance), "
                              f"got {self.guidance_scale!r}")


@dataclass
class ModelConfig:
    """``model``: which backbones the pipeline runs and how each is built or loaded."""

    backbones: list[str] = field(default_factory=lambda: ["unet", "dit", "pixart"])
    unet: BackboneModel = field(default_factory=BackboneModel)
    dit: BackboneModel = field(default_factory=BackboneModel)
    pixart: BackboneModel = field(default_factory=BackboneModel)

    def validate(self, p: str) -> None:
        _check_backbones(self.backbones, f"{p}.backbones")


@dataclass
class TrainRun:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2.0e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    ema_decay: float = 0.999
    seed: int = 0

    def validate(self, p: str) -> None:
        _check_positive(self, p, "steps", "batch_size", "lr")
        for key in ("warmup_steps", "weight_decay"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{p}.{key}: must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"{p}.ema_decay: must be in [0, 1), got {self.ema_decay}")


@dataclass
class TrainFPConfig:
    """``train_fp``: Lightning training of each embedded FP backbone."""

    unet: TrainRun = field(default_factory=lambda: TrainRun(steps=1000))
    dit: TrainRun = field(default_factory=lambda: TrainRun(steps=2400))
    pixart: TrainRun = field(default_factory=lambda: TrainRun(steps=2400))


@dataclass
class TrainEvaluatorsConfig:
    """``train_evaluators``: the digit classifier (FID features, conditional accuracy) and tiny CLIP."""

    classifier_steps: int = 1500
    clip_steps: int = 1000
    batch_size: int = 128
    lr: float = 2.0e-3
    seed: int = 0

    def validate(self, p: str) -> None:
        _check_positive(self, p, "classifier_steps", "clip_steps", "batch_size", "lr")


@dataclass
class CalibrateConfig:
    """``calibrate``: FP trajectories whose model inputs every method calibrates on."""

    n_samples: int = 64
    n_timesteps: int = 10
    selection: str = choice("uniform", "random", default="uniform")
    batch_size: int = 64
    seed: int = 7

    def validate(self, p: str) -> None:
        _check_positive(self, p, "n_samples", "n_timesteps", "batch_size")


MATRIX_KEYS = ("variants", "settings", "backbones", "seeds", "seeded_variants")


@dataclass
class FamilyMatrix:
    """The matrix keys of a method family's section: which ``variants`` (rows) at which bit ``settings``
    on which ``backbones``. Every other key of the section is an option of the family's own config class
    (validated against it by :func:`pipeline.validation.load_family`)."""

    variants: list[str] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)
    backbones: list[str] = field(default_factory=lambda: ["unet", "dit"])
    # method seeds: each job runs once per seed (offsetting every ``seed`` option of the family's config,
    # see :func:`pipeline.runner.seeded_config`); ``seeded_variants`` (null = all) run every seed, the other
    # variants only the first one
    seeds: list[int] = field(default_factory=lambda: [0])
    seeded_variants: Optional[list[str]] = None

    def validate(self, p: str) -> None:
        if not self.variants:
            raise ConfigError(f"{p}.variants: list at least one variant")
        if not self.settings:
            raise ConfigError(f"{p}.settings: list at least one bit setting")
        if not self.seeds:
            raise ConfigError(f"{p}.seeds: list at least one seed (e.g. [0])")
        for i, v in enumerate(self.seeds):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{p}.seeds[{i}]: must be a non-negative int, got {v!r}")
        for i, v in enumerate(self.seeded_variants or []):
            if v not in self.variants:
                raise ConfigError(f"{p}.seeded_variants[{i}]: {v!r} is not in {p}.variants")
        _check_backbones(self.backbones, f"{p}.backbones")
        for key in ("variants", "settings", "backbones", "seeds"):
            values = getattr(self, key)
            for i, v in enumerate(values):
                if values.index(v) != i:
                    raise ConfigError(f"{p}.{key}[{i}]: {v!r} is listed twice")
        for i, s in enumerate(self.settings):
            parse_setting(s, f"{p}.settings[{i}]")

    @property
    def bit_settings(self) -> list[BitSetting]:
        return [parse_setting(s) for s in self.settings]

    def seeds_of(self, variant: str) -> list[int]:
        """The method seeds ``variant`` runs with."""
        if self.seeded_variants is None or variant in self.seeded_variants:
            return list(self.seeds)
        return list(self.seeds[:1])


def split_family_section(section: str, raw: Any) -> tuple[FamilyMatrix, dict]:
    """``(matrix, options)`` of a family's raw params section; errors name the key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: expected a mapping, got {raw!r}")
    matrix = from_dict(FamilyMatrix, {k: v for k, v in raw.items() if k in MATRIX_KEYS}, section)
    return matrix, {k: v for k, v in raw.items() if k not in MATRIX_KEYS}


@dataclass
class FIDConfig:
    backend: str = choice("torchmetrics", "clean-fid", default="torchmetrics")
    inception_weights: Optional[str] = None  # local file -> standard Inception features
    reference: str = choice("all", "heldout", default="all")  # reference statistics: all real images or the held-out split


@dataclass
class CLIPEvalConfig:
    model_dir: Optional[str] = None  # local transformers CLIP directory; null = embedded tiny CLIP


@dataclass
class HPSConfig:
    checkpoint: Optional[str] = None  # local HPSv2 (OpenCLIP ViT-H/14) checkpoint; null = skipped
    tokenizer_dir: Optional[str] = None  # local CLIP tokenizer directory (default: eval.clip.model_dir)


@dataclass
class QuantizeConfig:
    """``quantize``: how the jobs of every method family are run (not what they compute).

    ``n_workers``: processes that run a family's jobs, each with one intra-op thread (as the stage's own
    process), so a job's result does not depend on ``n_workers`` or on the machine's core count."""

    n_workers: int = 2

    def validate(self, p: str) -> None:
        _check_positive(self, p, "n_workers")


@dataclass
class EvalConfig:
    """``eval``: one protocol for every model (same noise, labels, evaluators, reference set)."""

    n_samples: int = 500
    batch_size: int = 250
    seed: int = 1234
    grid_size: int = 10
    floor_seed_offset: int = 1  # the FP model is also sampled at seed + offset (the seed-noise floor)
    floor_real_splits: int = 5  # real-vs-real floor: random disjoint splits (0 = skip)
    # processes that evaluate the quantized models (each single-threaded, as the stage itself: the results do
    # not depend on n_workers or on the machine's core count)
    n_workers: int = 2
    fid: FIDConfig = field(default_factory=FIDConfig)
    clip: CLIPEvalConfig = field(default_factory=CLIPEvalConfig)
    hps: HPSConfig = field(default_factory=HPSConfig)

    def validate(self, p: str) -> None:
        _check_positive(self, p, "n_samples", "batch_size", "grid_size", "floor_seed_offset", "n_workers")
        if self.n_samples < 2:
            raise ConfigError(f"{p}.n_samples: FID needs at least 2 samples, got {self.n_samples}")
        if self.floor_real_splits < 0:
            raise ConfigError(f"{p}.floor_real_splits: must be >= 0, got {self.floor_real_splits}")


REPORT_COLUMNS = ("fid", "fid_ratio", "accuracy", "clip_score", "hps", "bitops_g", "model_mb", "sec_per_image",
                  "method_seconds", "method_peak_mb")


@dataclass
class ReportConfig:
    """``report``: the summary table and plots (comparison tables are declared by the method families)."""

    primary_metric: str = choice("fid", "accuracy", "clip_score", default="fid")
    bootstrap: int = 1000  # replicates of the two-level (samples x method seeds) bootstrap
    ci_level: float = 0.95
    seed: int = 0  # the bootstrap's resampling plan

    def validate(self, p: str) -> None:
        if self.bootstrap < 10:
            raise ConfigError(f"{p}.bootstrap: need at least 10 replicates, got {self.bootstrap}")
        if not 0.5 <= self.ci_level < 1.0:
            raise ConfigError(f"{p}.ci_level: must be in [0.5, 1), got {self.ci_level}")


# the best row of each family at W8A8 and W4A8 on the backbones it runs by default, plus weight-only W4
DEFAULT_EXPORT_ROWS = ("unet/naive/naive/W8A8", "unet/naive/naive/W4A8", "unet/qdiff/best/W8A8", "unet/qdiff/best/W4A8",
                       "unet/naive/naive/W4A32", "dit/naive/naive/W8A8", "dit/naive/naive/W4A8", "dit/fp4dit/best/W4A8",
                       "dit/naive/naive/W4A32", "pixart/naive/naive/W8A8")


@dataclass
class ExportConfig:
    """``export``: quantized models that run for real (stage ``export``, :mod:`pipeline.deploy`): one DVC item
    per row of ``rows``, exported from the packed model's own codes, scales and zero points and executed by
    ``target``; measured against the fake-quant model the table scored.

    rows: ``backbone/family/variant/setting`` (method seed 0); ``variant`` may be ``best``: the family's
    variant with the best mean ``report.primary_metric`` over its method seeds at that backbone and setting
    in the evaluate stage's results. fallback: what a layer with no kernel on the target runs (FP ExMy
    codes, mixed or binary groups, binary residual branches): ``float`` = its decoded weight in float32
    (reported in the ``executes`` share), ``error`` = the row fails naming the layer. batches / repeats: the
    timed denoiser calls (one timestep per call, as a sampling step); calib_inputs: calibration inputs on
    which the denoiser's max |deployed - fake-quant| is taken; threads: intra-op threads of the timed calls
    (null = every core; the fidelity runs are single-threaded, so their numbers do not depend on the machine's
    core count)."""

    target: str = choice("onnxruntime", default="onnxruntime")
    rows: list[str] = field(default_factory=lambda: list(DEFAULT_EXPORT_ROWS))
    fallback: str = choice("float", "error", default="float")
    batches: list[int] = field(default_factory=lambda: [1, 8])
    repeats: int = 5
    calib_inputs: int = 64
    threads: Optional[int] = None

    def validate(self, p: str) -> None:
        _check_positive(self, p, "repeats", "calib_inputs")
        if not self.batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.batches):
            raise ConfigError(f"{p}.batches: a non-empty list of positive batch sizes, got {self.batches}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"{p}.threads: a positive number of threads or null, got {self.threads}")
        for i, row in enumerate(self.rows):
            parts = str(row).split("/")
            if len(parts) != 4 or not all(parts):
                raise ConfigError(f"{p}.rows[{i}]: {row!r} is not a row; write it as "
                                  f"backbone/family/variant/setting, e.g. 'unet/naive/naive/W8A8'")
            parse_setting(parts[3], f"{p}.rows[{i}]")
            if self.rows.index(row) != i:
                raise ConfigError(f"{p}.rows[{i}]: {row!r} is listed twice")


@dataclass
class SearchProxyConfig:
    """``search.proxy``: the cheap, low-noise fitness of a candidate (paired fidelity to the FP images).

    metric: ``mse`` = mean squared pixel error between the candidate's images (its timesteps, its bits)
    and the FP model's images of the same noise at the full ``sampling.steps`` schedule.
    n_samples / seed: the fixed search sample (its own noise seed, not ``eval.seed``, so the search never
    sees the evaluation images). holdout_samples / holdout_seed: the Pareto front and the uniform
    references are re-scored on fresh noise (the search sample's minimum is optimistically biased)."""

    metric: str = choice("mse", default="mse")
    n_samples: int = 64
    seed: int = 4321
    holdout_samples: int = 256
    holdout_seed: int = 8765

    def validate(self, p: str) -> None:
        _check_positive(self, p, "n_samples", "holdout_samples")


@dataclass
class SearchConfig:
    """``search``: the TMPQ-DM (arXiv 2404.09532) joint timestep + per-layer bit search (stage ``search``;
    :mod:`pipeline.search`). The super-network and the candidate encoding are in
    :mod:`pipeline.methods.tmpq`; the exported rows are the ``tmpq`` family."""

    backbones: list[str] = field(default_factory=lambda: ["unet"])
    w_bits: list[int] = field(default_factory=lambda: [4, 5, 6, 8])
    a_bits: list[int] = field(default_factory=lambda: [4, 5, 6, 8])
    n_groups: int = 10  # K timestep groups, boundaries (linspace(0, sqrt(0.8 T), K))^2, one step per group
    budget_bits: int = 6  # BitOPs budget = uniform W<b>A<b> at sampling.steps ...
    budget_bitops: Optional[float] = None  # ... unless given here (GBitOPs per image)
    sampler: str = choice("nsga2", "tpe", default="nsga2")
    population_size: int = 16
    n_trials: int = 96
    batch_size: int = 4  # trials asked per round (independent of n_workers: same study for any n_workers)
    n_workers: int = 2  # processes that score a round's trials
    weight_init: str = choice("minmax", "mse", default="minmax")
    act_init: str = choice("minmax", "mse", default="minmax")
    keep_first_last_bits: int = 8
    calib_batches: int = 4
    seed: int = 0
    proxy: SearchProxyConfig = field(default_factory=SearchProxyConfig)

    def validate(self, p: str) -> None:
        for key in ("w_bits", "a_bits"):
            bits = getattr(self, key)
            if not bits or len(set(bits)) != len(bits) or any(b not in WEIGHT_BITS for b in bits):
                raise ConfigError(f"{p}.{key}: a non-empty list of distinct bit widths from {list(WEIGHT_BITS)}, "
                                  f"got {bits}")
        if self.budget_bits not in WEIGHT_BITS:
            raise ConfigError(f"{p}.budget_bits: one of {list(WEIGHT_BITS)}, got {self.budget_bits}")
        if self.budget_bitops is not None and not self.budget_bitops > 0:
            raise ConfigError(f"{p}.budget_bitops: a positive number of GBitOPs per image or null, "
                              f"got {self.budget_bitops}")
        if self.keep_first_last_bits not in (0, *WEIGHT_BITS):
            raise ConfigError(f"{p}.keep_first_last_bits: 0 (FP) or one of {list(WEIGHT_BITS)}, "
                              f"got {self.keep_first_last_bits}")
        if self.n_groups < 2:
            raise ConfigError(f"{p}.n_groups: need at least 2 timestep groups, got {self.n_groups}")
        _check_positive(self, p, "population_size", "n_trials", "batch_size", "n_workers", "calib_batches")
        if not self.backbones:
            raise ConfigError(f"{p}.backbones: list at least one backbone (a run without the tmpq family skips the "
                              f"search: stage search writes only skipped.json)")


@dataclass
class TrackingConfig:
    """``tracking``: MLflow settings (a local SQLite database in the repository by default)."""

    experiment: str = "diffusion-quant"
    uri: str = "sqlite:///mlflow.db"
