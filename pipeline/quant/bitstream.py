"""Bit-stream packing of integer codes: n-bit codes (integer codes offset to be non-negative, FP
sign|exponent|mantissa codes of ``FPQuantizer.encode``), channel masks and residual sign bits.

A stream is a dense little-endian bit stream in a 1-D uint8 tensor: code i occupies stream bits
[i·bits, (i+1)·bits), least significant bit first; stream bit j is bit j % 8 of byte j // 8. Any width
1..8 (3-bit -> 8 codes in 3 bytes); 8-bit codes are plain uint8. Pure tensor functions: no model, file or
quantizer knowledge (that is :mod:`pipeline.quant.packing`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# code widths a stream can hold (1 = masks and sign bits; quantizer grids are 2..8 bits, see primitives.INT_BITS)
STREAM_BITS = tuple(range(1, 9))
CHUNK_CODES = 1 << 20  # codes per packing chunk (multiple of 8 keeps chunks byte aligned)


def check_width(bits) -> int:
    """Return ``bits`` if it is a code width a stream can hold (1..8), else raise ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in STREAM_BITS:
        raise ValueError(f"bits must be an int in {STREAM_BITS[0]}..{STREAM_BITS[-1]} for bit packing, got {bits!r}")
    return bits


def packed_size(count: int, bits: int) -> int:
    """Bytes of a stream of ``count`` codes of ``bits`` bits: ⌈count·bits/8⌉."""
    return -(-int(count) * int(bits) // 8)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers < 2^bits into a dense little-endian bit stream (uint8, ⌈n·bits/8⌉ bytes).

    Code i occupies stream bits [i·bits, (i+1)·bits), least significant bit first; stream bit j is bit
    j % 8 of byte j // 8. 8-bit codes are returned as plain uint8.
    """
    bits = check_width(bits)
    v = values.reshape(-1).to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2 ** bits):
        raise ValueError(f"pack_bits: values must lie in [0, {2 ** bits - 1}] for bits={bits}, "
                         f"got range [{int(v.min())}, {int(v.max())}]")
    if bits == 8:
        return v.to(torch.uint8)
    shifts = torch.arange(bits, device=v.device)
    byte_w = torch.arange(8, device=v.device)
    out = []
    for start in range(0, v.numel(), CHUNK_CODES):
        chunk = v[start:start + CHUNK_CODES]
        stream = ((chunk.unsqueeze(1) >> shifts) & 1).reshape(-1)
        pad = (-stream.numel()) % 8
        if pad:
            stream = F.pad(stream, (0, pad))
        out.append((stream.reshape(-1, 8) << byte_w).sum(dim=1).to(torch.uint8))
    if not out:
        return torch.zeros(0, dtype=torch.uint8, device=v.device)
    return torch.cat(out)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes (int64)."""
    bits = check_width(bits)
    need = packed_size(count, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        raise ValueError(f"unpack_bits: expected a 1-D uint8 stream of {need} bytes for {count} {bits}-bit codes, "
                         f"got {packed.dtype} of shape {tuple(packed.shape)}")
    p = packed.to(torch.int64)
    if bits == 8:
        return p
    shifts = torch.arange(bits, device=p.device)
    byte_w = torch.arange(8, device=p.device)
    out = []
    bytes_per_chunk = CHUNK_CODES * bits // 8
    for start in range(0, p.numel(), bytes_per_chunk):
        stream = ((p[start:start + bytes_per_chunk].unsqueeze(1) >> byte_w) & 1).reshape(-1)
        n = min(CHUNK_CODES, count - (start * 8) // bits)
        out.append((stream[:n * bits].reshape(n, bits) << shifts).sum(dim=1))
    if not out:
        return torch.zeros(0, dtype=torch.int64, device=p.device)
    return torch.cat(out)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as a 1-bit stream (``packed_size(mask.numel(), 1)`` bytes)."""
    return pack_bits(mask.reshape(-1).to(torch.int64), 1)


def unpack_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a 1-D bool tensor of ``n`` entries."""
    return unpack_bits(packed, 1, n).bool()
