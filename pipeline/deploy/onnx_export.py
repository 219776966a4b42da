"""ONNX export of a quantized model for ONNX Runtime, carrying the project's own codes and scales.

Every :class:`pipeline.quant.layers.QuantLinear` / ``QuantConv2d`` gets a :class:`LayerPlan`: what the
runtime executes for it and from which stored numbers. The executes classes, from most to least integer:

- ``int8``: one integer weight quantizer per output channel (or per tensor) at 2..8 bits and an integer
  activation quantizer with per-tensor scales: static (one Δ_a) or timestep-indexed (TPQ, MPQ-DM: one Δ_a per
  sampling step). The input goes through ``QuantizeLinear`` with our Δ_a and ⌊z⌉ and the layer runs ORT's
  integer kernels on our weight codes: ``MatMulIntegerToFloat`` (Linear) or ``ConvInteger`` (int32
  accumulation; a per-channel weight zero point applied exactly in int32), then · Δ_w · Δ_a. Activations
  below 8 bits are clipped to their code range first (``Clip`` to ``[(qmin − z)Δ, (qmax − z)Δ]``), so the
  uint8 / int8 codes the runtime computes are exactly our 4- or 6-bit codes; weights below 8 bits are stored
  at 8 bits (the nearest width with a kernel), their values unchanged. A timestep-indexed quantizer's table
  (Δ_a and ⌊z⌉ per step) is a graph constant; the graph picks the row of the call's first sample by the
  quantizer's nearest-timestep rule, so one call must carry one timestep: a sampling step does, and
  :class:`pipeline.deploy.runtime.OrtDenoiser` splits a mixed batch (calibration inputs) into one call per
  timestep. Measured on a real-size DiT block stack (``bench/deploy.py``), this keeps the integer kernels,
  where emulating per-sample scales in float costs several times the static model's time.
- ``int4-wo``: a Linear with weights at ≤ 4 bits (per output channel, or groups of a power-of-two size
  ≥ 16 along the input) runs as ``com.microsoft::MatMulNBits`` (4-bit codes two per byte, one scale and
  zero point per block; a per-channel quantizer repeats its Δ over 256-wide blocks of its row), with float
  accumulation (``accuracy_level`` 0: the runtime does not re-quantize the input). An integer activation
  quantizer in front of it becomes ``QuantizeLinear`` → ``DequantizeLinear`` with our Δ_a.
- ``int8-wo``: integer weights as above but activations the runtime cannot express with a per-tensor scale
  (online per-token, split quantizers, FP formats): the activation quantizer is exported as the float
  operations of its fake quantization and the layer runs DQ(weight) in float.
- ``float``: formats with no kernel here (FP ExMy weight codes, binary and mixed-precision groups, binary
  residual branches, non-power-of-two groups): the decoded weight Ŵ as a float32 initializer.

Attention matmul quantizers (Q·Kᵀ, P·V) are exported as the float operations of their fake quantization.
The graph's values equal the fake-quant model's up to the runtime's arithmetic: integer accumulation,
``QuantizeLinear`` dividing by Δ where we multiply by 1/Δ (a tie can round to the neighbouring code) and a
different summation order; the tests state the tolerance.

The export uses PyTorch's TorchScript-based ONNX exporter (``dynamo=False``), whose
``torch.autograd.Function.symbolic`` lets each layer emit exactly the nodes above; opset 17. The graph is the
backbone's unguided prediction from (sample, timestep, labels): a text model's captions come from its caption
table inside the graph. Two repairs follow the export: the ``If`` the exporter emits for a ``squeeze(d)`` of a
dim it cannot size (PixArt's output) is replaced by the branch one probe run shows taken, and identical
tensors are stored once.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

OPSET = 17
MS_DOMAIN = "com.microsoft"
EXECUTES = ("int8", "int4-wo", "int8-wo", "float")
TARGETS = ("ort",)
DEPLOY_FILE = "deploy.json"
MODEL_FILE = "model.onnx"


@dataclass
class LayerPlan:
    """What the runtime executes for one quantized layer (module docstring) and the numbers it uses."""

    name: str
    kind: str                                  # "linear" | "conv2d"
    executes: str                              # one of EXECUTES
    weights: int                               # number of weights (the share of the model it stands for)
    w_bits: Optional[float] = None
    a_bits: Optional[int] = None
    reason: str = ""                           # why it is not int8 (empty for int8)
    w_codes: Optional[torch.Tensor] = None     # int8 / uint8 codes, the weight's shape
    w_scale: Optional[torch.Tensor] = None     # float32 [out]
    w_zero: Optional[torch.Tensor] = None      # int8 / uint8 [out]
    w_block: Optional[int] = None              # int4-wo: block size along the input
    w_float: Optional[torch.Tensor] = None     # the weight the layer multiplies with (Ŵ, or W' unquantized)
    a_scale: Optional[torch.Tensor] = None     # float32 scalar
    a_zero: Optional[torch.Tensor] = None      # int8 / uint8 scalar
    act: str = "none"                          # "qdq" (static) | "tpq" (per step) | "emulate" | "none"
    extra: dict = field(default_factory=dict)

    def stored_bytes(self) -> int:
        """Bytes the graph stores for this layer's weight (codes, scales, zero points; bias excluded)."""
        if self.executes == "int4-wo":  # matmulnbits_tensors: codes, f32 scale per block, packed zero points
            n, k = self.w_codes.shape
            blocks = -(-k // self.w_block)
            return n * blocks * self.w_block // 2 + 4 * n * blocks + n * -(-blocks // 2)
        if self.w_codes is not None:
            return self.w_codes.numel() + 4 * self.w_scale.numel() + self.w_zero.numel()
        return 4 * self.weights

    def summary(self) -> dict:
        out = {"layer": self.name, "kind": self.kind, "executes": self.executes, "weights": self.weights,
               "w_bits": self.w_bits, "a_bits": self.a_bits, "act": self.act, "stored_bytes": self.stored_bytes()}
        if self.reason:
            out["reason"] = self.reason
        if self.w_block is not None:
            out["block_size"] = self.w_block
        return out


class ExportError(ValueError):
    """An export request that cannot be carried out (names the key or layer)."""


# ------------------------------------------------------------------------------------------------
# planning
# ------------------------------------------------------------------------------------------------
def _int_weight(layer, w_hat: torch.Tensor) -> tuple:
    """(codes int64, scale [C] f32, zero [C] int64, granularity, group_size, bits, symmetric) of a layer with one
    plain integer weight quantizer whose codes reproduce ``w_hat`` (the layer's Ŵ, float32), or (None, reason)."""
    from pipeline.quant.primitives import IntQuantizer

    qs = list(layer.weight_quantizers)
    if len(qs) != 1:
        return None, f"{len(qs)} weight quantizer groups (mixed precision)"
    q = qs[0]
    if not isinstance(q, IntQuantizer):
        return None, f"{type(q).__name__} weights (no integer kernel)"
    if q.channel_mask is not None:
        return None, "masked weight quantizer"
    if layer.residual is not None:
        return None, "binary residual branch"
    with torch.no_grad():
        codes = _stored_codes(layer, q)
        if q.granularity == "group":
            lay = q.layout()
            cv, _ = lay.view(codes.to(torch.float32))
            scale = lay.param_view(q.scale).to(torch.float32)
            zero = torch.round(lay.param_view(q.zero_point).to(torch.float32))
            deq = lay.unview((cv - zero) * scale, _)
            scale, zero = scale.reshape(codes.shape[0], -1), zero.reshape(codes.shape[0], -1)
        else:
            c = codes.shape[0]
            scale = q.scale.detach().to(torch.float32).reshape(-1).expand(c).clone()
            zero = torch.round(q.zero_point.detach().to(torch.float32)).reshape(-1).expand(c).clone()
            view = (c,) + (1,) * (codes.dim() - 1)
            deq = (codes.to(torch.float32) - zero.reshape(view)) * scale.reshape(view)
    if not torch.equal(deq, w_hat):
        return None, "stored codes do not reproduce the layer's weight"
    return (codes.to(torch.int64), scale, zero.to(torch.int64), q.granularity, q.group_size, q.bits,
            q.symmetric), ""


def _stored_codes(layer, q) -> torch.Tensor:
    """Integer codes of the layer's single weight quantizer: unpacked from the packed payload of a loaded
    model (the stored bits themselves), else the quantizer's codes of the layer's effective weight."""
    payload = getattr(layer, "packed_payload", None)
    if payload is not None:
        from pipeline.quant.bitstream import unpack_bits

        tensors = payload["tensors"]
        key = next((k for k in tensors if k.endswith(".w0.codes")), None)
        if key is not None:
            shape = tuple(layer.weight.shape)
            n = math.prod(shape)
            return (unpack_bits(tensors[key], q.bits, n).to(torch.int64) + q.qmin).reshape(shape)
    return q.quantize(layer.effective_weight().detach()).to(torch.int64)


def _static_int_act(aq) -> tuple:
    """(scale, zero, qmin, qmax, symmetric, bits) of a static per-tensor integer activation quantizer, or
    (None, reason)."""
    from pipeline.quant import act as act_mod

    if not isinstance(aq, act_mod.StaticActQuantizer):
        return None, f"{type(aq).__name__} activations (no constant scale)"
    if aq.fmt != "int":
        return None, "FP activations (no integer kernel)"
    q = aq.quantizer
    if q.scale.numel() != 1:
        return None, "activation quantizer is not calibrated"
    scale = q.scale.detach().to(torch.float32).reshape(())
    zero = torch.round(q.zero_point.detach().to(torch.float32)).reshape(())
    return (scale, zero, q.qmin, q.qmax, q.symmetric, q.bits), ""


def _is_tpq(aq) -> bool:
    from pipeline.quant import act as act_mod

    return isinstance(aq, act_mod.TimestepActQuantizer) and bool(aq.calibrated)


def plan_layer(name: str, layer, int4_linear: bool = True) -> LayerPlan:
    """The :class:`LayerPlan` of one wrapped layer (module docstring)."""
    from pipeline.quant.layers import QuantLinear

    kind = "linear" if isinstance(layer, QuantLinear) else "conv2d"
    quant_w = layer.weight_quant and (len(layer.weight_quantizers) > 0 or layer.packed_weight is not None)
    aq = layer.act_quantizer if (layer.act_quant and layer.act_quantizer is not None
                                 and getattr(layer.act_quantizer, "enabled", True)) else None
    with torch.no_grad():
        w_float = (layer.quantized_weight() if quant_w else layer.effective_weight()).detach().to(torch.float32)
    plan = LayerPlan(name=name, kind=kind, executes="float", weights=int(layer.weight.numel()),
                     w_bits=layer.w_bits if quant_w else None, a_bits=layer.a_bits if aq is not None else None,
                     w_float=w_float)
    # activations
    if aq is None:
        plan.act = "none"
        act_reason = "float activations"
    elif _is_tpq(aq):
        plan.act = "tpq"
        dtype = torch.int8 if aq.symmetric else torch.uint8
        with torch.no_grad():
            plan.extra["tpq"] = {"scale": aq.scale.detach().to(torch.float32).clone(),
                                 "zero": torch.round(aq.zero_point.detach().to(torch.float32)).to(dtype),
                                 "range": (aq.qmin, aq.qmax), "bits": aq.bits}
        act_reason = ""
    else:
        got, act_reason = _static_int_act(aq)
        if got is None:
            plan.act = "emulate"
        else:
            scale, zero, qmin, qmax, symmetric, bits = got
            plan.act = "qdq"
            dtype = torch.int8 if symmetric else torch.uint8
            plan.a_scale, plan.a_zero = scale, zero.to(dtype)
            plan.extra["a_range"] = (qmin, qmax)
            act_reason = ""
    # weights
    if not quant_w:
        plan.reason = "weights not quantized"
        return plan
    got, w_reason = _int_weight(layer, w_float)
    if got is None:
        plan.reason = w_reason
        return plan
    codes, scale, zero, gran, group_size, bits, symmetric = got
    pow2_group = gran != "group" or (group_size >= 16 and group_size & (group_size - 1) == 0)
    if kind == "linear" and bits <= 4 and int4_linear and pow2_group:
        k = codes.shape[1]
        # a per-channel Δ is repeated over the blocks of its row: the largest block MLAS takes (256) stores it
        # least often (4 + 36/256 bits per weight with the zero point)
        block = group_size if gran == "group" else min(_next_pow2(max(k, 16)), 256)
        plan.executes, plan.w_block = "int4-wo", block
        shift = 8 if symmetric else 0  # symmetric codes [-8, 7] -> [0, 15] with zero point 8
        plan.w_codes = (codes + shift).to(torch.uint8)
        plan.w_zero = (zero + shift).to(torch.uint8)
        plan.w_scale = scale
        plan.reason = "" if plan.act != "emulate" else act_reason
        return plan
    if gran == "group":
        plan.reason = f"group-wise {bits}-bit weights (group {group_size}) on a {kind}"
        return plan
    # int8 storage: an asymmetric grid [0, 2^b - 1] is shifted by -128 together with its zero point, so
    # (c - z), hence every weight value, is unchanged; the runtime's fast integer GEMM takes uint8
    # activations times int8 weights
    shift = 0 if symmetric else -128
    plan.w_codes = (codes + shift).to(torch.int8)
    plan.w_scale, plan.w_zero = scale, (zero + shift).to(torch.int8)
    if plan.act in ("qdq", "tpq"):
        plan.executes, plan.reason = "int8", ""
    else:
        plan.executes, plan.reason = "int8-wo", act_reason
    return plan


def _next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def plan_model(model: nn.Module, int4_linear: bool = True) -> list:
    """:class:`LayerPlan` of every wrapped layer of ``model``, in module order."""
    from pipeline.quant.surgery import quant_layers

    return [plan_layer(n, layer, int4_linear) for n, layer in quant_layers(model)]


def executes_shares(plans: list) -> dict:
    """{executes class: share of the quantized layers' weights} (only the classes present)."""
    total = sum(p.weights for p in plans) or 1
    out = {}
    for cls in EXECUTES:
        n = sum(p.weights for p in plans if p.executes == cls)
        if n:
            out[cls] = n / total
    return out


def executes_label(shares: dict) -> str:
    """'int8 92 %, int4-wo 5 %, float 3 %' (shares rounded to whole percent)."""
    return ", ".join(f"{k} {round(100 * v)} %" if v >= 0.005 else f"{k} <1 %" for k, v in shares.items()) \
        or "float 100 %"


# ------------------------------------------------------------------------------------------------
# the nodes each layer emits
# ------------------------------------------------------------------------------------------------
_PLANS: dict = {}   # key -> (plan, layer) while an export runs (symbolic functions receive the int key)


def _const(g, t: torch.Tensor):
    return g.op("Constant", value_t=t.detach().cpu().contiguous())


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., 2n] uint8 values 0..15 -> [..., n] bytes, the first of each pair in the low nibble."""
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()


def matmulnbits_tensors(plan: LayerPlan) -> tuple:
    """(B [N, blocks, block/2] uint8, scales [N·blocks] f32, zero points [N·⌈blocks/2⌉] uint8) of an int4-wo
    plan; the input dimension is zero-padded to whole blocks with the row's zero point (decodes to 0)."""
    codes, block = plan.w_codes, plan.w_block
    n, k = codes.shape
    blocks = -(-k // block)
    pad = blocks * block - k
    zero = plan.w_zero.reshape(n, -1)
    scale = plan.w_scale.reshape(n, -1)
    if zero.shape[1] == 1:  # per-channel (or per-tensor): the same numbers for every block of the row
        zero, scale = zero.expand(n, blocks), scale.expand(n, blocks)
    if pad:
        fill = zero[:, -1:].expand(n, pad)
        codes = torch.cat([codes, fill], dim=1)
    b = _pack_nibbles(codes.reshape(n, blocks, block))
    zp = zero
    if blocks % 2:
        zp = torch.cat([zp, torch.zeros(n, 1, dtype=zp.dtype)], dim=1)
    zp = _pack_nibbles(zp).reshape(-1)
    return b, scale.contiguous().reshape(-1).to(torch.float32), zp


def _act_fake_quant(x, plan: LayerPlan, s, z):
    """The activation fake quantization a plan's layer applies (eager values while tracing)."""
    from pipeline.quant.primitives import fake_quant_int

    if plan.act == "qdq":
        return fake_quant_int(x, plan.a_scale, plan.a_zero.to(torch.float32), *plan.extra["a_range"])
    if plan.act == "tpq":
        return fake_quant_int(x, s, z.to(torch.float32), *plan.extra["tpq"]["range"])
    return x


class _LayerOp(torch.autograd.Function):
    """One quantized layer: activation quantization (constant Δ_a, or the step's Δ_a passed in as ``s``, ``z``)
    and the weight op of the plan."""

    @staticmethod
    def forward(ctx, x, s, z, key):
        plan, layer = _PLANS[key]
        bias = plan.extra["bias"]
        x = _act_fake_quant(x, plan, s, z)
        if plan.kind == "linear":
            return torch.nn.functional.linear(x, plan.w_float, bias)
        return torch.nn.functional.conv2d(x, plan.w_float, bias, layer.stride, layer.padding, layer.dilation,
                                          layer.groups)

    @staticmethod
    def symbolic(g, x, s, z, key):
        plan, layer = _PLANS[key]
        bias = None if plan.extra["bias"] is None else _const(g, plan.extra["bias"])
        if plan.act == "qdq":
            s, z = _const(g, plan.a_scale), _const(g, plan.a_zero)
            a_range = plan.extra["a_range"]
        elif plan.act == "tpq":
            a_range = plan.extra["tpq"]["range"]
        if plan.act in ("qdq", "tpq"):
            bits = plan.a_bits
            if bits is not None and bits < 8:
                x = _clip_to_codes(g, x, s, z, a_range)
            xq = g.op("QuantizeLinear", x, s, z)
            if plan.executes == "int8":
                return _integer_op(g, xq, s, z, plan, layer)
            x = g.op("DequantizeLinear", xq, s, z)
        if plan.executes == "int4-wo":
            b, scales, zp = matmulnbits_tensors(plan)
            n, k = plan.w_codes.shape
            y = g.op(f"{MS_DOMAIN}::MatMulNBits", x, _const(g, b), _const(g, scales), _const(g, zp),
                     K_i=int(k), N_i=int(n), bits_i=4, block_size_i=int(plan.w_block), accuracy_level_i=0)
            return y if bias is None else g.op("Add", y, bias)
        if plan.w_codes is not None:
            axis = 0 if plan.kind == "conv2d" else 1
            codes = plan.w_codes if plan.kind == "conv2d" else plan.w_codes.t()  # [in, out]: no Transpose node
            w = g.op("DequantizeLinear", _const(g, codes), _const(g, plan.w_scale), _const(g, plan.w_zero), axis_i=axis)
        else:
            w = _const(g, plan.w_float if plan.kind == "conv2d" else plan.w_float.t())
        if plan.kind == "linear":
            y = g.op("MatMul", x, w)
            return y if bias is None else g.op("Add", y, bias)
        return g.op("Conv", *([x, w] + ([] if bias is None else [bias])), **_conv_attrs(layer))


def _clip_to_codes(g, x, s, z, a_range):
    """Clip x to [(qmin − z)Δ, (qmax − z)Δ], so 8-bit Q/DQ yields exactly the codes of a narrower grid."""
    zf = g.op("Cast", z, to_i=1)
    lo = g.op("Mul", g.op("Sub", _const(g, torch.tensor(float(a_range[0]))), zf), s)
    hi = g.op("Mul", g.op("Sub", _const(g, torch.tensor(float(a_range[1]))), zf), s)
    return g.op("Clip", x, lo, hi)


def _conv_attrs(layer) -> dict:
    kh, kw = layer.kernel_size
    ph, pw = layer.padding
    return {"kernel_shape_i": [kh, kw], "strides_i": list(layer.stride), "pads_i": [ph, pw, ph, pw],
            "dilations_i": list(layer.dilation), "group_i": int(layer.groups)}


def _integer_op(g, xq, a_scale, a_zero, plan: LayerPlan, layer):
    """Quantized input ``xq`` (our Δ_a, ⌊z_a⌉) -> MatMulInteger / ConvInteger with our weight codes (int32
    accumulation) -> float · Δ_w (per output channel) · Δ_a (+ bias).

    ONNX Runtime's ConvInteger takes one weight zero point per tensor, so a per-channel zero point z_c is
    applied exactly in int32 instead: Σ (x − z_a)(w − z_c) = Σ (x − z_a) w − z_c Σ (x − z_a), the last sum
    being one ConvInteger of the same input with an all-ones single-output kernel."""
    codes, w_zero = plan.w_codes, plan.w_zero
    bias = plan.extra["bias"]
    if plan.kind == "linear":  # ORT's fused kernel: int32 accumulation, then · Δ_a·Δ_w (+ bias)
        args = [xq, _const(g, codes.t().contiguous()), a_scale, _const(g, plan.w_scale), a_zero, _const(g, w_zero)]
        if bias is not None:
            args.append(_const(g, bias))
        return g.op(f"{MS_DOMAIN}::MatMulIntegerToFloat", *args)
    zero0 = torch.zeros((), dtype=codes.dtype)
    acc = g.op("ConvInteger", xq, _const(g, codes), a_zero, _const(g, zero0), **_conv_attrs(layer))
    if bool((w_zero != 0).any()):
        ones = torch.ones((1,) + tuple(codes.shape[1:]), dtype=codes.dtype)
        window = g.op("ConvInteger", xq, _const(g, ones), a_zero, _const(g, zero0), **_conv_attrs(layer))
        zc = _const(g, w_zero.to(torch.int32).reshape(1, -1, 1, 1))
        acc = g.op("Sub", acc, g.op("Mul", window, zc))
    y = g.op("Cast", acc, to_i=1)  # TensorProto.FLOAT
    y = g.op("Mul", g.op("Mul", y, _const(g, plan.w_scale.reshape(1, -1, 1, 1).contiguous())), a_scale)
    return y if bias is None else g.op("Add", y, _const(g, bias.reshape(1, -1, 1, 1)))


class _DeployedLayer(nn.Module):
    """Stands in for one wrapped layer during the export: the input scale, the activation quantizer (Q nodes
    with our constant or per-step Δ_a, or the float operations of an unsupported quantizer) and the weight op."""

    def __init__(self, layer, plan: LayerPlan, key: int):
        super().__init__()
        self.plan, self.key = plan, key
        self.act_quantizer = layer.act_quantizer if plan.act in ("emulate", "tpq") else None
        self.in_scale = None if layer.in_scale is None else layer.in_scale_input_view(
            torch.zeros(1) if plan.kind == "linear" else torch.zeros(1, 1, 1, 1)).detach().clone()
        plan.extra["bias"] = None if layer.bias is None else layer.bias.detach().to(torch.float32).clone()
        _PLANS[key] = (plan, layer)

    def forward(self, x):
        plan = self.plan
        if self.in_scale is not None:
            x = x / self.in_scale
        if plan.act == "emulate":
            x = self.act_quantizer(x)
        s = z = torch.zeros(())
        if plan.act == "tpq":  # the step of the call's first sample picks Δ_a (the runtime sends one step per call)
            tab = plan.extra["tpq"]
            idx = self.act_quantizer.timestep_index(self.act_quantizer.context.current[:1])[0]
            s, z = tab["scale"][idx], tab["zero"][idx]
        return _LayerOp.apply(x, s, z, self.key)


def _conv_supported(layer) -> bool:
    return (layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
            and len(layer.padding) == 2)


class _PredictWrapper(nn.Module):
    """(sample, timestep, labels) -> the backbone's unguided prediction, with the timestep context set
    from the traced timestep (so timestep-indexed quantizers gather their scales in the graph)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, sample, timestep, labels=None):
        from pipeline.quant.surgery import get_timestep_context

        for m in (self.backbone, getattr(self.backbone, "net", None)):
            ctx = get_timestep_context(m) if m is not None else None
            if ctx is not None:
                ctx.current = timestep.reshape(-1)
        return self.backbone._predict(sample, timestep, labels)[:, :self.backbone.channels]


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------
def check_backbone(backbone) -> None:
    """Refuse what the exporter cannot take, before any work (an error naming what is wrong)."""
    from pipeline.models import DiffusionBackbone

    if not isinstance(backbone, DiffusionBackbone):
        raise ExportError(f"backbone: expected a pipeline.models.DiffusionBackbone, got {type(backbone).__name__}")
    from pipeline.quant.layers import QuantConv2d

    for name, layer in _quant_layers(backbone):
        if isinstance(layer, QuantConv2d) and not _conv_supported(layer):
            raise ExportError(f"layer {name!r}: convolution with padding {layer.padding!r} / padding_mode "
                              f"{layer.padding_mode!r}; the exporter writes zero-padded convolutions with explicit "
                              "integer pads only")
        if layer.lora_A is not None:
            raise ExportError(f"layer {name!r}: unmerged LoRA; merge it (pipeline.quant.packing.merge_lora) first")
        if layer.adaround is not None and not all(bool(a.hardened) for a in layer.adaround):
            raise ExportError(f"layer {name!r}: soft AdaRound weights; harden them first")


def _quant_layers(model):
    from pipeline.quant.surgery import quant_layers

    return list(quant_layers(model))


def _rel_exponent_graph(r: torch.Tensor, e_top: int, exact_zero: bool = True):
    """floor(log2 r) clamped to [1 − e_top, 0], for r >= 0, as graph operations.

    The FP ExMy fake quantizer (:mod:`pipeline.quant.primitives`) reads the binade from the float32 exponent
    field (``view(torch.int32)``); the tracer cannot record a dtype view and ONNX has no bit cast. Here
    log2 gives the exponent to within one next to a power of two, and two comparisons with exact powers of
    two put it right: k = floor(log2 r), minus one where 2^k > r, plus one where 2^(k+1) <= r. That is the
    exponent field exactly for every normal r (and frexp's for subnormals), so the graph rounds to the same
    grid point. r = 0 gives −1 with ``exact_zero`` (frexp's convention), else −127 (the exponent field 0), then
    the clamp, as the bit read does."""
    k = torch.floor(torch.log2(r))
    p = torch.pow(2.0, k)  # exact for integer k (ONNX has no exp2)
    k = k - (p > r).to(k.dtype) + (2 * p <= r).to(k.dtype)
    # zero: frexp's −1 with exact_zero, else what the bit read gives for field 0 (−127)
    k = torch.where(r == 0, torch.full_like(k, -1.0 if exact_zero else -127.0), k)
    return k.clamp(min=1 - e_top, max=0).to(torch.int32)


def _fp_step_graph(x_abs: torch.Tensor, maxval: torch.Tensor, exp_bits: int, man_bits: int,
                   exact_zero: bool = True):
    """:func:`pipeline.quant.primitives.fp_step` as graph operations: the exponent by
    :func:`_rel_exponent_graph`, and 2^n as ``pow(2, n)`` (ONNX has no exp2; both are exact at integer n)."""
    base = maxval / (2.0 - 2.0 ** (-man_bits))
    rel = _rel_exponent_graph((x_abs / base).detach(), 2 ** exp_bits - 1, exact_zero)
    step = base * torch.pow(2.0, (rel - man_bits).to(base.dtype))
    return step.clamp_min(torch.finfo(step.dtype).tiny), rel


@contextlib.contextmanager
def _graph_fp_exponent():
    """While tracing: FP fake quantization (FP4DiT's per-token activations, FP attention quantizers) through
    its straight-through reference formulation (``primitives.reference_fp_path``: no in-place buffers, which
    the exporter cannot express; bit-identical to the inference fast path), with its step from
    :func:`_fp_step_graph` (no bit cast, no exp2) and plain rounding."""
    from pipeline.quant import primitives

    saved = primitives.fp_step, primitives.round_ste
    # round_ste is an autograd Function (no ONNX symbolic); without gradients it is torch.round (half to even,
    # as ONNX Round)
    primitives.fp_step, primitives.round_ste = _fp_step_graph, torch.round
    try:
        with primitives.reference_fp_path():
            yield
    finally:
        primitives.fp_step, primitives.round_ste = saved


@contextlib.contextmanager
def export_module(backbone, int4_linear: bool = True):
    """Context: ``(module to trace, plans)``, with every wrapped layer of ``backbone`` replaced in place by its
    :class:`_DeployedLayer` (layers the exporter cannot express keep their fake-quant forward as float ops) and
    the backbone on the CPU in eval mode; on exit the original layers, device and mode are restored. In place
    rather than on a copy: a real-size model is not held twice (and a loaded model's state need not be
    deep-copyable)."""
    from pipeline.quant.surgery import _set_submodule

    check_backbone(backbone)
    device = next((t.device for t in backbone.parameters()), torch.device("cpu"))
    was_training = backbone.training
    swapped, plans = [], []
    _PLANS.clear()
    try:
        backbone.cpu().eval()
        for key, (name, layer) in enumerate(_quant_layers(backbone)):
            plan = plan_layer(name, layer, int4_linear)
            plans.append(plan)
            _set_submodule(backbone, name, _DeployedLayer(layer, plan, key))
            swapped.append((name, layer))
        yield _PredictWrapper(backbone).eval(), plans
    finally:
        from pipeline.quant.surgery import _set_submodule as put_back

        for name, layer in swapped:
            put_back(backbone, name, layer)
        _PLANS.clear()
        backbone.to(device)
        backbone.train(was_training)


def example_inputs(backbone, batch: int = 2, seed: int = 0, timestep: Optional[int] = None) -> tuple:
    """(sample, timestep, labels) of the shapes the graph takes (labels None for an unconditional model).
    Timesteps are drawn per sample, or all ``timestep`` (as in a sampling step: use it for timing, since a
    graph with timestep-indexed scales runs one call per distinct timestep)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch,) + tuple(backbone.sample_shape), generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    if timestep is not None:
        t = torch.full((batch,), int(timestep), dtype=torch.long)
    labels = None if backbone.conditioning == "none" else torch.randint(0, backbone.num_classes, (batch,), generator=g)
    return x, t, labels


def export_onnx(backbone, out_dir, *, int4_linear: bool = True, batch: int = 2) -> dict:
    """Export ``backbone`` (a quantized :class:`pipeline.models.DiffusionBackbone`, fake-quant modules in
    place, e.g. from :func:`pipeline.quant.packing.load_quantized`) to ``out_dir/model.onnx`` (weights in
    ``model.onnx.data``) and ``out_dir/deploy.json`` (the per-layer plans, executes shares, bytes).

    The graph takes ``sample`` [B, C, H, W] float32, ``timestep`` [B] int64 and, for a conditional model,
    ``labels`` [B] int64 (dynamic batch), and returns ``prediction`` [B, C, H, W]: the unguided
    prediction of ``backbone._predict`` (guidance runs around it, as in the PyTorch model). Returns the
    deploy.json content. Files are written atomically (temporary names, then renamed)."""
    import onnx

    out_dir = Path(out_dir)
    # autograd_inlining=False: the exporter's inlining of autograd Functions fails when one module is called
    # twice (diffusers' DiT reuses block 0's timestep embedder for its output layer); each Function here has
    # a symbolic, so there is nothing to inline
    buf = io.BytesIO()
    import warnings

    with warnings.catch_warnings(), export_module(backbone, int4_linear) as (module, plans), torch.no_grad(), \
            contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore")
        x, t, labels = example_inputs(backbone, batch)  # the backbone was checked on entering export_module
        names = ["sample", "timestep"] + ([] if labels is None else ["labels"])
        args = (x, t) if labels is None else (x, t, labels)
        dyn = {n: {0: "batch"} for n in names + ["prediction"]}
        custom = {MS_DOMAIN: 1} if any(p.executes in ("int4-wo", "int8") for p in plans) else None
        stack.enter_context(_graph_fp_exponent())
        torch.onnx.export(module, args, buf, dynamo=False, opset_version=OPSET, input_names=names,
                          output_names=["prediction"], dynamic_axes=dyn, do_constant_folding=True,
                          custom_opsets=custom, autograd_inlining=False)
    model = onnx.load_from_string(buf.getvalue())
    feed = {"sample": x.numpy(), "timestep": t.numpy(), **({} if labels is None else {"labels": labels.numpy()})}
    _resolve_squeeze_ifs(model, feed)
    _constants_to_initializers(model)
    # the graph names its data file, so both are written under their final names in a scratch folder, then moved
    data_name = MODEL_FILE + ".data"
    scratch = out_dir / ".export.tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    onnx.save_model(model, str(scratch / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    (scratch / data_name).replace(out_dir / data_name)
    (scratch / MODEL_FILE).replace(out_dir / MODEL_FILE)
    scratch.rmdir()
    shares = executes_shares(plans)
    info = {
        "format": "onnx", "opset": OPSET, "inputs": names, "output": "prediction",
        "kind": backbone.kind, "conditioning": backbone.conditioning, "num_classes": backbone.num_classes,
        "sample_shape": list(backbone.sample_shape),
        "executes": shares, "executes_label": executes_label(shares),
        # timestep-indexed activation scales: the graph takes the step of a call's first sample, so the runtime
        # sends one timestep per call (pipeline.deploy.runtime.OrtDenoiser splits a mixed batch)
        "one_timestep_per_call": any(p.act == "tpq" for p in plans),
        "bytes": {"model": (out_dir / MODEL_FILE).stat().st_size, "data": (out_dir / data_name).stat().st_size},
        "layer_bytes": {"stored": sum(p.stored_bytes() for p in plans), "fp32": 4 * sum(p.weights for p in plans)},
        "layers": [p.summary() for p in plans],
    }
    tmp = out_dir / (DEPLOY_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(out_dir / DEPLOY_FILE)
    return info


def _squeeze_if(node):
    """(x, axes input name, Constant nodes) of an ``If`` the TorchScript exporter emits for ``x.squeeze(d)``
    when it cannot see the size of dim d (then: Squeeze(x, d), else: Identity(x)); None for any other node."""
    if node.op_type != "If" or len(node.output) != 1:
        return None
    branches = {a.name: a.g for a in node.attribute}
    then, other = branches.get("then_branch"), branches.get("else_branch")
    if then is None or other is None or len(other.node) != 1 or other.node[0].op_type != "Identity":
        return None
    squeeze = [x for x in then.node if x.op_type == "Squeeze"]
    if len(squeeze) != 1 or any(x.op_type not in ("Squeeze", "Constant") for x in then.node) \
            or len(squeeze[0].input) != 2 or squeeze[0].input[0] != other.node[0].input[0]:
        return None
    return squeeze[0].input[0], squeeze[0].input[1], [x for x in then.node if x.op_type == "Constant"]


def _resolve_squeeze_ifs(model, feed: dict) -> int:
    """Replace each squeeze ``If`` (:func:`_squeeze_if`) by the branch it takes. ONNX Runtime type-checks both
    branches and refuses the Squeeze of a dim of size > 1 (PixArt's output ``squeeze(1)`` on [B, tokens, C]),
    so the graph would not load. The sizes come from one run of the graph on the export's example inputs with
    every such ``If`` read as Identity and its input added as an output (the squeezed dims are not the batch).
    Returns how many were replaced."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    found = [(i, _squeeze_if(n)) for i, n in enumerate(model.graph.node)]
    found = [(i, f) for i, f in found if f is not None]
    if not found:
        return 0
    probe = copy.deepcopy(model)
    for i, (x, _, _) in found:
        node = probe.graph.node[i]
        probe.graph.node.remove(node)
        probe.graph.node.insert(i, helper.make_node("Identity", [x], list(node.output)))
    names = list(dict.fromkeys(x for _, (x, _, _) in found))
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    shapes = dict(zip(names, (v.shape for v in sess.run(names, feed))))
    for i, (x, axes_name, consts) in found:
        axes = next(numpy_helper.to_array(c.attribute[0].t) for c in consts if c.output[0] == axes_name)
        d = int(axes.reshape(-1)[0])
        node = model.graph.node[i]
        if shapes[x][d] == 1:
            new = [helper.make_node("Squeeze", [x, axes_name], list(node.output))]
            new = consts + new
        else:
            new = [helper.make_node("Identity", [x], list(node.output))]
        model.graph.node.remove(node)
        for j, n in enumerate(new):
            model.graph.node.insert(i + j, n)
    return len(found)


def _constants_to_initializers(model) -> None:
    """Move every Constant node holding a tensor of more than 16 elements into the graph's initializers (so
    the weights go to the external data file), storing identical tensors once: a module the model calls twice
    (diffusers' DiT runs block 0's timestep embedder again for its output layer) emits its nodes twice."""
    import hashlib

    from onnx import numpy_helper

    keep, seen, rename = [], {}, {}
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.output) == 1 and len(node.attribute) == 1 \
                and node.attribute[0].name == "value":
            arr = numpy_helper.to_array(node.attribute[0].t)
            if arr.size > 16:
                digest = (arr.dtype.str, arr.shape, hashlib.sha256(arr.tobytes()).hexdigest())
                if digest in seen:
                    rename[node.output[0]] = seen[digest]
                else:
                    seen[digest] = node.output[0]
                    model.graph.initializer.append(numpy_helper.from_array(arr, node.output[0]))
                continue
        keep.append(node)
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def dq_nodes(path) -> list:
    """[(op_type, [input names])] of every QuantizeLinear / DequantizeLinear / MatMulNBits node."""
    import onnx

    model = onnx.load_model(str(path), load_external_data=False)
    return [(n.op_type, list(n.input)) for n in model.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear", "MatMulNBits")]


__all__ = ["LayerPlan", "ExportError", "plan_layer", "plan_model", "executes_shares", "executes_label",
           "export_onnx", "export_module", "example_inputs", "matmulnbits_tensors",
           "dq_nodes"]
