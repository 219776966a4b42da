"""Unpacked "student" checkpoint of a fake-quantized model: everything needed to resume training it.

:func:`save_student` writes the wrapped model as it is, un-merged and un-packed: the full state dict
(frozen FP weights, LoRA factors, weight and activation quantizer parameters, channel masks, pre-scales,
binary-residual α, AdaRound logits) as ``student.safetensors``, and the structure the spec alone does not
determine (per-layer weight quantizers — several masked ones for mixed groups, integer or FP — residual,
in_scale, LoRA rank, AdaRound, quant switches) with the spec and the sampler timesteps as ``student.json``.
:func:`load_student` rebuilds that model on a fresh FP model of the same architecture: surgery with the
spec (attention processors and activation quantizers come from it), then each layer's saved structure,
then the state dict (strict), so the forward is identical to the saved model's.

Unlike :mod:`pipeline.quant.packing` (real low-bit storage of a finished model) nothing is packed and any
trainable state survives; safetensors + JSON, nothing pickled.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

CHECKPOINT_FILE = "student.safetensors"
STRUCTURE_FILE = "student.json"
CHECKPOINT_VERSION = 1


def save_student(net: nn.Module, spec, out_dir: Union[str, Path], meta: Optional[dict] = None) -> None:
    """Write ``student.safetensors`` (the full state dict of the wrapped ``net``) and ``student.json`` (spec,
    timesteps, per-layer structure, ``meta``) into ``out_dir`` (created; not atomic — callers wrap it).
    ``net`` is the model :func:`pipeline.quant.surgery.quantize_model` wrapped with ``spec``."""
    from pipeline.io import save_safetensors

    from .primitives import weight_quantizer_desc
    from .surgery import QuantSpec, model_timesteps, quant_layers

    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    out = Path(out_dir)
    layers = {}
    for name, layer in quant_layers(net):
        if layer.packed_weight is not None:
            raise ValueError(f"save_student: layer {name!r} holds a packed weight (a load_quantized model); "
                             "save it with pipeline.quant.packing.save_quantized")
        layers[name] = {
            "quantizers": [weight_quantizer_desc(q) for q in layer.weight_quantizers],
            "residual": None if layer.residual is None else {"masked": layer.residual.channel_mask is not None},
            "in_scale": layer.in_scale is not None,
            "lora_rank": layer.lora_rank,
            "adaround": layer.adaround is not None,
            "weight_quant": bool(layer.weight_quant), "act_quant": bool(layer.act_quant),
        }
    structure = {"version": CHECKPOINT_VERSION, "spec": spec.to_dict(), "timesteps": model_timesteps(net),
                 "layers": layers, "meta": meta or {}}
    json.dumps(structure)  # fail before writing when meta is not JSON
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, str(out / CHECKPOINT_FILE))
    (out / STRUCTURE_FILE).write_text(json.dumps(structure, indent=2, sort_keys=True) + "\n")


def load_student(fp_net: nn.Module, out_dir: Union[str, Path]):
    """Rebuild the model saved by :func:`save_student` on ``fp_net``, a fresh FP model of the same
    architecture (modified in place). Returns (net, spec, meta). Errors name the file / layer."""
    from safetensors.torch import load_file

    from .layers import QUANT_LAYER_TYPES
    from .primitives import BinaryResidual, weight_quantizer_from_desc
    from .surgery import QuantSpec, quant_layers, quantize_model

    out = Path(out_dir)
    for f in (STRUCTURE_FILE, CHECKPOINT_FILE):
        if not (out / f).is_file():
            raise FileNotFoundError(f"{out}: missing {f} (not a student checkpoint written by save_student)")
    structure = json.loads((out / STRUCTURE_FILE).read_text())
    if structure.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{out / STRUCTURE_FILE}: unsupported version {structure.get('version')!r} "
                         f"(expected {CHECKPOINT_VERSION})")
    tensors = load_file(str(out / CHECKPOINT_FILE))
    spec = QuantSpec.from_dict(structure["spec"])
    # the weight ranges come from the file: wrap with the cheap min-max init
    quantize_model(fp_net, spec.with_fields(w_init="minmax"), timesteps=structure.get("timesteps"))
    for name, entry in structure["layers"].items():
        try:
            layer = fp_net.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{out / STRUCTURE_FILE}: layer {name!r} does not exist in the model") from None
        if not isinstance(layer, QUANT_LAYER_TYPES):
            raise ValueError(f"{out / STRUCTURE_FILE}: layer {name!r} is not quantized by the saved spec")
        dev = layer.weight.device
        qs = []
        for g, d in enumerate(entry["quantizers"]):
            mask = tensors.get(f"{name}.weight_quantizers.{g}.channel_mask") if d["masked"] else None
            if d["masked"] and mask is None:
                raise ValueError(f"{out / CHECKPOINT_FILE}: layer {name!r} quantizer {g}: channel mask missing")
            try:
                qs.append(weight_quantizer_from_desc(d, mask).to(dev))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{out / STRUCTURE_FILE}: layer {name!r} quantizer {g}: bad description: "
                                 f"{exc}") from None
        residual = None
        if entry["residual"] is not None:
            mask = tensors.get(f"{name}.residual.channel_mask") if entry["residual"]["masked"] else None
            residual = BinaryResidual(layer.num_out_channels, mask).to(dev)
        layer.set_weight_quantizers(qs, residual, calibrate=False)
        if entry["in_scale"]:
            layer.set_in_scale(torch.ones(layer.weight.shape[1], device=dev))
        if entry["lora_rank"]:
            layer.add_lora(int(entry["lora_rank"]))
        if entry.get("adaround"):
            layer.use_adaround()  # shapes only: the rounding state (V, w_floor, ...) comes from the state dict
        layer.weight_quant, layer.act_quant = bool(entry["weight_quant"]), bool(entry["act_quant"])
    try:
        fp_net.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{out / CHECKPOINT_FILE}: does not fit the rebuilt student: {exc}") from None
    for _, layer in quant_layers(fp_net):
        for a in layer.adaround or ():
            if bool(a.hardened):
                a.harden()  # hardened rounding has no trainable logits
    return fp_net, spec, structure.get("meta", {})
