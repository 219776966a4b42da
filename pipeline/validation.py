"""Validation of the whole ``params.yaml`` before any compute, and the per-section stamps DVC tracks.

:func:`validate_params` checks every section (unknown sections and keys, types, allowed values, bit
settings, each method family's options against its own config class, variants and backbones against
the family's declaration and ``model.backbones``) and returns the normalised value of every section
(defaults filled in). The ``validate`` stage writes each as its own JSON *stamp*
(``data/params/<section>.json``, plus ``<section>.<key>.json`` for every sub-mapping such as
``train_fp.unet``); every later stage depends on the stamps of the sections it reads, so DVC runs
``validate`` first and a bad value anywhere stops ``dvc repro`` before training, while a changed value
re-runs only the stages whose own stamps changed.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from .config import (BackboneModel, CalibrateConfig, ConfigError, DiffusionConfig, EvalConfig, ExportConfig, ModelConfig,
                     PrepareConfig,
                     QuantizeConfig, ReportConfig, SamplingConfig, SearchConfig, TrackingConfig, TrainEvaluatorsConfig, TrainFPConfig,
                     from_dict, read_params, split_family_section, to_dict)

SECTIONS = {
    "tracking": TrackingConfig, "prepare": PrepareConfig, "diffusion": DiffusionConfig,
    "sampling": SamplingConfig, "model": ModelConfig, "train_fp": TrainFPConfig,
    "train_evaluators": TrainEvaluatorsConfig, "calibrate": CalibrateConfig, "eval": EvalConfig,
    "report": ReportConfig, "search": SearchConfig, "quantize": QuantizeConfig, "export": ExportConfig,
}
FAMILIES_KEY = "families"


def load_family(name: str, params: dict, model_backbones: list[str] | None = None):
    """``(family, matrix, options)`` of family ``name`` from the raw params; errors name the key."""
    from .methods import get_family

    try:
        family = get_family(name)
    except KeyError as exc:
        raise ConfigError(str(exc.args[0])) from None
    if name not in params:
        raise ConfigError(f"{name}: missing section (family {name!r} is listed in '{FAMILIES_KEY}')")
    matrix, raw_options = split_family_section(name, params[name])
    allowed = family.variant_names
    for i, v in enumerate(matrix.variants):
        if v not in allowed:
            raise ConfigError(f"{name}.variants[{i}]: unknown variant {v!r} of family {name!r} "
                              f"(allowed values: {', '.join(allowed)})")
    for i, b in enumerate(matrix.backbones):
        if b not in family.backbones:
            raise ConfigError(f"{name}.backbones[{i}]: family {name!r} does not support backbone {b!r} "
                              f"(supported: {', '.join(family.backbones)})")
        if model_backbones is not None and b not in model_backbones:
            raise ConfigError(f"{name}.backbones[{i}]: backbone {b!r} is not in model.backbones "
                              f"({', '.join(model_backbones)}), so no FP model is trained for it")
    options = from_dict(family.config_cls, raw_options, name)
    if family.check_setting is not None:
        for i, s in enumerate(matrix.bit_settings):
            for v in matrix.variants:
                try:
                    family.check_setting(s, family.config_for(v, options))
                except ValueError as exc:
                    raise ConfigError(f"{name}.settings[{i}]: {s.name} is not supported by variant {v!r}: "
                                      f"{exc}") from None
    return family, matrix, options


def validate_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Validate every section of ``path``; return ``{section: normalised plain data}``."""
    raw = read_params(path)
    name = Path(path).name
    try:
        return _validate(raw)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _validate(raw: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        if section not in raw:
            raise ConfigError(f"missing section '{section}'")
        out[section] = to_dict(from_dict(cls, raw[section], section))
    fams = raw.get(FAMILIES_KEY)
    if not isinstance(fams, list) or not all(isinstance(f, str) for f in fams):
        raise ConfigError(f"{FAMILIES_KEY}: expected a list of method family names, got {fams!r}")
    from .methods import families

    registered = families()
    for i, f in enumerate(fams):
        if f not in registered:
            raise ConfigError(f"{FAMILIES_KEY}[{i}]: unknown method family {f!r} "
                              f"(registered: {', '.join(registered)})")
        if fams.index(f) != i:
            raise ConfigError(f"{FAMILIES_KEY}[{i}]: {f!r} is listed twice")
    out[FAMILIES_KEY] = list(fams)
    _check_patches(out["model"], out["prepare"]["image_size"])
    _check_sources(out["model"], out["prepare"])
    model_backbones = out["model"]["backbones"]
    for i, b in enumerate(out["search"]["backbones"]):  # stage search@<b> starts from the FP model of <b>
        if b not in model_backbones:
            raise ConfigError(f"search.backbones[{i}]: backbone {b!r} is not in model.backbones "
                              f"({', '.join(model_backbones)}), so no FP model is trained for it")
    for f in fams:
        _, matrix, options = load_family(f, raw, model_backbones)
        out[f] = {**to_dict(matrix), **to_dict(options)}
    _check_layer_patterns(out, fams)
    for i, b in enumerate(out.get("tmpq", {}).get("backbones", [])):  # its rows come from the search's front
        if b not in out["search"]["backbones"]:
            raise ConfigError(f"tmpq.backbones[{i}]: {b!r} is not in search.backbones "
                              f"({', '.join(out['search']['backbones'])}): the tmpq rows need its search")
    _check_export_rows(out["export"]["rows"], fams, out)
    # a registered family's section stays allowed when the family is not listed (a preset that runs fewer
    # families need not delete sections); it is not validated against the backbones and no stage reads it
    known = set(SECTIONS) | {FAMILIES_KEY} | set(registered)
    for key in raw:
        if key not in known:
            raise ConfigError(f"{key}: unknown section (allowed: {', '.join(sorted(known))})")
    return out


def _check_export_rows(rows: list[str], fams: list[str], out: dict) -> None:
    """Every ``export.rows`` entry names a row the run computes (method seed 0 of a listed family's variant
    at one of its settings and backbones; ``best`` for the variant: any of them)."""
    from .config import parse_setting

    for i, row in enumerate(rows):
        b, f, v, s = row.split("/")
        where = f"export.rows[{i}]"
        if f not in fams:
            raise ConfigError(f"{where}: {row!r}: family {f!r} is not in '{FAMILIES_KEY}' ({', '.join(fams)})")
        if f == "peers":
            raise ConfigError(f"{where}: {row!r}: the peers rows run in their own tool's kernels (optimum-quanto, "
                              f"torchao); export exports the project's own packed models")
        sec = out[f]
        if b not in sec["backbones"]:
            raise ConfigError(f"{where}: {row!r}: backbone {b!r} is not in {f}.backbones "
                              f"({', '.join(sec['backbones'])})")
        if v != "best" and v not in sec["variants"]:
            raise ConfigError(f"{where}: {row!r}: variant {v!r} is not in {f}.variants "
                              f"({', '.join(sec['variants'])}; or 'best')")
        if parse_setting(s).name not in [parse_setting(x).name for x in sec["settings"]]:
            raise ConfigError(f"{where}: {row!r}: setting {s!r} is not in {f}.settings "
                              f"({', '.join(sec['settings'])})")


def _check_patches(model: dict, image_size: int) -> None:
    """A transformer backbone trained here cuts the image into patches: its patch size must divide
    ``prepare.image_size`` (a loaded checkpoint, ``source``, brings its own)."""
    for b in model["backbones"]:
        if b in ("dit", "pixart") and model[b]["source"] is None:
            patch = model[b][b]["patch_size"]
            if image_size % patch:
                raise ConfigError(f"model.{b}.{b}.patch_size: {patch} does not divide prepare.image_size "
                                  f"({image_size})")


def layer_names(kind: str, model_cfg: BackboneModel, image_size: int) -> tuple[list[str], list[str]]:
    """(quantizable layers (nn.Linear / nn.Conv2d), attention modules): the names in the denoiser that
    ``model_cfg`` (a ``model.<backbone>`` section) gives, in registration order (the layers' order is the
    ``@first`` / ``@last`` order), relative to ``DiffusionBackbone.net`` as the quantization rules see them.
    Built on the meta device from the architecture keys or the source's ``config.json`` alone: no weights are
    read or allocated, so a real-size model costs milliseconds."""
    import torch

    from .models import _build_backbone, _diffusers_class, _read_config
    from .quant.surgery import attention_modules, quantizable_layers

    src = model_cfg.source
    with torch.device("meta"):
        if src is None:
            net = _build_backbone(kind, model_cfg, image_size, 3, 10).net
        else:
            root = Path(src)
            if (root / "model_index.json").exists():
                from .hub import check_pipeline_dir

                config = check_pipeline_dir(root, model_cfg.prompts, model_cfg.guidance_scale)["denoiser_config"]
            else:
                config = _read_config(root / "net" if (root / "backbone.json").exists() else root)
            net = _diffusers_class(config["_class_name"]).from_config(config)
    return [n for n, _ in quantizable_layers(net)], [n for n, _ in attention_modules(net)]


def _check_layer_patterns(out: dict, fams: list[str]) -> None:
    """Every layer-name pattern a family's params set (fields declared with ``config.layer_patterns``) matches
    at least one quantizable layer or attention module of one of the backbones the family runs on (built on
    the meta device from the architecture or the source's JSON: no weights), unless it is one of the field's
    defaults. Refused here, a pattern with a typo would otherwise exclude nothing and quantization would run."""
    from .methods import get_family
    from .quant.surgery import matches

    def hits(pat: str, b: str) -> bool:
        layers, attention = names[b]
        return any(matches(pat, n, layers[0], layers[-1]) for n in layers) or any(matches(pat, n) for n in attention)

    names: dict = {}
    for f in fams:
        fields = [fl for fl in dataclasses.fields(get_family(f).config_cls) if "layer_patterns" in fl.metadata]
        backbones = out[f].get("backbones", [])
        for fl in fields:
            for i, pat in enumerate(out[f][fl.name]):
                if pat in fl.metadata["layer_patterns"]:
                    continue
                for b in backbones:
                    if b not in names:
                        names[b] = layer_names(b, from_dict(BackboneModel, out["model"][b], f"model.{b}"),
                                               out["prepare"]["image_size"])
                if not any(hits(pat, b) for b in backbones):
                    example = next((names[b][0][len(names[b][0]) // 2] for b in backbones if names[b][0]), "")
                    raise ConfigError(f"{f}.{fl.name}[{i}]: {pat!r} matches no layer of the {', '.join(backbones)} "
                                      f"backbone(s) (layer names look like {example!r})")


def _check_sources(model: dict, prepare: Optional[dict] = None) -> None:
    """Each backbone's ``source`` exists and, for a diffusers pipeline directory, holds the pieces its
    conditioning needs, a denoiser of the backbone's kind, a guidance scale it supports, and makes images of
    the prepared dataset's size (the evaluators are trained on it; read from its JSON files only: no weights
    are loaded). An embedded backbone takes guidance only where it has a null condition (the DiT's null
    class, PixArt's null caption)."""
    from .models import null_condition

    for b in model["backbones"]:
        cfg = model[b]
        src = cfg["source"]
        if src is None:
            if cfg["guidance_scale"] > 1.0 and not null_condition(b, "text" if b == "pixart" else "class"):
                raise ConfigError(f"model.{b}.guidance_scale: the embedded UNet has no null class, so no guidance "
                                  f"(use 1.0)")
            continue
        if not Path(src).exists():
            raise ConfigError(f"model.{b}.source: {src} not found")
        from .hub import check_pipeline_dir, is_pipeline_dir

        if not is_pipeline_dir(src):
            continue
        try:
            info = check_pipeline_dir(src, cfg["prompts"], cfg["guidance_scale"], prefix=f"model.{b}")
        except (ValueError, FileNotFoundError) as exc:
            raise ConfigError(str(exc)) from None
        if info["kind"] != b:
            raise ConfigError(f"model.{b}.source: {src} holds a {info['denoiser_class']}, a '{info['kind']}' backbone; "
                              f"set it as model.{info['kind']}.source")
        c, h, w = info["image_shape"]
        if prepare is not None and (c, h, w) != (prepare["channels"], prepare["image_size"], prepare["image_size"]):
            raise ConfigError(f"model.{b}.source: {src} makes {c}x{h}x{w} images, but the prepared dataset (which the "
                              f"evaluators are trained on and FID compares with) is {prepare['channels']}x"
                              f"{prepare['image_size']}x{prepare['image_size']}: set prepare.source to the model's "
                              f"image folder, prepare.image_size: {h}, prepare.channels: {c}")


def stamps(normalised: dict[str, Any]) -> dict[str, Any]:
    """File name -> content of every stamp: one per section, one per sub-mapping of a section."""
    out = {}
    for section, value in normalised.items():
        out[f"{section}.json"] = value
        if isinstance(value, dict):
            for key, sub in value.items():
                if isinstance(sub, dict):
                    out[f"{section}.{key}.json"] = sub
    return out
