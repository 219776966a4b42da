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

# modules that register methods when imported (kept lazy: importing torch is slow)
_METHOD_MODULES = ("pipeline.methods.naive_ptq",)


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


_REGISTRY: dict[str, Method] = {}


def register(name: str, config_cls: type, *, config_section: Optional[str] = None,
             backbones: tuple[str, ...] = ("unet", "dit", "pixart"), description: str = ""):
    """Decorator: register ``fn`` as method ``name``."""

    def deco(fn: Callable[..., QuantResult]) -> Callable[..., QuantResult]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = Method(name, fn, config_section or name, config_cls, tuple(backbones),
                                 description or (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return deco


def _load_all() -> None:
    for mod in _METHOD_MODULES:
        importlib.import_module(mod)


def available() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r} (registered methods: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]
