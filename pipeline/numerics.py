"""Exact integer matrix products under the pinned CPU numerics.

:data:`pipeline.CPU_NUMERICS` caps oneDNN at its AVX2 code path (``ONEDNN_MAX_CPU_ISA=AVX2``) so that float
convolutions give the same bits on every x86-64 processor. PyTorch's CPU ``torch._int_mm`` (int8 x int8 ->
int32, called by optimum-quanto's and torchao's int8-activation layers) is a oneDNN matmul, and oneDNN's int8
path without VNNI instructions sums pairs of u8 x s8 products into 16-bit intermediates that saturate
(``vpmaddubsw``): on 64 x 256 x 128 random int8 operands the error reaches 75 505 under the cap, and on
any processor without VNNI (any AVX2-only or pre-Cascade-Lake AVX-512 machine) the same happens without the
cap (measured: ``ONEDNN_MAX_CPU_ISA=AVX512_CORE`` wrong, ``AVX512_CORE_VNNI`` exact). Lifting the cap would
make integer products exact only on VNNI processors and float convolutions CPU-dependent again; routing
every convolution around oneDNN (``torch.backends.mkldnn.enabled = False``, ATen's im2col + MKL gemm, which
the other two pins cover) made a UNet training step 3x slower here; and PyTorch's own non-oneDNN
``_int_mm`` fallback is exact but a scalar loop (65x slower than the float product at 512 x 1152 x 1152).

So the oneDNN cap stays for floats, and :func:`install` replaces the CPU kernel of ``aten::_int_mm`` by
:func:`exact_int_mm`: the product in float64 (MKL ``dgemm``, pinned like every other BLAS call). It is exact
on every processor: each int8 x int8 product and every partial sum is an integer of magnitude at most
255 * 128 * K < 2**53 for any K below 2.7e11, and float64 represents such integers exactly whatever the
summation order. The int32 it returns is the one value a correct integer kernel returns, so a peer tool's
layer computes here what it computes on a VNNI processor with no cap at all.

``pipeline/__init__`` calls :func:`install` as soon as torch is imported (whichever is imported first), so
every stage, worker, test and bench runs with it. ``PIPELINE_EXACT_INT_MM=0`` leaves torch's kernel in place
(the control that shows the bug; never for results).
"""
from __future__ import annotations

import os
import warnings

ENV_SWITCH = "PIPELINE_EXACT_INT_MM"
_LIB = None  # the torch.library.Library holding the override (kept alive: destroying it unregisters)


def enabled() -> bool:
    """Whether the exact integer kernel is requested (``PIPELINE_EXACT_INT_MM`` unset or not ``0``)."""
    return os.environ.get(ENV_SWITCH, "1") != "0"


def exact_int_mm(a, b):
    """``a @ b`` for int8 / uint8 ``a`` (m, k) and int8 ``b`` (k, n) as int32, exactly (see the module doc).

    Raises ``RuntimeError`` on what ``torch._int_mm`` refuses: not 2-D, mismatched inner sizes, other dtypes."""
    import torch

    if a.dim() != 2 or b.dim() != 2:
        raise RuntimeError(f"_int_mm: expected 2-D operands, got {a.dim()}-D and {b.dim()}-D")
    if a.shape[1] != b.shape[0]:
        raise RuntimeError(f"_int_mm: inner sizes differ: {tuple(a.shape)} @ {tuple(b.shape)}")
    if a.dtype not in (torch.int8, torch.uint8) or b.dtype != torch.int8:
        raise RuntimeError(f"_int_mm: expected int8/uint8 @ int8, got {a.dtype} @ {b.dtype}")
    return torch.mm(a.to(torch.float64), b.to(torch.float64)).to(torch.int32)


def install() -> bool:
    """Register :func:`exact_int_mm` as the CPU kernel of ``aten::_int_mm`` (idempotent). Returns whether
    the override is active (False when :func:`enabled` is off)."""
    global _LIB
    if _LIB is not None:
        return True
    if not enabled():
        return False
    import torch

    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():  # "overriding a previously registered kernel": that is the point
        warnings.simplefilter("ignore")
        lib.impl("_int_mm", exact_int_mm, "CPU")
    _LIB = lib
    return True


def installed() -> bool:
    return _LIB is not None
