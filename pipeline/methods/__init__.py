"""Quantization methods, registered by name.

A method is a config dataclass plus one function

    quantize(backbone, calib, setting, cfg, ctx) -> QuantResult

registered with :func:`register`. Stages look methods up by name (``get_method``); nothing else in
the code base branches on a method's name. Variants of one paper (ablations) are registered under
their own names so each appears as a row of the results table.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional



@dataclass
class QuantResult:
    backbone: Any  # the quantized DiffusionBackbone (fake-quant modules in place)
    spec: Any  # the QuantSpec it was built from
    info: dict = field(default_factory=dict)  # numbers worth logging (times, losses, chosen k, ...)


@dataclass
class MethodContext:
    """What a method may use besides its inputs: the device, an MLflow run to log into, and the
    sampling / diffusion configs (for methods that train along trajectories)."""

    device: Any = "cpu"
    run: Any = None
    diffusion: Any = None
    sampling: Any = None
    backbone_name: str = ""
    variant: dict = field(default_factory=dict)
    workdir: Any = None
    extra: dict = field(default_factory=dict)


@dataclass
class Method:
    name: str
    fn: Callable[..., QuantResult]
    config_section: str  # key of its parameters inside its stage's params section
    config_cls: type
    backbones: tuple[str, ...]
    description: str = ""
    variant: dict = field(default_factory=dict)  # fixed switches of an ablation variant


_REGISTRY: dict[str, Method] = {}


def register(name: str, config_cls: type, *, config_section: Optional[str] = None,
             backbones: tuple[str, ...] = ("unet", "dit", "pixart"), description: str = "",
             variant: Optional[dict] = None):
    """Decorator: register ``fn`` as method ``name``. Ablation variants of one method register the same
    function several times under different names, each with its fixed ``variant`` switches (the
    function finds them in ``ctx.variant``)."""

    def deco(fn: Callable[..., QuantResult]) -> Callable[..., QuantResult]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = Method(name, fn, config_section or name, config_cls, tuple(backbones),
                                 description or (fn.__doc__ or "").strip().splitlines()[0], dict(variant or {}))
        return fn

    return deco


def _load_all() -> None:
    """Import every module of this package once: each registers its methods (kept lazy because
    the method modules import torch)."""
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def available() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r} (registered methods: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def resolve_matrix(matrix, section: str, method_name: str):
    """Check a quantizing stage's section against the registry and return ``(method, options)``:
    the method, and its options parsed into its config class. Errors name the key."""
    from ..config import MATRIX_KEYS, ConfigError, from_dict

    _load_all()
    option_keys = sorted({m.config_section for m in _REGISTRY.values()})
    for key in matrix.options:
        if key not in option_keys:
            raise ConfigError(f"{section}.{key}: unknown key (allowed keys: {', '.join(MATRIX_KEYS)}, "
                              f"and method option sections: {', '.join(option_keys)})")
    for i, name in enumerate(matrix.methods):
        if name not in _REGISTRY:
            raise ConfigError(f"{section}.methods[{i}]: unknown method {name!r} "
                              f"(registered methods: {', '.join(sorted(_REGISTRY))})")
    if method_name not in _REGISTRY:
        raise ConfigError(f"--method: unknown method {method_name!r} (registered methods: "
                          f"{', '.join(sorted(_REGISTRY))})")
    method = _REGISTRY[method_name]
    options = from_dict(method.config_cls, matrix.options.get(method.config_section, {}),
                        f"{section}.{method.config_section}")
    return method, options
