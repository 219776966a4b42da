"""Cost accounting: MACs, BitOPs and theoretical model bytes (BitOPs as in TMPQ-DM's ``bitops.py``,
github.com/sihouzi21c/TMPQ-DM).

- MACs of one forward (whatever ``run_fn`` runs; use a batch of one for per-image numbers):
  Linear ``in_features · out_elements``; Conv2d ``out_elements · C_in/groups · kh · kw``;
  attention ``Q·Kᵀ`` and ``P·V`` each ``batch · heads · q_tokens · kv_tokens · head_dim``.
- BitOPs = Σ MACs · b_w · b_a per model call × ``n_steps`` (the sampler's model calls). For a layer b_w is
  its average weight bits (mixed masks, +1 on residual channels) and b_a its input-activation bits; for
  attention the two operand bits (Q, K for Q·Kᵀ; P, V for P·V). Unquantized operands count as 32 bits.
- Theoretical bytes: quantized weights Σ rows · row_len · bits / 8, plus 4 bytes per stored scale /
  zero-point (asymmetric int only) / FP maxval, plus the binary residual (1 bit per weight + 4-byte α
  per channel) and the in_scale vector (4 bytes per input channel). A 1-bit binary group (MPQ-DM's b−1
  group at W2) counts 1 bit per weight plus 4-byte μ and α per channel. Everything else (biases, norms,
  FP layers, activation-quantizer parameters) at its element size.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from pipeline.quant.attention import QuantAttnProcessor, attention_matmul_macs, is_attention_module
from pipeline.quant.layers import QUANT_LAYER_TYPES, QuantLinear, quantizer_channels
from pipeline.quant.primitives import BinaryQuantizer, IntQuantizer

FP_OPERAND_BITS = 32  # bits an unquantized (floating-point) operand counts as
ATTN_SUFFIXES = ("qk", "pv")


def _layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, (nn.Linear, QuantLinear)):
        return int(module.in_features) * out.numel()
    kh, kw = module.kernel_size
    return out.numel() * (module.in_channels // module.groups) * kh * kw


def _attention_call_macs(attn: nn.Module, args: tuple, kwargs: dict) -> dict:
    proc = getattr(attn, "processor", None)
    if isinstance(proc, QuantAttnProcessor) and proc.last_macs is not None:
        return dict(proc.last_macs)
    hs = args[0] if args else kwargs["hidden_states"]
    ehs = kwargs.get("encoder_hidden_states")
    if ehs is None and len(args) > 1:
        ehs = args[1]
    if hs.dim() == 4:
        batch, q_len = hs.shape[0], hs.shape[2] * hs.shape[3]
    else:
        batch, q_len = hs.shape[0], hs.shape[1]
    kv_len = q_len if ehs is None else ehs.shape[1]
    heads = int(attn.heads)
    head_dim = attn.to_k.weight.shape[0] // heads
    return attention_matmul_macs(batch, heads, q_len, kv_len, head_dim)


def count_macs(model: nn.Module, run_fn: Callable[[], Any]) -> dict:
    """{name: MACs} accumulated over one call of ``run_fn`` (which runs ``model``). Keys: every
    Linear/Conv2d/QuantLinear/QuantConv2d name, and ``<attention>.qk`` / ``<attention>.pv``."""
    macs: dict = {}
    handles = []

    def layer_hook(name):
        def hook(module, inputs, output):
            macs[name] = macs.get(name, 0) + _layer_macs(module, output)
        return hook

    def attn_hook(name):
        def hook(module, args, kwargs, output):
            for k, v in _attention_call_macs(module, args, kwargs).items():
                key = f"{name}.{k}"
                macs[key] = macs.get(key, 0) + v
        return hook

    try:
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d) + QUANT_LAYER_TYPES):
                handles.append(m.register_forward_hook(layer_hook(name)))
            elif is_attention_module(m):
                handles.append(m.register_forward_hook(attn_hook(name), with_kwargs=True))
        with torch.no_grad():
            run_fn()
    finally:
        for h in handles:
            h.remove()
    return macs


def layer_bits(module: nn.Module) -> tuple:
    """(b_w, b_a) a layer runs with right now (32 for FP operands)."""
    if isinstance(module, QUANT_LAYER_TYPES):
        b_w = module.w_bits if (module.weight_quant and module.w_bits is not None) else FP_OPERAND_BITS
        aq = module.act_quantizer
        active = module.act_quant and aq is not None and getattr(aq, "enabled", True)
        b_a = module.a_bits if active else FP_OPERAND_BITS
        return float(b_w), float(b_a)
    return float(FP_OPERAND_BITS), float(FP_OPERAND_BITS)


def attention_bits(attn: nn.Module, matmul: str) -> tuple:
    """Operand bits of ``matmul`` ('qk' or 'pv') of an attention module."""
    proc = getattr(attn, "processor", None)
    ops = ("q", "k") if matmul == "qk" else ("p", "v")
    if not isinstance(proc, QuantAttnProcessor):
        return float(FP_OPERAND_BITS), float(FP_OPERAND_BITS)
    return tuple(float(proc.operand_bits(o) or FP_OPERAND_BITS) for o in ops)


def bitops(model: nn.Module, macs: dict, n_steps: int = 1) -> float:
    """Σ MACs · b_w · b_a over ``macs`` (from :func:`count_macs`) × ``n_steps`` model calls."""
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int (number of model calls), got {n_steps!r}")
    total = 0.0
    for key, n in macs.items():
        prefix, _, suffix = key.rpartition(".")
        if suffix in ATTN_SUFFIXES and prefix:
            try:
                parent = model.get_submodule(prefix)
            except AttributeError:
                parent = None
            if parent is not None and is_attention_module(parent):
                b1, b2 = attention_bits(parent, suffix)
                total += n * b1 * b2
                continue
        try:
            module = model.get_submodule(key)
        except AttributeError:
            raise ValueError(f"bitops: macs key {key!r} is not a module of the model") from None
        b_w, b_a = layer_bits(module)
        total += n * b_w * b_a
    return total * n_steps


# ------------------------------------------------------------------------------------------------
# bytes
# ------------------------------------------------------------------------------------------------
def _param_entries(q: nn.Module, rows: int) -> int:
    """Number of step/maxval entries a weight quantizer needs for ``rows`` covered channels (binary: one
    (μ, α) pair per channel)."""
    if isinstance(q, BinaryQuantizer):
        return rows
    if q.granularity == "tensor":
        return 1
    p = q.scale if isinstance(q, IntQuantizer) else q.maxval
    per_row = 1 if q.granularity == "channel" else int(p.shape[1])
    return rows * per_row


def quantized_layer_bytes(layer: nn.Module) -> float:
    """Theoretical bytes of a wrapped layer's quantized weight: codes + scales (+ zero-points) +
    residual + in_scale. Bias and activation quantizer parameters are not included."""
    if not isinstance(layer, QUANT_LAYER_TYPES):
        raise TypeError(f"expected a QuantLinear/QuantConv2d, got {type(layer).__name__}")
    c = layer.num_out_channels
    row_len = layer.weight[0].numel()
    if not len(layer.weight_quantizers):
        total = layer.weight.numel() * layer.weight.element_size()
    else:
        total = 0.0
        for q in layer.weight_quantizers:
            rows = int(quantizer_channels(q, c).sum())
            total += rows * row_len * q.bits / 8
            entries = _param_entries(q, rows)
            two = isinstance(q, BinaryQuantizer) or (isinstance(q, IntQuantizer) and not q.symmetric)
            per_entry = 4 * (2 if two else 1)
            total += entries * per_entry
        if layer.residual is not None:
            rows = int(quantizer_channels(layer.residual, c).sum())
            total += rows * row_len / 8 + rows * 4
    if layer.in_scale is not None:
        total += layer.in_scale.numel() * 4
    return total


def model_bytes(model: nn.Module) -> int:
    """Theoretical stored bytes of ``model``: quantized layers per :func:`quantized_layer_bytes`
    (+ their bias and activation-quantizer tensors), every other parameter / persistent buffer at its
    element size. AdaRound logits and the decoded ``packed_weight`` are working state, not counted."""
    total = 0.0
    quant_prefixes = []
    for name, m in model.named_modules():
        if any(name.startswith(p) for p in quant_prefixes):
            continue
        if isinstance(m, QUANT_LAYER_TYPES):
            quant_prefixes.append(name + ".")
            total += quantized_layer_bytes(m)
            if m.bias is not None:
                total += m.bias.numel() * m.bias.element_size()
            if m.lora_A is not None:
                total += (m.lora_A.numel() + m.lora_B.numel()) * m.lora_A.element_size()
            if m.act_quantizer is not None:
                total += sum(t.numel() * t.element_size() for t in m.act_quantizer.state_dict().values())
            continue
        for p in m.parameters(recurse=False):
            total += p.numel() * p.element_size()
        for bname, b in m.named_buffers(recurse=False):
            if b is not None and bname not in m._non_persistent_buffers_set:
                total += b.numel() * b.element_size()
    return int(round(total))
