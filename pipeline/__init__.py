"""Low-bit quantization of diffusion models: calibration, quantization, QAT, evaluation, tracking.

The library behind the DVC stages in ``stages/``. Submodules import torch lazily where start-up time
matters (``config``, ``io``, ``tracking``), so stage CLIs validate their parameters instantly.

CPU numerics are pinned on import (:data:`CPU_NUMERICS`): PyTorch's vectorised kernels, MKL (BLAS) and
oneDNN (convolutions) each pick their code path by the processor's instruction set, and the paths round
differently, so the same params and seeds trained other weights on an AVX-512 machine than on an AVX2 one
(and on two AVX-512 generations). Pinned to their AVX2 paths (MKL's conditional numerical reproducibility
mode), every x86-64 processor with AVX2 runs the same kernels and gets the same bits. A variable already set
in the environment wins (e.g. ``ATEN_CPU_CAPABILITY=avx512`` for speed, at the price of results that match
only machines of the same instruction set). The libraries read these variables at their first kernel call,
so importing ``pipeline`` before any computation is enough (torch may already be imported).
"""
import os

__version__ = "0.1.0"

CPU_NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
for _k, _v in CPU_NUMERICS.items():
    os.environ.setdefault(_k, _v)


def cpu_numerics() -> dict:
    """The CPU-numerics variables in force (for run tags and reports)."""
    return {k: os.environ.get(k, "") for k in CPU_NUMERICS}
