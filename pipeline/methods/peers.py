"""Peers: the quantization tools a user would pick instead of ours, run through the same pipeline and scored
in the same tables — optimum-quanto and torchao, each used the way its documentation says.

Rows (variant = tool, setting = what the tool is asked for; :data:`PEERS` is the whole mapping):

- ``quanto`` (optimum-quanto): ``quantize(net, weights=qint<W>, activations=qint8 | None)``, at A8 a
  ``Calibration()`` pass over the shared calibration inputs, then ``freeze``. Weights qint8 (symmetric, per
  output channel) / qint4 / qint2 (affine scale + shift, groups of 128 along the input where the input size
  allows, else per output channel: quanto's own choice); activations per-tensor static int8 (quanto quantizes
  the inputs and outputs of its modules). W2/W4/W8 x A8/FP; no other bits exist in quanto.
- ``torchao``: ``quantize_(net, config)`` with ``Int8WeightOnlyConfig`` (W8, FP activations),
  ``IntxWeightOnlyConfig(int<W>, PerGroup(group_size))`` (W2..W7, FP activations),
  ``Int8DynamicActivationInt8WeightConfig`` (W8A8: per-channel int8 weights, per-token dynamic symmetric int8
  activations) and ``Int8DynamicActivationIntxWeightConfig(int<W>, PerGroup(group_size))`` (W2..W7 A8,
  per-token dynamic asymmetric int8 activations). ``quantize_`` converts ``nn.Linear`` only (its default
  filter): torchao keeps every Conv2d FP, which the coverage column shows; with ``PerGroup`` a Linear whose
  input size is not a multiple of the group size stays FP too (torchao would raise;
  ``info["kept_fp_indivisible"]`` counts them).

Not used: torchao's ``Int4WeightOnlyConfig`` (its packed int4 path needs ``mslk >= 1.0``; the registry only has a
0.0.0 placeholder) — the CPU int4 path is ``IntxWeightOnlyConfig``, which stores int<W> codes unpacked in int8, so
torchao's W4 / W2 files are as large as its W8 ones (``peer_bytes`` / ``model_mb`` show the tool's real storage).

Every tool quantizes everything it converts by default (no first/last-layer exceptions: what a user gets), on
a deep copy of the FP backbone (the FP model given to :func:`quantize` is not modified). ``A32`` / ``A16``
mean FP activations. :func:`check_setting` refuses a setting the tool cannot do, so ``validate`` stops
before any compute.

Saving — how the evaluate stage scores exactly what the peer produced. A peer's quantized modules are
not the core's format and its activation quantization (quanto's static in/out quantizers, torchao's dynamic
per-token quantization, both with their own int8 kernels) cannot be rebuilt from our quantizers without
re-implementing the peer. So each model folder holds the peer's *own* serialization, reloaded by the peer's
*own* code:

- ``peer.safetensors`` + ``peer.json``: quanto's ``state_dict`` + ``quantization_map`` (reloaded with
  ``requantize``; plus the modules whose output quantization ``Calibration(streamline=True)`` switched off,
  which quanto's own serialization drops — without it a reloaded W8A8 model quantizes outputs the calibrated
  one does not), torchao's tensor-subclass state dict flattened with its safetensors support
  (``torchao.prototype.safetensors``; reloaded with ``unflatten_tensor_state_dict`` + ``load_state_dict(
  assign=True)``). safetensors only, nothing pickled.
- ``loader.json`` names :func:`load_peer_model`; :func:`pipeline.evaluation.load_entry` calls the loader a
  model folder names instead of ``packing.load_quantized`` (the hook is generic: it knows no family), and
  ``model_bytes`` counts the files it lists (``peer.safetensors``), i.e. the peer's real storage.
- ``packed.safetensors`` / ``quant_spec.json`` (the runner writes them for every family): the FP emulation
  of the peer in the core's format — every peer-quantized weight dequantized back to fp32, no quantizers.
  For the weight-only rows it reproduces the peer's forward to float rounding (a test checks it); for the
  activation-quantizing rows it is the weight part only. The evaluate stage does not use it for peers.

``info`` records ``coverage`` (the share of Linear / Conv2d weight parameters the peer actually stores
quantized, read off the quantized model's weight tensor types, not assumed), the peer's package and
version, its config, and ``peer_bytes``. Calibration (quanto A8 only): ``calib_batches`` batches of
``calib_batch_size`` inputs (null = the whole calibration file, in file order: then the row is
deterministic and one method seed suffices); an int draws a seeded random subset, as naive PTQ does.

A peer that fails to import or to run raises; the runner turns that into a failed row of the manifest while
the other rows still run. quanto's int4 / int2 kernels are a C++ extension that quanto JIT-builds once per
environment into its site-packages (cost: ``docs/measurements.md``, *Peer tools cost*). The first such row
of an environment pays it, in a warm-up on a tiny layer before the peer runs: ``info["setup_seconds"]`` (in
``method_seconds``, which times the whole phase), kept out of ``info["peer_seconds"]`` (the tool's own time).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..config import ConfigError, choice
from ..io import split_timings
from . import Family, MethodContext, QuantResult, Table, Variant, register_family

PEER_FILE = "peer.safetensors"
PEER_META = "peer.json"
LOADER_FILE = "loader.json"
_PREFIX = "net."
_FP_ACT = (16, 32)  # activation bits that mean "activations stay FP"


@dataclass(frozen=True)
class Peer:
    """One tool: its PyPI package, the weight bits it offers with FP activations and with 8-bit activations."""

    package: str
    module: str
    weight_only_bits: tuple
    w_a8_bits: tuple
    description: str


PEERS = {
    "quanto": Peer("optimum-quanto", "optimum.quanto", (2, 4, 8), (2, 4, 8),
                   "optimum-quanto: quantize + freeze; qint8/qint4/qint2 weights, A8 = static int8 from "
                   "quanto's Calibration() over the calibration inputs"),
    "torchao": Peer("torchao", "torchao", (2, 3, 4, 5, 6, 7, 8), (2, 3, 4, 5, 6, 7, 8),
                    "torchao quantize_: Int8WeightOnly (W8), IntxWeightOnly PerGroup (W2-W7), "
                    "Int8DynamicActivationInt8Weight (W8A8) / Int8DynamicActivationIntxWeight PerGroup (W2-W7 A8), "
                    "per-token dynamic int8 activations; Linear only"),
}


@dataclass
class PeersConfig:
    """Options of the peer tools (params section ``peers``).

    torchao_group_size: group size of torchao's ``IntxWeightOnlyConfig`` (W2..W7): ``PerGroup(group_size)``.
    calib_batches: quanto A8 calibration: batches of ``calib_batch_size`` inputs (null = all, in file order).
    calib_batch_size: inputs per calibration batch.
    seed: which calibration batches are drawn when ``calib_batches`` is set (the method seed offsets it).
    peer: the tool (:data:`PEERS`); each row sets it.
    """

    torchao_group_size: int = 32
    calib_batches: Optional[int] = None
    calib_batch_size: int = 64
    seed: int = 0
    peer: str = choice(*PEERS, default="quanto")

    def validate(self, p: str) -> None:
        if self.torchao_group_size < 1:
            raise ConfigError(f"{p}.torchao_group_size: must be >= 1, got {self.torchao_group_size}")
        if self.calib_batches is not None and self.calib_batches < 1:
            raise ConfigError(f"{p}.calib_batches: must be null (all) or >= 1, got {self.calib_batches}")
        if self.calib_batch_size < 1:
            raise ConfigError(f"{p}.calib_batch_size: must be >= 1, got {self.calib_batch_size}")


def check_setting(setting, cfg: PeersConfig) -> None:
    peer = PEERS[cfg.peer]
    if setting.abits in _FP_ACT:
        allowed = peer.weight_only_bits
    elif setting.abits == 8:
        allowed = peer.w_a8_bits
    else:
        raise ValueError(f"{peer.package} quantizes activations to 8 bits only (A8) or not at all (A16/A32)")
    if setting.wbits not in allowed:
        raise ValueError(f"{peer.package} offers weight bits {list(allowed)} with "
                         f"{'FP' if setting.abits in _FP_ACT else '8-bit'} activations, not W{setting.wbits}")


# ----------------------------------------------------------------------------------------------
# the peers
# ----------------------------------------------------------------------------------------------
def _import(peer: str):
    """The peer's module; an ImportError names the package to install."""
    try:
        return importlib.import_module(PEERS[peer].module)
    except ImportError as exc:
        raise ImportError(f"peer {peer!r} needs the package {PEERS[peer].package!r} "
                          f"(pip install -c constraints.txt {PEERS[peer].package}): {exc}") from exc


def _calibration_batches(calib, cfg: PeersConfig, device):
    if cfg.calib_batches is None:
        return calib.batches(cfg.calib_batch_size, device, shuffle=False)
    return calib.batches(cfg.calib_batch_size, device, shuffle=True, seed=cfg.seed, limit=cfg.calib_batches)


def _quanto_setup(quanto, weights, device) -> float:
    """Seconds to run one tiny layer at ``weights``: the first sub-8-bit one of an environment JIT-builds
    quanto's C++ kernels (cached in its site-packages afterwards), kept out of ``peer_seconds``."""
    t0 = time.time()
    layer = nn.Sequential(nn.Linear(128, 128)).to(device)
    quanto.quantize(layer, weights=weights)
    quanto.freeze(layer)
    with torch.no_grad():
        layer(torch.zeros(1, 128, device=device))
    return time.time() - t0


def _quanto(backbone, calib, setting, cfg: PeersConfig, device) -> dict:
    quanto = _import("quanto")
    weights = getattr(quanto, f"qint{setting.wbits}")
    setup = _quanto_setup(quanto, weights, device)
    acts = quanto.qint8 if setting.act_quantized else None
    quanto.quantize(backbone.net, weights=weights, activations=acts)
    n_calib = 0
    if acts is not None:
        with torch.no_grad(), quanto.Calibration():
            for x, t, y in _calibration_batches(calib, cfg, device):
                backbone(x, t, y)
                n_calib += len(x)
    quanto.freeze(backbone.net)
    return {"weights": f"qint{setting.wbits}", "activations": "qint8" if acts is not None else "none",
            "calib_inputs": n_calib, "setup_seconds": setup}


def _torchao_config(setting, cfg: PeersConfig):
    from torchao.quantization import (Int8DynamicActivationInt8WeightConfig, Int8DynamicActivationIntxWeightConfig,
                                      Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup)

    if setting.wbits == 8:
        return Int8DynamicActivationInt8WeightConfig() if setting.act_quantized else Int8WeightOnlyConfig()
    dtype, group = getattr(torch, f"int{setting.wbits}"), PerGroup(cfg.torchao_group_size)
    if setting.act_quantized:
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=group)
    return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=group)


def _torchao(backbone, calib, setting, cfg: PeersConfig, device) -> dict:
    _import("torchao")
    from torchao.quantization import quantize_

    config = _torchao_config(setting, cfg)
    gs = cfg.torchao_group_size
    grouped = setting.wbits != 8
    skipped = [n for n, m in backbone.net.named_modules()
               if grouped and isinstance(m, nn.Linear) and m.in_features % gs]

    def linear(m, fqn):  # torchao's default filter; PerGroup needs in_features divisible by the group size
        return isinstance(m, nn.Linear) and not (grouped and m.in_features % gs)

    quantize_(backbone.net, config, filter_fn=linear)
    return {"config": repr(config), "kept_fp_indivisible": len(skipped)}


_RUN = {"quanto": _quanto, "torchao": _torchao}


def _is_peer_quantized(weight) -> bool:
    """True for a weight the peer stores quantized: a tensor subclass (quanto QTensor, torchao tensor)."""
    return isinstance(weight, torch.Tensor) and type(weight) not in (torch.Tensor, nn.Parameter)


def coverage(net: nn.Module) -> dict:
    """Share of Linear / Conv weight parameters that ``net`` (after the peer ran) stores quantized."""
    total = quantized = 0
    for module in net.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            w = module.weight
            n = math.prod(w.shape)
            total += n
            quantized += n if _is_peer_quantized(w) else 0
    return {"coverage": quantized / total if total else 0.0, "quantized_params": quantized, "weight_params": total}


def dequantized_state(net: nn.Module) -> dict:
    """Plain fp tensors of every peer-quantized Linear / Conv weight (``module.weight.dequantize()``)."""
    out = {}
    for name, module in net.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and _is_peer_quantized(w):
            with torch.no_grad():
                out[f"{name}.weight"] = w.dequantize().detach().to(torch.float32).reshape(w.shape).clone()
    return out


# ----------------------------------------------------------------------------------------------
# integer-kernel exactness (issue: oneDNN's int8 path saturates under the pinned numerics)
# ----------------------------------------------------------------------------------------------
_PROBED: dict = {}


class IntMMRecorder:
    """Within ``with``: every ``torch._int_mm`` call (the entry point quanto's and torchao's int8 layers call)
    is checked against the int64 product of the same operands: ``calls`` (how many), ``max_error`` (largest
    absolute difference, 0 = exact). Wraps the Python attribute, so calls made inside custom ops count too."""

    def __init__(self):
        self.calls = 0
        self.max_error = 0
        self._orig = None

    def __enter__(self):
        self._orig = orig = torch._int_mm

        def checked(a, b, *args, **kwargs):
            out = orig(a, b, *args, **kwargs)
            ref = a.to(torch.int64) @ b.to(torch.int64)
            self.calls += 1
            self.max_error = max(self.max_error, int((out.to(torch.int64) - ref).abs().max()))
            return out

        torch._int_mm = checked
        return self

    def __exit__(self, *exc):
        torch._int_mm = self._orig
        return False


def _probe_layer(peer: str, device) -> nn.Module:
    """A 256 -> 128 Linear quantized by ``peer`` at W8A8, on inputs whose int8 codes fill the range (pairs of
    u8 x s8 products then exceed the int16 range an unsafe kernel sums them in)."""
    gen = torch.Generator().manual_seed(0)
    layer = nn.Sequential(nn.Linear(256, 128)).to(device).eval()
    with torch.no_grad():
        layer[0].weight.copy_(torch.empty(128, 256).uniform_(-1, 1, generator=gen))
    x = torch.empty(64, 256).uniform_(-4, 4, generator=gen).to(device)
    if peer == "quanto":
        quanto = _import("quanto")
        quanto.quantize(layer, weights=quanto.qint8, activations=quanto.qint8)
        with torch.no_grad(), quanto.Calibration():
            layer(x)
        quanto.freeze(layer)
    else:
        _import("torchao")
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(layer, Int8DynamicActivationInt8WeightConfig())
    return layer, x


def probe_int8_kernel(peer: str, device="cpu") -> dict:
    """Run ``peer``'s W8A8 linear layer once and check every integer matrix product it issues against the
    int64 product of the same int8 operands. Returns ``{"calls", "max_error"}``; raises ``RuntimeError``
    naming the tool when a product is wrong (its rows would be scored with a broken kernel). Cached per
    process and device."""
    key = (peer, str(device))
    if key in _PROBED:
        return _PROBED[key]
    layer, x = _probe_layer(peer, device)
    mode = IntMMRecorder()
    with torch.no_grad(), mode:
        layer(x)
    result = {"calls": mode.calls, "max_error": mode.max_error}
    if mode.max_error:
        from .. import cpu_numerics

        raise RuntimeError(
            f"peers: {PEERS[peer].package}'s int8 matrix product is wrong on this CPU: {mode.calls} torch._int_mm "
            f"call(s), max error {mode.max_error} against the exact int64 product (numerics "
            f"{cpu_numerics()}). Its rows would be scored with a broken kernel; refusing. oneDNN's int8 path "
            "without VNNI saturates 16-bit sums: keep pipeline.numerics' exact kernel on (PIPELINE_EXACT_INT_MM "
            "unset or 1).")
    _PROBED[key] = result
    return result


# ----------------------------------------------------------------------------------------------
# saving / loading the peer's own serialization
# ----------------------------------------------------------------------------------------------
def _quanto_output_quantization_off(net: nn.Module) -> list:
    """Modules whose output quantization quanto's ``Calibration(streamline=True)`` removed (their outputs feed
    no quantized op): a hook state that quanto's own state dict / quantization map do not carry."""
    out = []
    for name, m in net.named_modules():
        hook = getattr(m, "_quantize_hooks", {}).get("output")
        if getattr(m, "activation_qtype", None) is not None and hook is not None and hook.id not in m._forward_hooks:
            out.append(name)
    return out


def save_peer(net: nn.Module, peer: str, out_dir: Path, meta: dict) -> int:
    """Write the peer's own serialization of ``net`` into ``out_dir``; returns its bytes."""
    from ..io import save_safetensors

    from ..io import write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if peer == "quanto":
        quanto = _import("quanto")
        tensors = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items() if v is not None}
        save_safetensors(tensors, out_dir / PEER_FILE)
        meta = {**meta, "quantization_map": quanto.quantization_map(net),
                "output_quantization_off": _quanto_output_quantization_off(net)}
    else:
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        # keys prefixed: torchao's unflatten splits every name at its last dot (top-level names would fail)
        tensors, metadata = flatten_tensor_state_dict({f"{_PREFIX}{k}": v for k, v in net.state_dict().items()})
        save_safetensors({k: v.detach().contiguous().clone() for k, v in tensors.items()}, out_dir / PEER_FILE,
                  metadata=metadata)
    write_json(out_dir / PEER_META, {"peer": peer, **meta})
    write_json(out_dir / LOADER_FILE, {"loader": f"{__name__}:load_peer_model", "files": [PEER_FILE]})
    return (out_dir / PEER_FILE).stat().st_size


def load_peer_model(net: nn.Module, model_dir, device=None) -> nn.Module:
    """Rebuild the peer-quantized model saved in ``model_dir`` onto a freshly loaded FP ``net`` (the
    evaluate stage's loader for peer rows)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..io import read_json

    model_dir = Path(model_dir)
    meta = read_json(model_dir / PEER_META)
    device = device if device is not None else next(net.parameters()).device
    if meta.get("activations", "none") != "none" or "Int8DynamicActivation" in meta.get("config", ""):
        probe_int8_kernel(meta["peer"], device)  # refuse before scoring a row with a broken integer kernel
    tensors = load_file(model_dir / PEER_FILE, device=str(device))
    if meta["peer"] == "quanto":
        quanto = _import("quanto")
        quanto.requantize(net, tensors, meta["quantization_map"], device=torch.device(device))
        modules = dict(net.named_modules())
        for name in meta.get("output_quantization_off", []):
            modules[name].disable_output_quantization()
        loaded = {k for k, v in net.state_dict().items() if v is not None}
        if loaded != set(tensors):  # requantize loads with strict=False: check nothing was left out
            raise ValueError(f"{model_dir / PEER_FILE}: quanto state does not match the model "
                             f"(missing {sorted(loaded - set(tensors))[:5]}, unexpected {sorted(set(tensors) - loaded)[:5]})")
        return net
    _import("torchao")
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    with safe_open(model_dir / PEER_FILE, framework="pt") as f:
        metadata = f.metadata()
    state, leftover = unflatten_tensor_state_dict(tensors, metadata)
    if leftover:
        raise ValueError(f"{model_dir / PEER_FILE}: tensors not part of the state dict: {sorted(leftover)[:5]}")
    net.load_state_dict({k[len(_PREFIX):]: v for k, v in state.items()}, assign=True, strict=True)
    return net


# ----------------------------------------------------------------------------------------------
# the family
# ----------------------------------------------------------------------------------------------
def run_peer(peer: str, backbone, calib, setting, cfg: PeersConfig, device="cpu"):
    """``(peer-quantized deep copy of backbone, details)``; ``backbone`` itself is left unchanged."""
    check_setting(setting, dataclasses.replace(cfg, peer=peer))
    peer_bb = copy.deepcopy(backbone).eval()
    return peer_bb, _RUN[peer](peer_bb, calib, setting, cfg, device)


def quantize(backbone, calib, setting, cfg: PeersConfig, ctx: MethodContext) -> QuantResult:
    """Run the variant's peer on a deep copy of ``backbone``; return its FP emulation (dequantized weights)
    for the core's format and write the peer's own serialization into ``ctx.workdir``."""
    from importlib.metadata import version

    from ..quant.surgery import LayerQuant, QuantSpec

    peer = cfg.peer
    probe = probe_int8_kernel(peer, ctx.device) if setting.act_quantized else None
    t0 = time.time()
    peer_bb, details = run_peer(peer, backbone, calib, setting, cfg, ctx.device)
    seconds = time.time() - t0
    cov = coverage(peer_bb.net)
    emulation = copy.deepcopy(backbone).eval()
    deq = dequantized_state(peer_bb.net)
    with torch.no_grad():
        params = dict(emulation.net.named_parameters())
        for k, v in deq.items():
            params[k].copy_(v.to(params[k].device))
    if probe is not None:
        details = {**details, "int_mm_probe_calls": probe["calls"]}
    info = {**cov, "peer": peer, "peer_package": PEERS[peer].package,
            "peer_version": version(PEERS[peer].package), **details,
            "peer_seconds": seconds - details.get("setup_seconds", 0.0)}
    if ctx.run is not None:
        ctx.run.set_tags({"peer_package": info["peer_package"], "peer_version": info["peer_version"]})
    if ctx.workdir is not None:
        meta, _ = split_timings({k: v for k, v in info.items() if k != "peer"})  # no clock in a model file
        info["peer_bytes"] = save_peer(peer_bb.net, peer, Path(ctx.workdir), meta)
    # the core's view: no layer quantized by our quantizers (the weights already hold the peer's values)
    spec = QuantSpec(default=LayerQuant(w_bits=None), rules=[])
    return QuantResult(emulation, spec, info)


_OURS = {"unet": ("naive/naive", "dilatequant/dilatequant", "mpq/mpqdm2"),
         "dit": ("naive/naive", "fp4dit/fp4dit", "dilatequant/dilatequant")}
_NOTE = ("The tools at their own settings, next to our rows at the same bits where they ran (default run: naive at "
         "W8A8 / W4A8 / W4A32, and fp4dit at W4A8 on the DiT; dilatequant (W4A4, W6A6) and mpq (W2A4, W4A4) meet them only "
         "in a sweep that adds those settings). A32 = FP activations (naive W4A32 is ours weight-only). coverage = "
         "share of Linear/Conv weight parameters the tool stores quantized, read off its quantized model: quanto "
         "converts Linear and Conv2d (1.0), torchao Linear only (the UNet's convolutions stay FP). Ours quantize "
         "every Linear/Conv (naive, dilatequant, mpq: first/last/embedding layers at 8 bits; fp4dit keeps its "
         "skip list FP) and do not report the column. Activations: quanto A8 = static per-tensor int8 on the "
         "inputs and outputs of its modules, torchao A8 = dynamic per-token int8 (ours: static or per-timestep, "
         "per tensor; fp4dit per token). model_mb = the tool's own file; BitOPs count the tools' layers as FP.")

register_family(Family(
    name="peers", config_cls=PeersConfig, quantize=quantize, check_setting=check_setting,
    description="the tools a user would pick instead: optimum-quanto and torchao, as documented",
    variants=tuple(Variant(name, p.description, {"peer": name}) for name, p in PEERS.items()),
    backbones=("unet", "dit", "pixart"),
    tables=tuple(
        Table(title=f"Peer tools vs ours ({ {'unet': 'UNet', 'dit': 'DiT'}[bb]})", backbone=bb,
              columns=("fid_ratio", "accuracy", "coverage", "model_mb", "method_seconds"),
              baselines=_OURS[bb], note=_NOTE)
        for bb in ("unet", "dit")),
))
