"""Quantization core: primitives (integer / floating-point fake quantizers, binary residual, the FP
format tables), AdaRound, activation quantizers, quantized layers, model surgery (the spec and the one
name-pattern matcher), bit streams (``bitstream``), packed model storage (``packing``), the unpacked
student checkpoint (``checkpoint``) and cost accounting.

Import the submodules directly (``from pipeline.quant.primitives import IntQuantizer``); this
package file imports nothing so that ``import pipeline.quant`` stays cheap.
"""
