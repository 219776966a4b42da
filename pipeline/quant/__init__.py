"""Quantization core: primitives (integer / floating-point fake quantizers, binary residual),
AdaRound, activation quantizers, quantized layers, model surgery, packing and cost accounting.

Import the submodules directly (``from pipeline.quant.primitives import IntQuantizer``); this
package file imports nothing so that ``import pipeline.quant`` stays cheap.
"""
