"""Fake-quantized drop-in replacements for ``nn.Linear`` and ``nn.Conv2d``.

A wrapped layer keeps the original FP weight (frozen) and composes, on every forward,

    W' = (W + ΔW_lora) · diag(s)                                    (effective_weight)
    Ŵ  = Σ_g Q_g(W')  [+ α ⊙ sign(W' − Σ_g Q_g(W')) on residual channels]  (quantized_weight)
    y  = op(Q_a(x / s), Ŵ) + bias                                    (forward)

- ``Q_g``: one or more weight quantizers (``IntQuantizer`` / ``FPQuantizer`` / the 1-bit ``BinaryQuantizer``)
  with disjoint output-channel masks that together cover every output channel (MPQ-DM OMQ mixed groups:
  b−1 / b / b+1 bits inside one layer; at W2 the 1-bit group is binary). A single quantizer without mask covers the whole layer.
- ``s``: optional per-input-channel scale vector (SmoothQuant / MPQ-DM OMQ pre-scale / DilateQuant
  dilation form): the weight's input columns are multiplied by s and the input divided by s.
- ``ΔW_lora``: optional LoRA (EfficientDM / MPQ-DM ``QuantModule_lora``). Linear: ΔW = B @ A with
  A [r, in] Kaiming-uniform(a=√5) and B [out, r] zeros. Conv: A is the weight of a Conv(in→r) and B of a
  Conv(r→out) with the layer's kernel, merged per kernel position ΔW[:, :, u, v] = B[:, :, u, v] @ A[:, :, u, v]
  (MPQ-DM's merge, not the composition of two convolutions). ΔW is not scaled (MPQ-DM adds B·A as is).
- Optional binary residual (MPQ-DMv2, inferred design) and optional AdaRound (FP4DiT / Q-Diffusion):
  with AdaRound attached, each group's output is its AdaRound soft (or hardened) weight instead of Q_g(W').

Quant switches: ``weight_quant`` and ``act_quant``. With both off the forward is the original module's
forward bit for bit (``F.linear(x, W, b)`` / the ``nn.Conv2d`` conv call): the in_scale round trip is skipped
because it is an identity in exact arithmetic. When LoRA is attached, "off" uses W + ΔW (still without the
in_scale round trip), so a LoRA-trained model can be inspected without quantization.

A layer restored by ``pipeline.quant.packing.load_quantized`` carries ``packed_weight`` (the decoded Ŵ);
its ``quantized_weight()`` returns that tensor, and its FP ``weight`` holds Ŵ·diag(1/s) (the only weight a
packed checkpoint knows), which is what the quant-off path then uses.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.quant.primitives import BinaryQuantizer, BinaryResidual, FPQuantizer, IntQuantizer

WEIGHT_QUANTIZER_TYPES = (IntQuantizer, FPQuantizer, BinaryQuantizer)


def quantizer_channels(q: nn.Module, num_channels: int) -> torch.Tensor:
    """Bool mask [C] of the output channels a weight quantizer covers (all when it has no mask)."""
    mask = getattr(q, "channel_mask", None)
    if mask is None:
        return torch.ones(num_channels, dtype=torch.bool)
    return mask.detach().to("cpu", torch.bool)


class _QuantLayer(nn.Module):
    """Shared machinery of :class:`QuantLinear` and :class:`QuantConv2d` (see module docstring)."""

    def _init_common(self, module: nn.Module) -> None:
        # frozen FP weight; shares storage with the wrapped module's weight
        self.weight = nn.Parameter(module.weight.detach(), requires_grad=False)
        self.bias = module.bias  # kept as is (a method may train it)
        self.weight_quantizers = nn.ModuleList()
        self.residual: Optional[BinaryResidual] = None
        self.act_quantizer: Optional[nn.Module] = None
        self.adaround: Optional[nn.ModuleList] = None
        self.register_buffer("in_scale", None)
        self.register_buffer("packed_weight", None)
        self.lora_A: Optional[nn.Parameter] = None
        self.lora_B: Optional[nn.Parameter] = None
        self.weight_quant = True
        self.act_quant = True
        # filled by packing.load_quantized: the stored payload, so a loaded model can be saved again
        self.packed_payload: Optional[dict] = None

    # -- configuration -------------------------------------------------------------------------
    @property
    def num_out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def lora_rank(self) -> int:
        return 0 if self.lora_A is None else int(self.lora_A.shape[0])

    def set_weight_quantizers(self, quantizers: Sequence[nn.Module],
                              residual: Optional[BinaryResidual] = None, calibrate: bool = True) -> None:
        """Install weight quantizers (disjoint channel masks covering all output channels).

        ``calibrate=True`` calibrates each quantizer on the current effective weight.
        Replaces any AdaRound state (it belongs to the previous quantizers).
        """
        quantizers = list(quantizers)
        c = self.num_out_channels
        covered = torch.zeros(c, dtype=torch.bool)
        for i, q in enumerate(quantizers):
            if not isinstance(q, WEIGHT_QUANTIZER_TYPES):
                raise TypeError(f"weight_quantizers[{i}] must be an IntQuantizer, FPQuantizer or BinaryQuantizer, "
                                f"got {type(q).__name__}")
            if getattr(q, "granularity", None) == "token":
                raise ValueError(f"weight_quantizers[{i}]: granularity 'token' is for activations; "
                                 "weights need 'tensor', 'channel' or 'group'")
            if q.ch_axis != 0:
                raise ValueError(f"weight_quantizers[{i}]: ch_axis must be 0 (output channel), got {q.ch_axis}")
            mask = quantizer_channels(q, c)
            if mask.numel() != c:
                raise ValueError(f"weight_quantizers[{i}]: channel_mask has {mask.numel()} entries, "
                                 f"layer has {c} output channels")
            if (covered & mask).any():
                raise ValueError(f"weight_quantizers[{i}]: channel_mask overlaps an earlier quantizer's "
                                 "mask (masks must be disjoint)")
            covered |= mask
        if quantizers and not covered.all():
            raise ValueError(f"weight quantizer masks leave {int((~covered).sum())} of {c} output channels "
                             "uncovered (the masks must cover every output channel)")
        if residual is not None:
            if not isinstance(residual, BinaryResidual):
                raise TypeError(f"residual must be a BinaryResidual, got {type(residual).__name__}")
            if residual.num_channels != c:
                raise ValueError(f"residual has {residual.num_channels} channels, layer has {c}")
        self.weight_quantizers = nn.ModuleList(quantizers)
        self.residual = residual
        self.adaround = None
        if calibrate:
            self.calibrate_weight()

    @torch.no_grad()
    def calibrate_weight(self) -> None:
        """Re-calibrate every weight quantizer on the current effective weight (after changing masks,
        bits, in_scale or LoRA init); the residual α is re-initialised from the new base quantization."""
        w = self.effective_weight().detach()
        for q in self.weight_quantizers:
            q.calibrate(w)
        if self.residual is not None:
            self.residual.init_from(w, self._sum_groups(w))

    def set_in_scale(self, scale: Optional[torch.Tensor]) -> None:
        """Per-input-channel scale s (weight columns × s, input ÷ s); None removes it.
        Weight quantizers are not re-calibrated here: call :meth:`calibrate_weight`."""
        if scale is None:
            self.in_scale = None
            return
        scale = torch.as_tensor(scale).detach()
        n_in = self.weight.shape[1] * getattr(self, "groups", 1)
        if scale.dim() != 1 or scale.numel() != n_in:
            raise ValueError(f"in_scale must be a 1-D tensor with {n_in} entries (one per input channel), "
                             f"got shape {tuple(scale.shape)}")
        if getattr(self, "groups", 1) != 1:
            raise ValueError("in_scale is only supported for groups=1 convolutions")
        if not torch.isfinite(scale).all() or (scale <= 0).any():
            raise ValueError("in_scale entries must be finite and > 0")
        self.in_scale = scale.to(device=self.weight.device, dtype=self.weight.dtype).clone()

    def add_lora(self, rank: int) -> None:
        """Attach LoRA of rank ``rank`` (A Kaiming-uniform(a=√5), B zeros; methods may re-initialise)."""
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        a_shape, b_shape = self._lora_shapes(rank)
        dev, dt = self.weight.device, self.weight.dtype
        a = torch.empty(a_shape, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(b_shape, device=dev, dtype=dt))

    def lora_delta(self) -> Optional[torch.Tensor]:
        """ΔW (same shape as the weight) or None without LoRA."""
        if self.lora_A is None:
            return None
        return self._lora_product(self.lora_B, self.lora_A)

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Fold ΔW into the frozen weight and drop LoRA (the forward output is unchanged bit for bit)."""
        if self.lora_A is None:
            return
        merged = self.weight + self.lora_delta()
        self.weight = nn.Parameter(merged.detach(), requires_grad=False)
        self.lora_A = None
        self.lora_B = None

    def use_adaround(self) -> nn.ModuleList:
        """Attach one AdaRound module per weight quantizer (weights taken from the current effective
        weight, which must not change afterwards). Returns the list."""
        from pipeline.quant.adaround import AdaRoundWeight

        if not len(self.weight_quantizers):
            raise ValueError("use_adaround: the layer has no weight quantizers")
        w = self.effective_weight().detach()
        self.adaround = nn.ModuleList(AdaRoundWeight(q, w) for q in self.weight_quantizers)
        return self.adaround

    def harden_adaround(self) -> None:
        if self.adaround is not None:
            for a in self.adaround:
                a.harden()

    # -- weights ---------------------------------------------------------------------------------
    def effective_weight(self) -> torch.Tensor:
        """W' = (W + ΔW_lora) · diag(s)."""
        w = self.weight
        delta = self.lora_delta()
        if delta is not None:
            w = w + delta
        if self.in_scale is not None:
            w = w * self.in_scale_weight_view()
        return w

    def _sum_groups(self, w: torch.Tensor) -> torch.Tensor:
        if self.adaround is not None:
            parts = [a() for a in self.adaround]
        else:
            parts = [q(w) for q in self.weight_quantizers]
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out

    def quantized_weight(self) -> torch.Tensor:
        """Ŵ = Σ_g Q_g(W') (+ residual); the decoded packed weight for a reloaded layer.

        Without autograd (sampling, evaluation) Ŵ is cached and recomputed only when a tensor it depends
        on changed (every in-place update — optimizer step, load_state_dict, recalibration — bumps a
        tensor's version counter) or a quantizer's bit width changed: re-quantizing the same weight at
        every sampling step would dominate the run time of small models."""
        if self.packed_weight is not None:
            return self.packed_weight
        if torch.is_grad_enabled():
            self._wq_cache = None
            return self.compute_quantized_weight()
        key = self._weight_state_key()
        cache = getattr(self, "_wq_cache", None)
        if cache is not None and cache[0] == key:
            return cache[1]
        w_q = self.compute_quantized_weight()
        self._wq_cache = (key, w_q)
        return w_q

    def _weight_state_key(self) -> tuple:
        tensors = tuple((id(t), t._version, t.device) for t in self.parameters())
        tensors += tuple((id(t), t._version, t.device) for t in self.buffers())
        flags = tuple((getattr(q, "bits", None), bool(getattr(q, "initialized", True)))
                      for q in self.weight_quantizers)
        hard = tuple(bool(getattr(a, "hardened", False)) for a in (self.adaround or ()))
        return tensors + flags + hard

    def compute_quantized_weight(self) -> torch.Tensor:
        """Ŵ computed now (no cache, no packed weight): Σ_g Q_g(W') (+ residual), or W' without quantizers."""
        w = self.effective_weight()
        if not len(self.weight_quantizers):
            return w
        w_q = self._sum_groups(w)
        if self.residual is not None:
            w_q = w_q + self.residual(w, w_q)
        return w_q

    # -- bits (for cost accounting) ----------------------------------------------------------------
    @property
    def w_bits(self) -> Optional[float]:
        """Average stored bits per weight (channel-weighted over masks, +1 on residual channels);
        None when the weight is not quantized."""
        if not len(self.weight_quantizers):
            return None
        c = self.num_out_channels
        total = 0.0
        for q in self.weight_quantizers:
            total += q.bits * float(quantizer_channels(q, c).sum())
        if self.residual is not None:
            total += float(quantizer_channels(self.residual, c).sum())
        return total / c

    @property
    def a_bits(self) -> Optional[int]:
        return None if self.act_quantizer is None else int(self.act_quantizer.bits)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quant_w = self.weight_quant and (len(self.weight_quantizers) > 0 or self.packed_weight is not None)
        quant_a = self.act_quant and self.act_quantizer is not None
        if not quant_w and not quant_a:
            if self.lora_A is None:
                return self.op(x, self.weight)  # the original module's forward, bit for bit
            return self.op(x, self.weight + self.lora_delta())
        w = self.quantized_weight() if quant_w else self.effective_weight()
        if self.in_scale is not None:
            x = x / self.in_scale_input_view(x)
        if quant_a:
            x = self.act_quantizer(x)
        return self.op(x, w)

    def extra_repr(self) -> str:
        parts = [self._shape_repr(), f"weight_quant={self.weight_quant}", f"act_quant={self.act_quant}"]
        if self.in_scale is not None:
            parts.append("in_scale")
        if self.lora_A is not None:
            parts.append(f"lora_rank={self.lora_rank}")
        if self.packed_weight is not None:
            parts.append("packed")
        return ", ".join(parts)


class QuantLinear(_QuantLayer):
    """Fake-quantized ``nn.Linear`` (see module docstring)."""

    def __init__(self, module: nn.Linear):
        super().__init__()
        if not isinstance(module, nn.Linear):
            raise TypeError(f"QuantLinear wraps an nn.Linear, got {type(module).__name__}")
        self.in_features = module.in_features
        self.out_features = module.out_features
        self._init_common(module)

    @classmethod
    def from_float(cls, module: nn.Linear, weight_quantizers: Iterable[nn.Module] = (),
                   act_quantizer: Optional[nn.Module] = None, residual: Optional[BinaryResidual] = None,
                   calibrate: bool = True) -> "QuantLinear":
        layer = cls(module)
        layer.set_weight_quantizers(list(weight_quantizers), residual, calibrate=calibrate)
        layer.act_quantizer = act_quantizer
        return layer

    def op(self, x, w):
        """The wrapped module's computation with weight ``w``: ``F.linear(x, w, bias)``."""
        return F.linear(x, w, self.bias)

    def in_scale_weight_view(self):
        """``in_scale`` shaped to multiply the weight's input columns ([1, in])."""
        return self.in_scale.reshape(1, -1)

    def in_scale_input_view(self, x):
        """``in_scale`` shaped (and typed) to divide an input ``x`` (last dim)."""
        return self.in_scale.to(x.dtype)

    def _lora_shapes(self, rank):
        return (rank, self.in_features), (self.out_features, rank)

    @staticmethod
    def _lora_product(b, a):
        return b @ a

    def _shape_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantConv2d(_QuantLayer):
    """Fake-quantized ``nn.Conv2d`` (see module docstring); any stride/padding/dilation/groups/padding_mode."""

    def __init__(self, module: nn.Conv2d):
        super().__init__()
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"QuantConv2d wraps an nn.Conv2d, got {type(module).__name__}")
        self.in_channels = module.in_channels
        self.out_channels = module.out_channels
        self.kernel_size = module.kernel_size
        self.stride = module.stride
        self.padding = module.padding
        self.dilation = module.dilation
        self.groups = module.groups
        self.padding_mode = module.padding_mode
        self._reversed_padding_repeated_twice = module._reversed_padding_repeated_twice
        self._init_common(module)

    @classmethod
    def from_float(cls, module: nn.Conv2d, weight_quantizers: Iterable[nn.Module] = (),
                   act_quantizer: Optional[nn.Module] = None, residual: Optional[BinaryResidual] = None,
                   calibrate: bool = True) -> "QuantConv2d":
        layer = cls(module)
        layer.set_weight_quantizers(list(weight_quantizers), residual, calibrate=calibrate)
        layer.act_quantizer = act_quantizer
        return layer

    def op(self, x, w):
        """The wrapped module's computation with weight ``w`` (the same calls as ``nn.Conv2d._conv_forward``)."""
        if self.padding_mode != "zeros":
            return F.conv2d(F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode),
                            w, self.bias, self.stride, (0, 0), self.dilation, self.groups)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def in_scale_weight_view(self):
        """``in_scale`` shaped to multiply the weight's input channels ([1, in, 1, 1])."""
        return self.in_scale.reshape(1, -1, 1, 1)

    def in_scale_input_view(self, x):
        """``in_scale`` shaped (and typed) to divide an input ``x`` [B, C, H, W]."""
        return self.in_scale.to(x.dtype).reshape(1, -1, 1, 1)

    def _lora_shapes(self, rank):
        kh, kw = self.kernel_size
        return (rank, self.in_channels // self.groups, kh, kw), (self.out_channels, rank, kh, kw)

    @staticmethod
    def _lora_product(b, a):
        # per kernel position: ΔW[:, :, u, v] = B[:, :, u, v] @ A[:, :, u, v]
        return torch.einsum("orhw,rihw->oihw", b, a)

    def _shape_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}")


QUANT_LAYER_TYPES = (QuantLinear, QuantConv2d)


def wrap_float_layer(module: nn.Module, **kwargs) -> _QuantLayer:
    """QuantLinear/QuantConv2d.from_float for an nn.Linear / nn.Conv2d."""
    if isinstance(module, nn.Linear):
        return QuantLinear.from_float(module, **kwargs)
    if isinstance(module, nn.Conv2d):
        return QuantConv2d.from_float(module, **kwargs)
    raise TypeError(f"only nn.Linear and nn.Conv2d can be wrapped, got {type(module).__name__}")
