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

Integer matrix products stay exact: the oneDNN cap sends ``torch._int_mm`` to an int8 path that saturates,
so :mod:`pipeline.numerics` replaces that one kernel with an exact one as soon as torch is imported
(:func:`_after_torch_import`; see that module for the measurements behind the choice).
"""
import importlib.abc
import importlib.machinery
import os
import sys

__version__ = "0.1.0"

CPU_NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
for _k, _v in CPU_NUMERICS.items():
    os.environ.setdefault(_k, _v)


def cpu_numerics() -> dict:
    """The CPU-numerics variables in force and the integer-product kernel (for run tags and reports)."""
    from . import numerics

    out = {k: os.environ.get(k, "") for k in CPU_NUMERICS}
    out["INT_MM"] = "exact-fp64" if numerics.enabled() else "torch"
    return out


class _TorchImportHook(importlib.abc.MetaPathFinder):
    """Runs :func:`pipeline.numerics.install` right after ``import torch`` finishes (then removes itself),
    so that importing ``pipeline`` stays free of torch's start-up time."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_install(module):
            exec_module(module)
            _after_torch_import()

        loader.exec_module = exec_then_install
        return spec


def _after_torch_import() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchImportHook)]
    from . import numerics

    numerics.install()


if "torch" in sys.modules:
    _after_torch_import()
elif not any(isinstance(f, _TorchImportHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchImportHook())
