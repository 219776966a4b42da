"""Quantized attention matmuls as a diffusers attention processor.

:class:`QuantAttnProcessor` reproduces diffusers' standard ``AttnProcessor2_0`` computation (spatial_norm,
4-D UNet inputs, attention mask, group_norm, norm_cross, norm_q/norm_k, output projection and dropout,
residual_connection, rescale_output_factor) for self- and cross-attention, but computes the scores
explicitly so the operands of both matmuls can be fake-quantized (Q-Diffusion / FP4DiT ``QuantQKMatMul``,
``QuantSMVMatMul``):

    S = Q̂ · K̂ᵀ / √d,   P = softmax(S),   O = P̂ · V̂

with Q, K quantized before Q·Kᵀ and P (unsigned: its values lie in [0, 1]) and V before P·V. The score
scale is 1/√head_dim, which is what ``AttnProcessor2_0`` uses (it calls ``scaled_dot_product_attention``
without ``scale`` and so ignores ``attn.scale``).

With ``act_quant=False`` the processor takes exactly the ``scaled_dot_product_attention`` path of
``AttnProcessor2_0`` (bit-identical output). With ``act_quant=True`` and quantizers disabled or absent
the explicit path matches it to float rounding (~1e-6).

Each forward records ``last_macs = {"qk": ..., "pv": ...}`` (multiply-accumulates of the two matmuls)
for :mod:`pipeline.quant.cost`. Attention modules are duck-typed (``to_q``, ``to_k``, ``to_v``,
``set_processor``); no diffusers import.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

OPERANDS = ("q", "k", "p", "v")
SUPPORTED_DEFAULT_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor", "QuantAttnProcessor")


def is_attention_module(module: nn.Module) -> bool:
    """Duck typing for diffusers ``Attention``-like modules."""
    return all(hasattr(module, a) for a in ("to_q", "to_k", "to_v", "set_processor"))


def attention_matmul_macs(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int) -> dict:
    """MACs of Q·Kᵀ and P·V for one attention call (each batch·heads·q_len·kv_len·head_dim)."""
    n = int(batch) * int(heads) * int(q_len) * int(kv_len) * int(head_dim)
    return {"qk": n, "pv": n}


def check_supported(attn: nn.Module, name: str = "attention module") -> None:
    """Raise when ``attn`` runs a processor whose math this module does not reproduce."""
    proc = getattr(attn, "processor", None)
    pname = type(proc).__name__
    if pname not in SUPPORTED_DEFAULT_PROCESSORS:
        raise ValueError(f"{name}: cannot quantize attention with processor {pname}; supported: "
                         f"{list(SUPPORTED_DEFAULT_PROCESSORS)} (standard scaled-dot-product attention)")
    if getattr(attn, "add_k_proj", None) is not None or getattr(attn, "add_q_proj", None) is not None:
        raise ValueError(f"{name}: attention with added key/value projections is not supported")


class QuantAttnProcessor(nn.Module):
    """diffusers attention processor with fake-quantized matmul operands (see module docstring).

    Args: ``q_quantizer``, ``k_quantizer``, ``p_quantizer``, ``v_quantizer``: activation quantizers
    (``pipeline.quant.act``) or None (that operand stays FP). The tensors they see are
    [batch, heads, tokens, head_dim] (Q, K, V) and [batch, heads, q_tokens, kv_tokens] (P), so the leading
    dim is the batch (timestep-indexed quantizers gather per sample).
    """

    def __init__(self, q_quantizer: Optional[nn.Module] = None, k_quantizer: Optional[nn.Module] = None,
                 p_quantizer: Optional[nn.Module] = None, v_quantizer: Optional[nn.Module] = None):
        super().__init__()
        self.q_quantizer = q_quantizer
        self.k_quantizer = k_quantizer
        self.p_quantizer = p_quantizer
        self.v_quantizer = v_quantizer
        self.act_quant = True
        self.last_macs: Optional[dict] = None

    def quantizers(self) -> dict:
        """{operand: quantizer} of the operands that have one."""
        out = {}
        for k in OPERANDS:
            q = getattr(self, f"{k}_quantizer")
            if q is not None:
                out[f"{k}_quantizer"] = q
        return out

    def operand_bits(self, operand: str) -> Optional[int]:
        """Bits of operand 'q'|'k'|'p'|'v' while quantization is active, else None (FP)."""
        q = getattr(self, f"{operand}_quantizer")
        if not self.act_quant or q is None or not getattr(q, "enabled", True):
            return None
        return int(q.bits)

    # diffusers' Attention.forward filters keyword arguments by the processor's ``__call__``
    # signature; nn.Module.__call__ takes *args/**kwargs, so spell the accepted names out here.
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 **kwargs):
        return super().__call__(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                attention_mask=attention_mask, temb=temb, **kwargs)

    def forward(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        self.last_macs = attention_matmul_macs(batch_size, attn.heads, query.shape[2], key.shape[2], head_dim)
        if self.act_quant:
            hidden_states = self._quantized_attention(query, key, value, attention_mask)
        else:
            # AttnProcessor2_0's call, so quant-off output is bit-identical to the default processor
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=0.0, is_causal=False)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    def _quantized_attention(self, query, key, value, attention_mask):
        if self.q_quantizer is not None:
            query = self.q_quantizer(query)
        if self.k_quantizer is not None:
            key = self.k_quantizer(key)
        scale = 1.0 / math.sqrt(query.shape[-1])
        scores = torch.matmul(query, key.transpose(-2, -1))
        # without autograd the scaling and the mask are applied in place (same values, one buffer)
        inplace = not (torch.is_grad_enabled() and scores.requires_grad)
        scores = scores.mul_(scale) if inplace else scores * scale
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, float("-inf"))
            elif inplace and torch.broadcast_shapes(scores.shape, attention_mask.shape) == scores.shape:
                scores = scores.add_(attention_mask)
            else:
                scores = scores + attention_mask
        probs = torch.softmax(scores, dim=-1)
        if self.p_quantizer is not None:
            probs = self.p_quantizer(probs)
        if self.v_quantizer is not None:
            value = self.v_quantizer(value)
        return torch.matmul(probs, value)

    def extra_repr(self) -> str:
        bits = {k: self.operand_bits(k) for k in OPERANDS}
        return f"act_quant={self.act_quant}, bits={bits}"
