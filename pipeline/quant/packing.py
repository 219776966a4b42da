"""Real low-bit storage of a fake-quantized model and its exact reload (model level; the bit streams
themselves are :mod:`pipeline.quant.bitstream`).

``save_quantized(model, spec, out_dir)`` writes two files:

- ``packed.safetensors``:
  ``q.<layer>.w<g>.codes``   weight codes of quantizer g, only the rows (output channels) it covers, as a dense
                             little-endian bit stream of ``bits`` bits per code (any width 1..8: 3-bit -> 8 codes
                             in 3 bytes; 8-bit codes are plain uint8). Integer codes are stored as ``code − qmin``
                             (unsigned); FP codes are the sign|exponent|mantissa codes of ``FPQuantizer.encode``.
  ``q.<layer>.w<g>.scale`` / ``.zero_point`` (int), ``.maxval`` (fp) or ``.mu`` / ``.alpha`` (1-bit binary,
                             codes = sign bits): fp32 (the quantizer's own dtype), covered rows only; zero
                             points only when one is non-zero.
  ``q.<layer>.w<g>.mask``    the channel mask as a bit stream (only for masked quantizers).
  ``q.<layer>.residual.{alpha,signs,mask}``  binary residual: α of the covered rows, one sign bit per weight.
  ``q.<layer>.in_scale``     the per-input-channel scale vector.
  ``q.<layer>.act.<key>``    the activation quantizer's state (scales, zero points, timestep tables).
  ``attn.<module>.<operand>.<key>``  attention matmul quantizers.
  ``fp.<key>``               every other tensor of the model's state dict (biases, norms, FP layers, ...) as is.
- ``quant_spec.json``: the spec, the sampler timesteps, per-layer resolved config and structure (quantizer
  formats, bits, granularity, how many rows each mask covers, residual, in_scale, activation quantizer type and
  constructor arguments, quant flags), per-attention-module operand quantizers, extra metadata and byte counts.

``load_quantized(fp_model, out_dir)`` wraps a freshly built FP model with the saved structure and loads the
state: each layer's weight is decoded with the same quantizer arithmetic the fake-quant path uses
(``IntQuantizer.dequantize`` / ``FPQuantizer.decode`` / ``BinaryQuantizer.dequantize``, summed over the groups in the same order, plus
``BinaryResidual.from_bits``), so the reloaded forward equals the fake-quant forward bit for bit.
``save_quantized`` verifies this decode before writing.

LoRA must be merged (``layer.merge_lora()``) and AdaRound hardened before saving; both raise a clear error
otherwise. safetensors only, nothing pickled.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from pipeline.quant import act as act_mod
from pipeline.quant.attention import QuantAttnProcessor, check_supported, is_attention_module
from pipeline.quant.bitstream import pack_bits, pack_mask, packed_size, unpack_bits, unpack_mask
from pipeline.quant.cost import quantized_layer_bytes
from pipeline.quant.layers import QUANT_LAYER_TYPES, QuantConv2d, QuantLinear, quantizer_channels
from pipeline.quant.primitives import (BinaryQuantizer, BinaryResidual, IntQuantizer, weight_quantizer_desc,
                                      weight_quantizer_from_desc)
from pipeline.quant.surgery import (QuantSpec, ensure_timestep_context, model_timesteps, quant_attention, quant_layers,
                                    set_model_timesteps)

PACKED_FILE = "packed.safetensors"
SPEC_FILE = "quant_spec.json"
FORMAT_VERSION = 1
_ACT_TYPES = ("StaticActQuantizer", "TimestepActQuantizer", "OnlineTokenActQuantizer", "SplitActQuantizer")


# ------------------------------------------------------------------------------------------------
# describing quantizers
# ------------------------------------------------------------------------------------------------
def act_quantizer_desc(q: nn.Module) -> dict:
    """Type name + constructor arguments of an activation quantizer (JSON)."""
    name = type(q).__name__
    if isinstance(q, act_mod.StaticActQuantizer):
        inner = q.quantizer
        args = {"bits": q.bits, "symmetric": q.symmetric, "fmt": q.fmt, "signed": q.signed, "init": q.init,
                "learnable": inner.learnable}
        if q.fmt == "fp":
            args.update(exp_bits=inner.exp_bits, man_bits=inner.man_bits)
    elif isinstance(q, act_mod.TimestepActQuantizer):
        args = {"bits": q.bits, "timesteps": q.timesteps, "symmetric": q.symmetric, "learnable": q.learnable,
                "init": q.init}
    elif isinstance(q, act_mod.OnlineTokenActQuantizer):
        args = {"bits": q.bits, "fmt": q.fmt, "exp_bits": q.exp_bits, "man_bits": q.man_bits, "signed": q.signed,
                "rows": q.rows}
    elif isinstance(q, act_mod.SplitActQuantizer):  # the two parts are described recursively
        args = {"split": q.split, "parts": [act_quantizer_desc(p) for p in q.parts]}
    else:
        raise TypeError(f"cannot save activation quantizer of type {name}; supported: {list(_ACT_TYPES)}")
    return {"type": name, "args": args, "enabled": bool(getattr(q, "enabled", True))}


def _build_act_quantizer(desc: dict, model: nn.Module, where: str) -> nn.Module:
    kind, args = desc.get("type"), dict(desc.get("args", {}))
    if kind == "StaticActQuantizer":
        q = act_mod.StaticActQuantizer(**args)
    elif kind == "TimestepActQuantizer":
        q = act_mod.TimestepActQuantizer(context=ensure_timestep_context(model), **args)
    elif kind == "OnlineTokenActQuantizer":
        q = act_mod.OnlineTokenActQuantizer(**args)
    elif kind == "SplitActQuantizer":
        parts = args.get("parts")
        if not isinstance(parts, list) or len(parts) != 2:
            raise ValueError(f"{where}: SplitActQuantizer needs two part descriptions, got {parts!r}")
        q = act_mod.SplitActQuantizer(int(args["split"]), *(_build_act_quantizer(d, model, f"{where} part {i}")
                                                             for i, d in enumerate(parts)))
    else:
        raise ValueError(f"{where}: unknown activation quantizer type {kind!r}; expected one of {list(_ACT_TYPES)}")
    q.enabled = bool(desc.get("enabled", True))
    return q


def _state_tensors(module: nn.Module, prefix: str) -> dict:
    return {f"{prefix}.{k}": v.detach().contiguous() for k, v in module.state_dict().items()}


def _load_state(module: nn.Module, tensors: dict, prefix: str, where: str) -> None:
    sub = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    try:
        missing, unexpected = module.load_state_dict(sub, strict=False)
    except RuntimeError as exc:
        raise ValueError(f"{where}: stored activation-quantizer state does not fit: {exc}") from None
    if missing or unexpected:
        raise ValueError(f"{where}: stored activation-quantizer state mismatch (missing {list(missing)}, "
                         f"unexpected {list(unexpected)})")


# ------------------------------------------------------------------------------------------------
# save
# ------------------------------------------------------------------------------------------------
def _layer_order(model: nn.Module) -> list:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d) + QUANT_LAYER_TYPES)]


def _rows_params(p: torch.Tensor, granularity: str, mask: torch.Tensor) -> torch.Tensor:
    if granularity == "tensor":
        return p.detach().reshape(1)
    return p.detach()[mask.to(p.device)]


def _pack_layer(name: str, layer: nn.Module) -> tuple:
    """(tensors, structure) of one wrapped layer; verifies that decoding reproduces the fake-quant weight."""
    if layer.lora_A is not None:
        raise ValueError(f"save_quantized: layer {name!r} has unmerged LoRA (rank {layer.lora_rank}); call "
                         "layer.merge_lora() (or merge_lora(model)) before saving")
    if layer.packed_weight is not None:
        if layer.packed_payload is None:
            raise ValueError(f"save_quantized: layer {name!r} carries a packed weight without its payload")
        return dict(layer.packed_payload["tensors"]), dict(layer.packed_payload["structure"])
    if layer.adaround is not None and not all(bool(a.hardened) for a in layer.adaround):
        raise ValueError(f"save_quantized: layer {name!r} has soft AdaRound weights; call layer.harden_adaround() "
                         "before saving")
    p = f"q.{name}"
    tensors: dict = {}
    c = layer.num_out_channels
    structure = {"kind": "linear" if isinstance(layer, QuantLinear) else "conv2d",
                 "weight_shape": list(layer.weight.shape), "has_bias": layer.bias is not None,
                 "weight_quant": bool(layer.weight_quant), "act_quant": bool(layer.act_quant),
                 "quantizers": [], "residual": None, "in_scale": layer.in_scale is not None, "act": None}
    with torch.no_grad():
        if len(layer.weight_quantizers):
            w = layer.effective_weight().detach()
            w_q = None
            for g, q in enumerate(layer.weight_quantizers):
                mask = quantizer_channels(q, c).to(w.device)
                rows = int(mask.sum())
                if layer.adaround is not None:
                    group_w = layer.adaround[g]()
                    codes = layer.adaround[g].codes()
                else:
                    group_w = q(w)
                    codes = q.quantize(w) if isinstance(q, (IntQuantizer, BinaryQuantizer)) else q.encode(w)
                decoded = q.dequantize(codes, dtype=w.dtype) if isinstance(q, (IntQuantizer, BinaryQuantizer)) \
                    else q.decode(codes, dtype=w.dtype)
                if not torch.equal(decoded, group_w):
                    raise RuntimeError(f"save_quantized: layer {name!r} quantizer {g}: decoded codes differ from the "
                                       "fake-quant weight (cannot store it exactly)")
                offset = q.qmin if isinstance(q, IntQuantizer) else 0
                stored = codes[mask].to(torch.int64) - offset
                tensors[f"{p}.w{g}.codes"] = pack_bits(stored, q.bits)
                if isinstance(q, BinaryQuantizer):
                    tensors[f"{p}.w{g}.mu"] = _rows_params(q.mu, q.granularity, mask).contiguous()
                    tensors[f"{p}.w{g}.alpha"] = _rows_params(q.alpha, q.granularity, mask).contiguous()
                elif isinstance(q, IntQuantizer):
                    tensors[f"{p}.w{g}.scale"] = _rows_params(q.scale, q.granularity, mask).contiguous()
                    zp = _rows_params(q.zero_point, q.granularity, mask)
                    if bool((torch.round(zp) != 0).any()) or bool((zp != 0).any()):
                        tensors[f"{p}.w{g}.zero_point"] = zp.contiguous()
                else:
                    tensors[f"{p}.w{g}.maxval"] = _rows_params(q.maxval, q.granularity, mask).contiguous()
                if q.channel_mask is not None:
                    tensors[f"{p}.w{g}.mask"] = pack_mask(q.channel_mask)
                desc = {**weight_quantizer_desc(q), "rows": rows}
                desc["param_shape"] = list((q.alpha if isinstance(q, BinaryQuantizer) else q.scale
                                            if isinstance(q, IntQuantizer) else q.maxval).shape)
                structure["quantizers"].append(desc)
                w_q = group_w if w_q is None else w_q + group_w
            if layer.residual is not None:
                res = layer.residual
                mask = quantizer_channels(res, c).to(w.device)
                signs = BinaryResidual.sign_bits(w, w_q)
                if not torch.equal(res.from_bits(signs), res(w, w_q)):
                    raise RuntimeError(f"save_quantized: layer {name!r}: residual cannot be rebuilt from its sign bits")
                tensors[f"{p}.residual.alpha"] = res.alpha.detach()[mask].contiguous()
                tensors[f"{p}.residual.signs"] = pack_bits(signs[mask].to(torch.int64), 1)
                if res.channel_mask is not None:
                    tensors[f"{p}.residual.mask"] = pack_mask(res.channel_mask)
                structure["residual"] = {"rows": int(mask.sum()), "masked": res.channel_mask is not None}
        if layer.in_scale is not None:
            tensors[f"{p}.in_scale"] = layer.in_scale.detach().contiguous()
        if layer.act_quantizer is not None:
            structure["act"] = act_quantizer_desc(layer.act_quantizer)
            tensors.update(_state_tensors(layer.act_quantizer, f"{p}.act"))
    return tensors, structure


def _weight_bytes(tensors: dict, name: str) -> int:
    """Bytes of one layer's stored weight content (everything under q.<name>. except its act state)."""
    pref, act_pref = f"q.{name}.", f"q.{name}.act."
    return sum(v.numel() * v.element_size() for k, v in tensors.items()
               if k.startswith(pref) and not k.startswith(act_pref))


def _quant_layer_state_keys(name: str, layer: nn.Module) -> callable:
    """Predicate: is a model state-dict key part of this layer's packed content (not stored under fp.)?"""
    keep = {f"{name}.bias"}
    if not len(layer.weight_quantizers):
        keep.add(f"{name}.weight")
    pref = name + "."

    def packed(key: str) -> bool:
        return key.startswith(pref) and key not in keep
    return packed


def merge_lora(model: nn.Module) -> int:
    """Merge LoRA into the frozen weights of every wrapped layer; returns how many were merged."""
    n = 0
    for _, layer in quant_layers(model):
        if layer.lora_A is not None:
            layer.merge_lora()
            n += 1
    return n


def save_quantized(model: nn.Module, spec: QuantSpec, out_dir: Union[str, Path],
                   extra_meta: Optional[dict] = None) -> dict:
    """Write ``packed.safetensors`` + ``quant_spec.json`` into ``out_dir`` (atomically). Returns the byte
    summary {"packed_bytes", "theoretical_bytes", "fp_bytes"}."""
    from pipeline.io import save_safetensors

    from pipeline.io import atomic_dir, write_json

    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    order = _layer_order(model)
    first, last = (order[0], order[-1]) if order else (None, None)
    tensors: dict = {}
    layers_meta: dict = {}
    packed_preds = []
    for name, layer in quant_layers(model):
        t, structure = _pack_layer(name, layer)
        tensors.update(t)
        cfg = spec.resolve(name, first, last)
        layers_meta[name] = {"config": None if cfg is None else cfg.to_dict(), "structure": structure,
                             "stored_bytes": _weight_bytes(t, name),
                             "theoretical_bytes": quantized_layer_bytes(layer)}
        packed_preds.append(_quant_layer_state_keys(name, layer))
    attn_meta: dict = {}
    for name, proc in quant_attention(model):
        ops = {}
        for op, q in proc.quantizers().items():
            ops[op] = act_quantizer_desc(q)
            tensors.update(_state_tensors(q, f"attn.{name}.{op}"))
        attn_meta[name] = {"operands": ops, "act_quant": bool(proc.act_quant)}
        packed_preds.append(lambda k, pref=f"{name}.processor.": k.startswith(pref))
    fp_bytes = 0
    for key, value in model.state_dict().items():
        if any(pred(key) for pred in packed_preds):
            continue
        tensors[f"fp.{key}"] = value.detach().contiguous()
        fp_bytes += value.numel() * value.element_size()
    tensors = {k: v.to("cpu") for k, v in tensors.items()}
    packed_total = sum(m["stored_bytes"] for m in layers_meta.values())
    summary = {"packed_bytes": int(packed_total),
               "theoretical_bytes": float(sum(m["theoretical_bytes"] for m in layers_meta.values())),
               "fp_bytes": int(fp_bytes)}
    meta = {"format_version": FORMAT_VERSION, "spec": spec.to_dict(),
            "timesteps": model_timesteps(model),
            "layers": layers_meta, "attention": attn_meta, "extra": extra_meta or {}, "bytes": summary}
    json.dumps(meta)  # fail before touching the output when extra_meta is not JSON
    with atomic_dir(out_dir) as tmp:
        save_safetensors(tensors, str(tmp / PACKED_FILE), metadata={"format": "pipeline.quant.packing",
                                                              "format_version": str(FORMAT_VERSION)})
        write_json(tmp / SPEC_FILE, meta)
    return summary


# ------------------------------------------------------------------------------------------------
# load
# ------------------------------------------------------------------------------------------------
def read_packed(out_dir: Union[str, Path]) -> tuple:
    """(meta dict, tensors dict) of a saved directory, with clear errors for missing files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"quantized model directory not found: {out_dir} (expected {SPEC_FILE} and "
                                f"{PACKED_FILE} written by save_quantized)")
    for fname in (SPEC_FILE, PACKED_FILE):
        if not (out_dir / fname).is_file():
            raise FileNotFoundError(f"{out_dir}: missing {fname} (not a save_quantized directory?)")
    try:
        meta = json.loads((out_dir / SPEC_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{out_dir / SPEC_FILE}: corrupt JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{out_dir / SPEC_FILE}: unsupported format_version "
                         f"{meta.get('format_version') if isinstance(meta, dict) else None!r} "
                         f"(expected {FORMAT_VERSION})")
    try:
        tensors = load_file(str(out_dir / PACKED_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{out_dir / PACKED_FILE}: cannot read safetensors file: {exc}") from None
    return meta, tensors


def _need(tensors: dict, key: str, layer: str, shape=None, dtype=None) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"layer {layer!r}: tensor {key!r} missing from {PACKED_FILE}")
    t = tensors[key]
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"layer {layer!r}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"layer {layer!r}: tensor {key!r} has dtype {t.dtype}, expected {dtype}")
    return t


def _full_params(stored: torch.Tensor, granularity: str, mask: torch.Tensor, shape: list, fill: float,
                 layer: str, key: str) -> torch.Tensor:
    if granularity == "tensor":
        if stored.numel() != 1:
            raise ValueError(f"layer {layer!r}: tensor {key!r} must hold 1 value, got {stored.numel()}")
        return stored.reshape(shape).clone()
    rows = int(mask.sum())
    expect = [rows] + list(shape[1:])
    if list(stored.shape) != expect:
        raise ValueError(f"layer {layer!r}: tensor {key!r} has shape {tuple(stored.shape)}, expected {tuple(expect)}")
    full = torch.full(shape, fill, dtype=stored.dtype)
    full[mask] = stored
    return full


def _unpack_layer(name: str, module: nn.Module, entry: dict, tensors: dict, model: nn.Module) -> nn.Module:
    s = entry.get("structure") or {}
    kind = s.get("kind")
    expected_cls = {"linear": nn.Linear, "conv2d": nn.Conv2d}.get(kind)
    if expected_cls is None:
        raise ValueError(f"layer {name!r}: unknown layer kind {kind!r} in {SPEC_FILE}")
    if not isinstance(module, expected_cls) or isinstance(module, QUANT_LAYER_TYPES):
        raise ValueError(f"layer {name!r}: saved as {kind} but the model has {type(module).__name__}")
    if list(module.weight.shape) != list(s.get("weight_shape", [])):
        raise ValueError(f"layer {name!r}: saved weight shape {tuple(s.get('weight_shape', []))} does not match "
                         f"the model's {tuple(module.weight.shape)}")
    p = f"q.{name}"
    layer = QuantLinear(module) if kind == "linear" else QuantConv2d(module)
    c = layer.num_out_channels
    wshape = list(module.weight.shape)
    row_shape = wshape[1:]
    row_len = module.weight[0].numel()
    payload = {k: v for k, v in tensors.items() if k.startswith(p + ".")}
    dev = module.weight.device  # decode where the fake-quant model would compute (same arithmetic)
    quantizers = []
    w_hat = None
    for g, desc in enumerate(s.get("quantizers", [])):
        if desc.get("masked"):
            mask = unpack_mask(_need(tensors, f"{p}.w{g}.mask", name, (packed_size(c, 1),), torch.uint8), c)
        else:
            mask = torch.ones(c, dtype=torch.bool)
        rows = int(mask.sum())
        if rows != desc.get("rows"):
            raise ValueError(f"layer {name!r}: quantizer {g} mask covers {rows} rows, {SPEC_FILE} says {desc.get('rows')}")
        try:
            q = weight_quantizer_from_desc(desc, mask if desc.get("masked") else None)
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"layer {name!r}: quantizer {g}: bad description in {SPEC_FILE}: {exc}") from None
        pshape = desc["param_shape"]
        state = {}
        if desc["format"] == "binary":
            for key in ("mu", "alpha"):
                state[key] = _full_params(_need(tensors, f"{p}.w{g}.{key}", name), q.granularity, mask, pshape,
                                          0.0, name, f"{p}.w{g}.{key}")
            offset = 0
        elif desc["format"] == "int":
            scale = _need(tensors, f"{p}.w{g}.scale", name)
            state["scale"] = _full_params(scale, q.granularity, mask, pshape, 1.0, name, f"{p}.w{g}.scale")
            if f"{p}.w{g}.zero_point" in tensors:
                state["zero_point"] = _full_params(tensors[f"{p}.w{g}.zero_point"], q.granularity, mask, pshape, 0.0,
                                                   name, f"{p}.w{g}.zero_point")
            else:
                state["zero_point"] = torch.zeros(pshape, dtype=scale.dtype)
            offset = q.qmin
        else:
            maxval = _need(tensors, f"{p}.w{g}.maxval", name)
            state["maxval"] = _full_params(maxval, q.granularity, mask, pshape, 1.0, name, f"{p}.w{g}.maxval")
            offset = 0
        if q.channel_mask is not None:
            state["channel_mask"] = q.channel_mask
        q.load_state_dict(state)
        q.to(dev)
        n_codes = rows * row_len
        packed = _need(tensors, f"{p}.w{g}.codes", name, (packed_size(n_codes, q.bits),), torch.uint8)
        codes = torch.zeros(wshape, dtype=torch.int64)
        codes[mask] = (unpack_bits(packed, q.bits, n_codes) + offset).reshape([rows] + row_shape)
        codes = codes.to(dev)
        if isinstance(q, (IntQuantizer, BinaryQuantizer)):
            decoded = q.dequantize(codes.to(torch.int32), dtype=module.weight.dtype)
        else:
            decoded = q.decode(codes.to(torch.uint8), dtype=module.weight.dtype)
        w_hat = decoded if w_hat is None else w_hat + decoded
        quantizers.append(q)
    residual = None
    if s.get("residual") is not None:
        if w_hat is None:
            raise ValueError(f"layer {name!r}: residual without weight quantizers in {SPEC_FILE}")
        r = s["residual"]
        if r.get("masked"):
            mask = unpack_mask(_need(tensors, f"{p}.residual.mask", name, (packed_size(c, 1),), torch.uint8), c)
        else:
            mask = torch.ones(c, dtype=torch.bool)
        rows = int(mask.sum())
        if rows != r.get("rows"):
            raise ValueError(f"layer {name!r}: residual mask covers {rows} rows, {SPEC_FILE} says {r.get('rows')}")
        residual = BinaryResidual(c, mask if r.get("masked") else None).to(dev)
        alpha = _need(tensors, f"{p}.residual.alpha", name, (rows,))
        with torch.no_grad():
            residual.alpha.zero_()
            residual.alpha[mask.to(dev)] = alpha.to(dev, residual.alpha.dtype)
        packed = _need(tensors, f"{p}.residual.signs", name, (packed_size(rows * row_len, 1),), torch.uint8)
        signs = torch.ones(wshape, dtype=torch.bool)
        signs[mask] = unpack_bits(packed, 1, rows * row_len).bool().reshape([rows] + row_shape)
        w_hat = w_hat + residual.from_bits(signs.to(dev)).detach()
    layer.set_weight_quantizers(quantizers, residual, calibrate=False)
    if s.get("in_scale"):
        layer.set_in_scale(_need(tensors, f"{p}.in_scale", name, (module.weight.shape[1],)))
    if s.get("act") is not None:
        layer.act_quantizer = _build_act_quantizer(s["act"], model, f"layer {name!r}")
        _load_state(layer.act_quantizer, tensors, f"{p}.act", f"layer {name!r}")
    if w_hat is not None:
        layer.packed_weight = w_hat.to(dev)
        fp_w = w_hat if layer.in_scale is None else w_hat / layer.in_scale_weight_view().to(w_hat.device)
        layer.weight = nn.Parameter(fp_w.to(dev), requires_grad=False)
    layer.weight_quant = bool(s.get("weight_quant", True))
    layer.act_quant = bool(s.get("act_quant", True))
    layer.packed_payload = {"tensors": payload, "structure": s}
    return layer


def load_quantized(fp_model: nn.Module, out_dir: Union[str, Path]) -> nn.Module:
    """Wrap ``fp_model`` (a freshly built FP model of the same architecture) per the saved structure and load
    the packed state; returns the model (modified in place). Raises FileNotFoundError for a missing
    directory/file and ValueError naming the layer for mismatched or corrupted content."""
    meta, tensors = read_packed(out_dir)
    device = next((t.device for t in fp_model.parameters()), torch.device("cpu"))
    spec = QuantSpec.from_dict(meta["spec"])
    timesteps = meta.get("timesteps")
    for name, entry in meta.get("layers", {}).items():
        try:
            module = fp_model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"layer {name!r} from {SPEC_FILE} does not exist in the model") from None
        new = _unpack_layer(name, module, entry, tensors, fp_model)
        parent_name, _, child = name.rpartition(".")
        parent = fp_model.get_submodule(parent_name) if parent_name else fp_model
        setattr(parent, child, new.to(device))
    for name, entry in meta.get("attention", {}).items():
        try:
            attn = fp_model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"attention module {name!r} from {SPEC_FILE} does not exist in the model") from None
        if not is_attention_module(attn):
            raise ValueError(f"attention module {name!r}: the model's {type(attn).__name__} is not an attention module")
        check_supported(attn, name)
        ops = {}
        for op, desc in entry.get("operands", {}).items():
            if op not in ("q_quantizer", "k_quantizer", "p_quantizer", "v_quantizer"):
                raise ValueError(f"attention module {name!r}: unknown operand {op!r}")
            q = _build_act_quantizer(desc, fp_model, f"attention module {name!r}")
            _load_state(q, tensors, f"attn.{name}.{op}", f"attention module {name!r}")
            ops[op] = q
        proc = QuantAttnProcessor(**ops)
        proc.act_quant = bool(entry.get("act_quant", True))
        attn.set_processor(proc.to(device))
    # every other tensor of the state dict
    own = fp_model.state_dict()  # after wrapping: keys of the quantized structure
    fp_state = {}
    for key, value in tensors.items():
        if not key.startswith("fp."):
            continue
        k = key[3:]
        if k not in own:
            raise ValueError(f"{PACKED_FILE}: tensor {k!r} does not exist in the model (layer "
                             f"{k.rpartition('.')[0]!r})")
        if tuple(own[k].shape) != tuple(value.shape):
            raise ValueError(f"{PACKED_FILE}: tensor {k!r} has shape {tuple(value.shape)}, the model's layer "
                             f"{k.rpartition('.')[0]!r} expects {tuple(own[k].shape)}")
        fp_state[k] = value
    # every tensor the packed layers do not cover must come from the file (a fresh model's values would
    # silently replace trained biases / norms otherwise)
    covered = [_quant_layer_state_keys(n, layer) for n, layer in quant_layers(fp_model)]
    covered += [lambda k, pref=f"{n}.processor.": k.startswith(pref) for n, _ in quant_attention(fp_model)]
    missing = [k for k in own if k not in fp_state and not any(pred(k) for pred in covered)]
    if missing:
        raise ValueError(f"{PACKED_FILE}: no stored value for {len(missing)} model tensor(s), e.g. {missing[0]!r} "
                         f"(layer {missing[0].rpartition('.')[0]!r}); the file does not belong to this model")
    fp_model.load_state_dict(fp_state, strict=False)
    set_model_timesteps(fp_model, timesteps)
    fp_model._quant_spec = spec
    return fp_model


def packed_bytes(out_dir: Union[str, Path], layers: Optional[list] = None) -> int:
    """Bytes of the stored quantized-weight tensors (codes, scales, zero points, masks, residual, in_scale)
    of all (or the given) layers of a saved directory; excludes ``fp.`` and activation state."""
    meta, tensors = read_packed(out_dir)
    names = list(meta.get("layers", {})) if layers is None else list(layers)
    return sum(_weight_bytes(tensors, n) for n in names)


def theoretical_bytes(model: nn.Module, layers: Optional[list] = None) -> float:
    """Σ params · bits / 8 + scales (+ residual, in_scale) of the wrapped layers (all or ``layers``)."""
    total = 0.0
    for name, layer in quant_layers(model):
        if layers is None or name in layers:
            total += quantized_layer_bytes(layer)
    return total
