"""Model surgery: a name-keyed quantization spec and the code that wraps any ``nn.Module`` with it.

Per-layer mixed precision is data: a :class:`QuantSpec` holds a default :class:`LayerQuant` and an
ordered list of rules ``(pattern, overrides)``. A pattern (the project's one name-pattern syntax, matched by
:func:`matches` / :func:`matches_any`, also used by the reconstruction units and the methods) is

- a glob on the module's qualified name (``fnmatch.fnmatchcase``, e.g. ``"*attn1.to_q"``, ``"*emb*"``),
- ``"re:<regex>"``: a Python regex that must match the whole name (``re.fullmatch``),
- ``"@first"`` / ``"@last"``: the first / last quantizable layer (``nn.Linear``/``nn.Conv2d``) in module
  registration order (``model.named_modules()``).

Rules are applied in order on top of the default; later rules override earlier ones. ``{"skip": True}``
keeps the matching module in FP (a later rule with ``{"skip": False}`` can bring it back). When a rule
changes ``w_bits``/``a_bits``/``attn_bits`` of an FP format without giving the exponent/mantissa split, the
split is re-derived from the new width (:data:`pipeline.quant.primitives.FP_WEIGHT_FORMATS` /
:data:`~pipeline.quant.primitives.FP_ACT_FORMATS`).

Attention matmuls are configured on the attention module's own name (duck-typed: a module with ``to_q``,
``to_k``, ``to_v`` and ``set_processor``): its resolved ``attn_bits`` quantizes Q, K (before QKᵀ) and
V, P (before PV) with the resolved ``a_mode`` / ``a_format``. P (the softmax probabilities, in [0, 1]) is
unsigned and has its own format fields: ``attn_p_bits`` (None = ``attn_bits``), ``attn_p_format`` "int" |
"fp" | "none" (None = ``a_format``; "none" keeps P in FP) and the unsigned split ``attn_p_exp_bits`` /
``attn_p_man_bits`` (None = derived: the activation split when P has the activation width, else
:data:`~pipeline.quant.primitives.FP_ACT_FORMATS`; beyond 8 bits E5 as fp16; the sign bit goes to the
mantissa). ``@first``/``@last`` never match attention modules.

Nothing here imports diffusers: models are handled through ``named_modules`` and duck typing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from pipeline.quant.act import FP_ACT_BITS
from pipeline.quant.attention import QuantAttnProcessor, check_supported, is_attention_module
from pipeline.quant.layers import QUANT_LAYER_TYPES, QuantConv2d, QuantLinear
from pipeline.quant.primitives import FP_ACT_FORMATS, FP_WEIGHT_FORMATS, INT_BITS, FPQuantizer, IntQuantizer

W_FORMATS = ("int", "fp")
A_FORMATS = ("int", "fp")
P_FORMATS = ("int", "fp", "none")  # softmax probabilities; "none" = P stays FP
W_GRANULARITIES = ("channel", "group", "tensor")
A_MODES = ("static", "timestep", "token", "none")
# integer widths (weights and activations): primitives.INT_BITS (= pipeline.config.WEIGHT_BITS);
# FP widths with a default split (weights, activations, Q/K/V): the keys of the primitives tables
FP_BITS = tuple(sorted(FP_WEIGHT_FORMATS))  # == the keys of FP_ACT_FORMATS
P_WIDE_EXP_BITS = 5  # default exponent bits of an unsigned FP P wider than the table (fp16's exponent)
W_INITS = ("minmax", "mse")
SPECIAL_PATTERNS = ("@first", "@last")


# ------------------------------------------------------------------------------------------------
# name patterns
# ------------------------------------------------------------------------------------------------
def check_pattern(pattern, where: str = "pattern") -> str:
    """Return ``pattern`` if it is a valid name pattern (non-empty glob, ``re:<regex>`` that compiles,
    ``@first`` / ``@last``), else raise ValueError naming ``where``."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{where}: pattern must be a non-empty string (glob, 're:<regex>', "
                         f"'@first' or '@last'), got {pattern!r}")
    if pattern.startswith("@") and pattern not in SPECIAL_PATTERNS:
        raise ValueError(f"{where}: unknown token {pattern!r}; allowed tokens: {list(SPECIAL_PATTERNS)}")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise ValueError(f"{where}: invalid regex {pattern[3:]!r}: {exc}") from None
    return pattern


def matches(pattern: str, name: str, first: Optional[str] = None, last: Optional[str] = None) -> bool:
    """True when the qualified module name ``name`` matches ``pattern``: a glob (``fnmatch.fnmatchcase``),
    ``re:<regex>`` (``re.fullmatch``), or ``@first`` / ``@last`` (``name`` equals ``first`` / ``last``,
    the names those tokens stand for; they match nothing when not given)."""
    if pattern == "@first":
        return first is not None and name == first
    if pattern == "@last":
        return last is not None and name == last
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def matches_any(patterns, name: str, first: Optional[str] = None, last: Optional[str] = None) -> bool:
    """True when ``name`` matches one of ``patterns`` (see :func:`matches`)."""
    return any(matches(p, name, first, last) for p in patterns)


@dataclass
class LayerQuant:
    """Quantization of one layer (resolved from a :class:`QuantSpec`).

    Weights: ``w_bits`` (None = FP weight), ``w_format`` "int" | "fp" (``w_exp_bits``/``w_man_bits``;
    derived from ``w_bits`` when None), ``w_granularity`` "channel" | "group" | "tensor" (``group_size``
    consecutive weights of the flattened input dim), ``w_symmetric``, ``w_init`` "minmax" | "mse"
    (FP: "minmax" means absmax), ``w_learnable`` (step/zero-point/maxval as nn.Parameter).
    Input activations: ``a_bits`` (None = FP), ``a_format``, ``a_exp_bits``/``a_man_bits``, ``a_mode``
    "static" (one per-tensor set) | "timestep" (one set per sampling timestep, int only) | "token"
    (online per-token absmax, no calibration) | "none", ``a_symmetric``, ``a_init``, ``a_learnable``.
    Attention modules: ``attn_bits`` (None = FP Q·Kᵀ and P·V) with the activation mode/format; the
    softmax probabilities P: ``attn_p_bits`` (None = attn_bits), ``attn_p_format`` "int" | "fp" | "none"
    (None = a_format), unsigned split ``attn_p_exp_bits``/``attn_p_man_bits`` (E + M = width; None = derived).
    """

    w_bits: Optional[int] = 8
    w_format: str = "int"
    w_exp_bits: Optional[int] = None
    w_man_bits: Optional[int] = None
    w_granularity: str = "channel"
    group_size: int = 128
    w_symmetric: bool = False
    w_init: str = "minmax"
    w_learnable: bool = False
    a_bits: Optional[int] = None
    a_format: str = "int"
    a_exp_bits: Optional[int] = None
    a_man_bits: Optional[int] = None
    a_mode: str = "static"
    a_symmetric: bool = False
    a_init: str = "minmax"
    a_learnable: bool = False
    attn_bits: Optional[int] = None
    attn_p_bits: Optional[int] = None
    attn_p_format: Optional[str] = None
    attn_p_exp_bits: Optional[int] = None
    attn_p_man_bits: Optional[int] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "LayerQuant") -> None:
        _check_choice(where, "w_format", self.w_format, W_FORMATS)
        _check_choice(where, "a_format", self.a_format, A_FORMATS)
        _check_choice(where, "w_granularity", self.w_granularity, W_GRANULARITIES)
        _check_choice(where, "a_mode", self.a_mode, A_MODES)
        _check_choice(where, "w_init", self.w_init, W_INITS)
        _check_choice(where, "a_init", self.a_init, W_INITS)
        for name in ("w_symmetric", "a_symmetric", "w_learnable", "a_learnable"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{where}.{name}: must be true/false, got {getattr(self, name)!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"{where}.group_size: must be a positive int, got {self.group_size!r}")
        if self.w_bits is not None:
            if self.w_format == "int":
                _check_bits(where, "w_bits", self.w_bits, INT_BITS)
            else:
                self.w_exp_bits, self.w_man_bits = _fp_split(where, "w", self.w_bits, self.w_exp_bits,
                                                             self.w_man_bits, FP_WEIGHT_FORMATS)
        if self.a_bits is not None:
            if self.a_format == "int":
                _check_bits(where, "a_bits", self.a_bits, INT_BITS)
            else:
                self.a_exp_bits, self.a_man_bits = _fp_split(where, "a", self.a_bits, self.a_exp_bits,
                                                             self.a_man_bits, FP_ACT_FORMATS)
                if self.a_mode == "timestep":
                    raise ValueError(f"{where}.a_mode: 'timestep' activation quantizers are integer only "
                                     "(a_format='int'); use a_mode 'static' or 'token' for FP activations")
        if self.attn_bits is not None:
            if self.a_format == "int":
                _check_bits(where, "attn_bits", self.attn_bits, INT_BITS)
            else:
                _check_bits(where, "attn_bits", self.attn_bits, FP_BITS)
        self._validate_attn_p(where)

    def _validate_attn_p(self, where: str) -> None:
        if self.attn_p_format is not None:
            _check_choice(where, "attn_p_format", self.attn_p_format, P_FORMATS)
        fmt = self.p_format
        if fmt == "none":
            if self.attn_p_bits is not None or self.attn_p_exp_bits is not None or self.attn_p_man_bits is not None:
                raise ValueError(f"{where}: attn_p_bits / attn_p_exp_bits / attn_p_man_bits have no meaning with "
                                 "attn_p_format 'none' (P stays FP); leave them null")
            return
        if self.attn_p_bits is not None:
            _check_bits(where, "attn_p_bits", self.attn_p_bits, INT_BITS if fmt == "int" else FP_ACT_BITS)
        if (self.attn_p_exp_bits is None) != (self.attn_p_man_bits is None):
            raise ValueError(f"{where}: give both attn_p_exp_bits and attn_p_man_bits (or neither)")
        if self.attn_p_exp_bits is not None and fmt != "fp":
            raise ValueError(f"{where}: attn_p_exp_bits/attn_p_man_bits need an FP P format (attn_p_format 'fp', "
                             f"or a_format 'fp' with attn_p_format null), got {fmt!r}")
        if fmt == "fp" and self.a_mode == "timestep" and self.attn_bits is not None:
            raise ValueError(f"{where}.attn_p_format: 'timestep' quantizers are integer only; an FP P needs "
                             "a_mode 'static' or 'token'")
        if fmt == "fp" and self.p_bits is not None:
            if self.attn_p_exp_bits is not None:
                e, m = self.attn_p_exp_bits, self.attn_p_man_bits
                if (isinstance(e, bool) or not isinstance(e, int) or isinstance(m, bool) or not isinstance(m, int)
                        or e < 1 or m < 0 or e + m != self.p_bits):
                    raise ValueError(f"{where}: attn_p_exp_bits={e}, attn_p_man_bits={m} do not make an unsigned "
                                     f"{self.p_bits}-bit FP format (need E + M == {self.p_bits}, E >= 1, M >= 0)")

    @property
    def p_format(self) -> str:
        """Resolved format of the softmax probabilities P: "int" | "fp" | "none" (FP)."""
        return self.a_format if self.attn_p_format is None else self.attn_p_format

    @property
    def p_bits(self) -> Optional[int]:
        """Resolved width of P (None: P not quantized)."""
        if self.attn_bits is None or self.p_format == "none":
            return None
        return self.attn_bits if self.attn_p_bits is None else self.attn_p_bits

    def p_split(self) -> tuple[int, int]:
        """Unsigned (E, M) of an FP P (E + M == :attr:`p_bits`): the explicit split, else the activation
        split at the activation width, else FP_ACT_FORMATS, else E5 (fp16's exponent); the sign bit of
        the signed split goes to the mantissa."""
        bits = self.p_bits
        if self.p_format != "fp" or bits is None:
            raise ValueError(f"p_split: P is not an FP format here (p_format={self.p_format!r}, p_bits={bits})")
        if self.attn_p_exp_bits is not None:
            return self.attn_p_exp_bits, self.attn_p_man_bits
        if self.a_format == "fp" and bits == self.a_bits:
            e, m = self.a_exp_bits, self.a_man_bits
        elif bits in FP_ACT_FORMATS:
            e, m = FP_ACT_FORMATS[bits]
        else:
            e, m = P_WIDE_EXP_BITS, bits - 1 - P_WIDE_EXP_BITS
        return e, m + 1

    @property
    def quantizes_weight(self) -> bool:
        return self.w_bits is not None

    @property
    def quantizes_input(self) -> bool:
        return self.a_bits is not None and self.a_mode != "none"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "LayerQuant") -> "LayerQuant":
        if not isinstance(data, dict):
            raise TypeError(f"{where}: expected a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - set(LAYER_QUANT_FIELDS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed keys: {list(LAYER_QUANT_FIELDS)}")
        return cls(**data)


LAYER_QUANT_FIELDS = tuple(f.name for f in dataclasses.fields(LayerQuant))
RULE_KEYS = LAYER_QUANT_FIELDS + ("skip",)


def _check_choice(where, name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{where}.{name}: must be one of {list(allowed)}, got {value!r}")


def _check_bits(where, name, value, allowed):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}.{name}: must be an int in {allowed[0]}..{allowed[-1]} or None, got {value!r}")
    if value not in allowed:
        raise ValueError(f"{where}.{name}: bits out of range, must be in {allowed[0]}..{allowed[-1]}, got {value}")


def _fp_split(where, prefix, bits, exp_bits, man_bits, table):
    _check_bits(where, f"{prefix}_bits", bits, FP_BITS)
    if exp_bits is None and man_bits is None:
        return table[bits]
    if exp_bits is None or man_bits is None:
        raise ValueError(f"{where}: give both {prefix}_exp_bits and {prefix}_man_bits (or neither)")
    if exp_bits < 1 or man_bits < 0 or 1 + exp_bits + man_bits != bits:
        raise ValueError(f"{where}: {prefix}_exp_bits={exp_bits}, {prefix}_man_bits={man_bits} do not make a "
                         f"signed {bits}-bit FP format (need 1 + E + M == {bits}, E >= 1, M >= 0)")
    return exp_bits, man_bits


def _apply_overrides(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for width, e, m in (("w_bits", "w_exp_bits", "w_man_bits"), ("a_bits", "a_exp_bits", "a_man_bits"),
                        ("attn_p_bits", "attn_p_exp_bits", "attn_p_man_bits")):
        # a new width without a new split re-derives the FP split
        if width in overrides and e not in overrides and m not in overrides:
            out[e] = None
            out[m] = None
    out.update(overrides)
    return out


@dataclass
class QuantSpec:
    """Default :class:`LayerQuant` + ordered name rules (see module docstring)."""

    default: LayerQuant = field(default_factory=LayerQuant)
    rules: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.default, dict):
            self.default = LayerQuant.from_dict(self.default, "QuantSpec.default")
        if not isinstance(self.default, LayerQuant):
            raise TypeError(f"QuantSpec.default must be a LayerQuant, got {type(self.default).__name__}")
        rules = []
        for i, rule in enumerate(self.rules):
            where = f"QuantSpec.rules[{i}]"
            if not isinstance(rule, (tuple, list)) or len(rule) != 2:
                raise ValueError(f"{where}: each rule must be a (pattern, overrides) pair, got {rule!r}")
            pattern, overrides = rule
            check_pattern(pattern, where)
            if not isinstance(overrides, dict):
                raise TypeError(f"{where} ({pattern!r}): overrides must be a dict, got {type(overrides).__name__}")
            unknown = sorted(set(overrides) - set(RULE_KEYS))
            if unknown:
                raise ValueError(f"{where} ({pattern!r}): unknown key(s) {unknown}; allowed keys: {list(RULE_KEYS)}")
            if "skip" in overrides and not isinstance(overrides["skip"], bool):
                raise TypeError(f"{where} ({pattern!r}): 'skip' must be true/false")
            # validate the values on top of the default now, not at surgery time
            merged = _apply_overrides(self.default.to_dict(), {k: v for k, v in overrides.items() if k != "skip"})
            LayerQuant(**merged).validate(f"{where} ({pattern!r})")
            rules.append((pattern, dict(overrides)))
        self.rules = rules

    def resolve(self, name: str, first: Optional[str] = None, last: Optional[str] = None) -> Optional[LayerQuant]:
        """The layer config of module ``name`` or None (skipped). ``first``/``last``: the names the
        ``@first``/``@last`` tokens stand for (:func:`quantize_model` passes them)."""
        cfg = self.default.to_dict()
        skip = False
        for pattern, overrides in self.rules:
            if matches(pattern, name, first, last):
                skip = overrides.get("skip", skip)
                cfg = _apply_overrides(cfg, {k: v for k, v in overrides.items() if k != "skip"})
        if skip:
            return None
        return LayerQuant(**cfg)

    def with_fields(self, **fields) -> "QuantSpec":
        """The same spec with ``fields`` (LayerQuant field names) forced on every layer: set in the
        default and removed from every rule (e.g. ``with_fields(w_init="minmax")`` for a surgery whose
        weight ranges are replaced afterwards)."""
        unknown = sorted(set(fields) - set(LAYER_QUANT_FIELDS))
        if unknown:
            raise ValueError(f"QuantSpec.with_fields: unknown field(s) {unknown}; allowed: {list(LAYER_QUANT_FIELDS)}")
        return QuantSpec(default=dataclasses.replace(self.default, **fields),
                         rules=[(p, {k: v for k, v in o.items() if k not in fields}) for p, o in self.rules])

    def to_dict(self) -> dict:
        return {"default": self.default.to_dict(), "rules": [[p, dict(o)] for p, o in self.rules]}

    @classmethod
    def from_dict(cls, data: dict) -> "QuantSpec":
        if not isinstance(data, dict):
            raise TypeError(f"QuantSpec.from_dict: expected a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {"default", "rules"})
        if unknown:
            raise ValueError(f"QuantSpec: unknown key(s) {unknown}; allowed keys: ['default', 'rules']")
        default = LayerQuant.from_dict(data.get("default", {}), "QuantSpec.default")
        return cls(default=default, rules=[tuple(r) for r in data.get("rules", [])])


def default_rules(keep_bits: Optional[int] = 8) -> list:
    """Rules that keep input/output layers and embeddings at ``keep_bits`` (None = FP).

    ``@first``/``@last`` (first/last quantizable layer in registration order) and ``*emb*`` (timestep,
    class and position embeddings, ResNet time-embedding projections) — the MPQ-DM / Q-Diffusion
    convention. Added by us because registration order does not put the output layer last in every
    diffusers model (PixArt registers ``adaln_single``/``caption_projection`` after ``proj_out``): the
    model-level output projection ``proj_out``/``proj_out_<i>`` (DiT/PixArt; FP4DiT excludes it) and the
    caption projection (FP4DiT's ``text_embedder``), matched at the top level of the diffusers model or
    one wrapper level below (``net.proj_out`` of a DiffusionBackbone) — not the ``proj_out`` layers
    inside transformer blocks. Only the weight bits change; activation settings follow the default.
    """
    patterns = ["@first", "@last", "*emb*", r"re:([^.]+\.)?proj_out(_\d+)?",
                r"re:([^.]+\.)?caption_projection\..+"]
    if keep_bits is None:
        return [(p, {"skip": True}) for p in patterns]
    _check_bits("default_rules", "keep_bits", keep_bits, INT_BITS)
    return [(p, {"w_bits": keep_bits, "w_format": "int"}) for p in patterns]


# ------------------------------------------------------------------------------------------------
# building quantizers from a LayerQuant
# ------------------------------------------------------------------------------------------------
def build_weight_quantizer(lq: LayerQuant, bits: Optional[int] = None, channel_mask=None) -> nn.Module:
    """An uncalibrated weight quantizer (ch_axis 0) for ``lq`` (``bits`` overrides ``lq.w_bits``)."""
    bits = lq.w_bits if bits is None else bits
    if lq.w_format == "int":
        return IntQuantizer(bits, symmetric=lq.w_symmetric, granularity=lq.w_granularity,
                            group_size=lq.group_size, ch_axis=0, init=lq.w_init, learnable=lq.w_learnable,
                            channel_mask=channel_mask)
    if bits == lq.w_bits:
        e, m = lq.w_exp_bits, lq.w_man_bits
    else:
        e, m = FP_WEIGHT_FORMATS[bits]
    return FPQuantizer(e, m, signed=True, granularity=lq.w_granularity, group_size=lq.group_size, ch_axis=0,
                       channel_mask=channel_mask, init="mse" if lq.w_init == "mse" else "absmax",
                       learnable=lq.w_learnable)


def build_act_quantizer(lq: LayerQuant, bits: Optional[int] = None, context=None,
                        timesteps: Optional[Sequence[int]] = None, signed: bool = True,
                        token_rows: str = "auto") -> Optional[nn.Module]:
    """The activation quantizer of ``lq`` (``bits`` overrides ``lq.a_bits``; ``signed=False`` for
    post-softmax probabilities; ``token_rows`` for a_mode 'token': "auto" = last dim, or (b, c) planes
    of conv inputs; "last_dim" for attention tensors), or None for FP / a_mode 'none'."""
    from pipeline.quant import act

    bits = lq.a_bits if bits is None else bits
    if bits is None or lq.a_mode == "none":
        return None
    fp = lq.a_format == "fp"
    if fp:
        e, m = (lq.a_exp_bits, lq.a_man_bits) if bits == lq.a_bits else FP_ACT_FORMATS[bits]
        if not signed:  # the sign bit goes to the mantissa for unsigned probabilities
            m = m + 1
    if lq.a_mode == "static":
        if fp:
            return act.StaticActQuantizer(bits, fmt="fp", exp_bits=e, man_bits=m, signed=signed,
                                          init=lq.a_init, learnable=lq.a_learnable)
        return act.StaticActQuantizer(bits, symmetric=lq.a_symmetric and signed, init=lq.a_init,
                                      learnable=lq.a_learnable)
    if lq.a_mode == "timestep":
        if timesteps is None or context is None:
            raise ValueError("a_mode='timestep' needs the sampler's timesteps: pass timesteps=[...] to quantize_model")
        return act.TimestepActQuantizer(bits, list(timesteps), context, symmetric=lq.a_symmetric and signed,
                                        learnable=lq.a_learnable, init=lq.a_init)
    # token
    if fp:
        return act.OnlineTokenActQuantizer(bits, fmt="fp", exp_bits=e, man_bits=m, signed=signed, rows=token_rows)
    return act.OnlineTokenActQuantizer(bits, fmt="int", signed=signed, rows=token_rows)


def build_layer(module: nn.Module, lq: LayerQuant, context=None, timesteps=None):
    """QuantLinear / QuantConv2d for ``module`` configured by ``lq`` (weight quantizer calibrated)."""
    w_quant = [build_weight_quantizer(lq)] if lq.quantizes_weight else []
    a_quant = build_act_quantizer(lq, context=context, timesteps=timesteps) if lq.quantizes_input else None
    cls = QuantLinear if isinstance(module, nn.Linear) else QuantConv2d
    return cls.from_float(module, w_quant, a_quant)


def build_softmax_quantizer(lq: LayerQuant, context=None, timesteps=None) -> Optional[nn.Module]:
    """The unsigned quantizer of the softmax probabilities P (:attr:`LayerQuant.p_bits` /
    :attr:`~LayerQuant.p_format`, FP split :meth:`LayerQuant.p_split`) with the activation mode
    (a_mode 'none' -> static), or None when P stays FP."""
    from pipeline.quant import act

    bits = lq.p_bits
    if bits is None:
        return None
    mode = "static" if lq.a_mode == "none" else lq.a_mode
    if lq.p_format == "int":
        if mode == "static":
            return act.StaticActQuantizer(bits, symmetric=False, init=lq.a_init, learnable=lq.a_learnable)
        if mode == "timestep":
            if timesteps is None or context is None:
                raise ValueError("a_mode='timestep' needs the sampler's timesteps: pass timesteps=[...] to "
                                 "quantize_model")
            return act.TimestepActQuantizer(bits, list(timesteps), context, symmetric=False,
                                            learnable=lq.a_learnable, init=lq.a_init)
        return act.OnlineTokenActQuantizer(bits, fmt="int", signed=False, rows="last_dim")
    e, m = lq.p_split()
    if mode == "static":
        return act.StaticActQuantizer(bits, fmt="fp", exp_bits=e, man_bits=m, signed=False, init=lq.a_init,
                                      learnable=lq.a_learnable)
    return act.OnlineTokenActQuantizer(bits, fmt="fp", exp_bits=e, man_bits=m, signed=False, rows="last_dim")


def build_attention_processor(lq: LayerQuant, context=None, timesteps=None) -> QuantAttnProcessor:
    """Q, K, V (signed) quantizers at ``attn_bits`` with the activation mode/format (a_mode 'none' ->
    static: 'none' only turns off the layer-input quantizers) and P's (:func:`build_softmax_quantizer`)."""
    cfg = lq if lq.a_mode != "none" else dataclasses.replace(lq, a_mode="static")

    def make():
        return build_act_quantizer(cfg, bits=lq.attn_bits, context=context, timesteps=timesteps, signed=True,
                                   token_rows="last_dim")

    return QuantAttnProcessor(q_quantizer=make(), k_quantizer=make(),
                              p_quantizer=build_softmax_quantizer(lq, context, timesteps), v_quantizer=make())


# ------------------------------------------------------------------------------------------------
# surgery
# ------------------------------------------------------------------------------------------------
def _is_float_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, QUANT_LAYER_TYPES)


def quantizable_layers(model: nn.Module) -> list:
    """(name, module) of every nn.Linear / nn.Conv2d in registration order (the @first/@last order)."""
    return [(n, m) for n, m in model.named_modules() if _is_float_layer(m)]


def attention_modules(model: nn.Module) -> list:
    return [(n, m) for n, m in model.named_modules() if is_attention_module(m)]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def resolve_model(model: nn.Module, spec: QuantSpec) -> dict:
    """{name: LayerQuant | None} for every quantizable layer and attention module (no changes made)."""
    layers = quantizable_layers(model)
    first = layers[0][0] if layers else None
    last = layers[-1][0] if layers else None
    out = {n: spec.resolve(n, first, last) for n, _ in layers}
    for n, _ in attention_modules(model):
        out[n] = spec.resolve(n)
    return out


def model_timesteps(model: nn.Module) -> Optional[list]:
    """The sampler timesteps :func:`quantize_model` (or ``packing.load_quantized``) recorded on ``model``
    (None if none were given); stored with the model by the packing and checkpoint writers."""
    return getattr(model, "_quant_timesteps", None)


def set_model_timesteps(model: nn.Module, timesteps: Optional[Sequence[int]]) -> None:
    """Record the sampler timesteps on ``model`` (see :func:`model_timesteps`)."""
    model._quant_timesteps = None if timesteps is None else [int(t) for t in timesteps]


def get_timestep_context(model: nn.Module):
    """The TimestepContext installed on ``model`` by :func:`quantize_model` (None if none)."""
    return getattr(model, "_quant_timestep_context", None)


def ensure_timestep_context(model: nn.Module):
    ctx = get_timestep_context(model)
    if ctx is None:
        from pipeline.quant.act import install_timestep_context

        ctx = install_timestep_context(model)
        model._quant_timestep_context = ctx  # plain attribute, not a sub-module
    return ctx


def quantize_model(model: nn.Module, spec: QuantSpec, timesteps: Optional[Sequence[int]] = None) -> dict:
    """Wrap ``model`` in place per ``spec``: nn.Linear/nn.Conv2d -> QuantLinear/QuantConv2d (weight
    quantizers calibrated on the weights, activation quantizers uncalibrated: run
    :func:`calibrate_activations`), attention processors -> QuantAttnProcessor where ``attn_bits``.

    ``timesteps``: the sampler's timesteps (needed when any rule uses a_mode='timestep'; a
    TimestepContext is then installed on ``model``). Returns {name: LayerQuant} of the wrapped layers
    and attention modules (layers whose config quantizes nothing are left as they are).
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    resolved = resolve_model(model, spec)
    needs_ctx = False
    for name, lq in resolved.items():
        if lq is None or lq.a_mode != "timestep":
            continue
        if is_attention_module(model.get_submodule(name)):
            needs_ctx |= lq.attn_bits is not None
        else:
            needs_ctx |= lq.quantizes_input
    if needs_ctx and timesteps is None:
        raise ValueError("quantize_model: spec uses a_mode='timestep'; pass timesteps=[...] "
                         "(the sampler's timestep values, e.g. pipeline.sampling.timestep_values)")
    context = ensure_timestep_context(model) if needs_ctx else None
    if timesteps is not None:
        timesteps = [int(t) for t in timesteps]
    done = {}
    for name, lq in resolved.items():
        mod = model.get_submodule(name)
        if lq is None:
            continue
        if is_attention_module(mod):
            if lq.attn_bits is not None:
                check_supported(mod, name)
                mod.set_processor(build_attention_processor(lq, context, timesteps))
                done[name] = lq
            continue
        if not (lq.quantizes_weight or lq.quantizes_input):
            continue
        _set_submodule(model, name, build_layer(mod, lq, context, timesteps))
        done[name] = lq
    if timesteps is not None or not hasattr(model, "_quant_timesteps"):
        set_model_timesteps(model, timesteps)  # saved by packing.save_quantized / checkpoint.save_student
    return done


def quant_layers(model: nn.Module) -> Iterator[tuple]:
    """(name, QuantLinear | QuantConv2d) in registration order."""
    for n, m in model.named_modules():
        if isinstance(m, QUANT_LAYER_TYPES):
            yield n, m


def quant_attention(model: nn.Module) -> Iterator[tuple]:
    """(attention module name, QuantAttnProcessor) in registration order."""
    for n, m in model.named_modules():
        if is_attention_module(m) and isinstance(getattr(m, "processor", None), QuantAttnProcessor):
            yield n, m.processor


def quant_state(model: nn.Module, weight: bool, act: bool) -> None:
    """Switch weight / activation fake quantization of every wrapped layer and attention processor."""
    for _, layer in quant_layers(model):
        layer.weight_quant = bool(weight)
        layer.act_quant = bool(act)
    for _, proc in quant_attention(model):
        proc.act_quant = bool(act)


def activation_quantizers(model: nn.Module) -> Iterator[tuple]:
    """(qualified name, activation quantizer) of every layer input and attention operand."""
    for n, layer in quant_layers(model):
        if layer.act_quantizer is not None:
            yield f"{n}.act_quantizer", layer.act_quantizer
    for n, proc in quant_attention(model):
        for k, q in proc.quantizers().items():
            yield f"{n}.processor.{k}", q


@contextlib.contextmanager
def calibrating(model: nn.Module):
    """Context: every calibratable activation quantizer observes (and passes FP values through)."""
    qs = [q for _, q in activation_quantizers(model) if hasattr(q, "calibrating")]
    for q in qs:
        q.calibrating = True
    try:
        yield qs
    finally:
        for q in qs:
            q.calibrating = False


def calibrate_activations(model: nn.Module, run_fn: Callable[[], Any]) -> None:
    """Calibrate the static / timestep activation quantizers: observe FP activations during
    ``run_fn()`` (weights stay quantized if they were, activations pass through unquantized), then
    compute the scales. Online per-token quantizers need no calibration and are left alone."""
    names = {id(q): n for n, q in activation_quantizers(model)}
    with torch.no_grad(), calibrating(model) as qs:
        run_fn()
        for q in qs:
            try:
                q.finish_calibration()
            except RuntimeError as exc:
                raise RuntimeError(f"calibrate_activations: {names[id(q)]}: {exc} (was this layer run by "
                                   "run_fn?)") from None


def set_mse_samples(model: nn.Module, n: int) -> None:
    """Cap the values an MSE-initialised activation quantizer keeps (per timestep for the per-timestep
    ones) at ``n``: every layer-input and attention-operand quantizer, both parts of a split one."""
    stack = [q for _, q in activation_quantizers(model)]
    while stack:
        q = stack.pop()
        if hasattr(q, "max_samples"):
            q.max_samples = int(n)
        if isinstance(q, nn.Module):
            stack.extend(q.children())


def calibrate_on(backbone: nn.Module, calib, *, batches: Optional[int], seed: int = 0, device=None,
                 batch_size: int = 64, mse_samples: Optional[int] = None) -> None:
    """Activation calibration of a quantized backbone on a calibration set, the one way every family does it.

    ``batches`` shuffled batches (order drawn from ``seed``) of ``batch_size`` inputs of ``calib`` (a
    :class:`pipeline.calibration.CalibrationSet`) run through ``backbone(x, t, labels)`` while the static and
    per-timestep activation quantizers observe (:func:`calibrate_activations`); ``batches=None`` runs every
    input once, in file order. ``mse_samples`` caps what the MSE-initialised quantizers keep
    (:func:`set_mse_samples`; None leaves their own cap). Weight and activation switches stay as the caller
    set them (observing quantizers pass FP values through either way)."""
    if batches is not None and batches < 1:
        raise ValueError(f"calibrate_on: batches must be None (all) or >= 1, got {batches}")
    if mse_samples is not None:
        set_mse_samples(backbone.net, mse_samples)

    def run():
        for x, t, y in calib.batches(batch_size, device, shuffle=batches is not None, seed=seed, limit=batches):
            backbone(x, t, y)

    calibrate_activations(backbone.net, run)
