"""Low-bit quantization of diffusion models: calibration, quantization, QAT, evaluation, tracking.

The library behind the DVC stages in ``stages/``. Submodules import torch lazily where start-up time
matters (``config``, ``io``, ``tracking``), so stage CLIs validate their parameters instantly.
"""
__version__ = "0.1.0"
