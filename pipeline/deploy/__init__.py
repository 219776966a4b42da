"""Executable low-bit models: a quantized model exported to a graph that a runtime executes with its own
integer kernels, from the project's integer codes, scales and zero points (never re-quantized by the runtime).

- :mod:`pipeline.deploy.onnx_export`: :func:`plan_model` decides, per quantized layer, what the target runs
  (int8 QDQ, 4-bit ``MatMulNBits``, int8 weights with float activations, or the decoded float weight) and
  :func:`export_onnx` writes the ONNX graph (``model.onnx`` + ``deploy.json``).
- :mod:`pipeline.deploy.runtime`: :class:`OrtDenoiser` runs the graph in ONNX Runtime and
  :func:`deployed_backbone` puts it behind the :class:`pipeline.models.DiffusionBackbone` call, so the
  project's one sampling loop (:func:`pipeline.sampling.sample`) samples through the exported artifact.
- :mod:`pipeline.deploy.measure`: seconds per call, peak memory of a fresh process, fidelity.
- :mod:`pipeline.deploy.stage`: the ``export`` DVC stage (every ``export.rows`` entry exported, run and
  measured against the fake-quant model the results table scored); :mod:`pipeline.deploy.layout`: its file
  names, which the report reads.

``python -m pipeline.deploy`` exports and measures one saved model by hand.
"""
