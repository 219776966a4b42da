"""Running an exported graph: ONNX Runtime sessions behind the project's backbone call.

:class:`OrtDenoiser` is one ``onnxruntime.InferenceSession`` with the project's thread setting;
:func:`deployed_backbone` returns a :class:`DeployedBackbone`, a :class:`pipeline.models.DiffusionBackbone`
whose unguided prediction is the session's output. Guidance, the learned-sigma cut, the scheduler and the
latent decoder stay the PyTorch code's, so :func:`pipeline.sampling.sample` samples through the artifact
unchanged (the denoiser call is the only thing swapped).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn


def require_onnxruntime():
    """The onnxruntime module, or one clear error naming the missing package."""
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("deploy: the ONNX Runtime target needs the 'onnxruntime' package "
                          "(pip install onnxruntime onnx)") from None
    return onnxruntime


class OrtDenoiser:
    """One ONNX Runtime CPU session of an exported ``model.onnx``.

    ``threads``: intra-op threads (default: ``torch.get_num_threads()``, so the runtime and PyTorch are timed
    on the same cores). ``optimized_path``: where ORT writes the graph after its fusions (to see which int8
    kernels it chose). ``optimize``: False runs the graph as written (no fusions: the reference float
    execution of the same graph)."""

    def __init__(self, model_path, threads: Optional[int] = None, optimized_path=None, optimize: bool = True,
                 one_timestep_per_call: bool = False):
        ort = require_onnxruntime()
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"deploy: no exported graph at {model_path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                         else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        # ORT fuses DequantizeLinear + MatMul into MatMulNBits with int8 input re-quantization (accuracy
        # level 4) by default; level 0 keeps the float input, so the only quantization is ours
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        if optimized_path is not None:
            opts.optimized_model_filepath = str(optimized_path)
        self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.one_timestep_per_call = bool(one_timestep_per_call)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, labels: Optional[torch.Tensor] = None):
        """The graph's prediction for ``sample`` [B, C, H, W] at ``timestep`` ([B] or scalar) with ``labels`` [B].
        A graph with timestep-indexed scales runs once per distinct timestep of the batch (a sampling step
        has one, so one call)."""
        t = torch.as_tensor(timestep).reshape(-1).expand(sample.shape[0]).to(torch.int64)
        if "labels" in self.inputs:
            if labels is None:
                raise ValueError("labels: this exported model is conditional; pass labels [B]")
            labels = torch.as_tensor(labels).reshape(-1).to(torch.int64)
        steps = torch.unique(t)
        if not self.one_timestep_per_call or steps.numel() == 1:
            return self._run(sample, t, labels)
        out = None
        for step in steps:
            rows = (t == step).nonzero().reshape(-1)
            part = self._run(sample[rows], t[rows], None if labels is None else labels[rows])
            if out is None:
                out = part.new_empty((sample.shape[0],) + tuple(part.shape[1:]))
            out[rows] = part
        return out

    def _run(self, sample, t, labels):
        feed = {"sample": sample.detach().cpu().to(torch.float32).contiguous().numpy(), "timestep": t.numpy()}
        if "labels" in self.inputs:
            feed["labels"] = labels.numpy()
        (out,) = self.session.run(["prediction"], feed)
        return torch.from_numpy(out).to(sample.device)


class DeployedBackbone(nn.Module):
    """The :class:`pipeline.models.DiffusionBackbone` call (``forward(x, t, labels)`` with guidance) over an
    :class:`OrtDenoiser`; it borrows ``forward``, ``decode`` and ``image_shape`` from DiffusionBackbone."""

    def __init__(self, denoiser: OrtDenoiser, like):
        super().__init__()
        self.denoiser = denoiser
        for key in ("kind", "conditioning", "num_classes", "sample_shape", "guidance_scale", "scheduler_config"):
            setattr(self, key, getattr(like, key))
        self.codec = getattr(like, "codec", None)

    @property
    def channels(self) -> int:
        return self.sample_shape[0]

    def _predict(self, x, t, labels, encoder_hidden_states=None):
        from pipeline.models import DiffusionBackbone

        if encoder_hidden_states is not None:
            raise ValueError("encoder_hidden_states: the exported graph takes labels only")
        if self.conditioning == "none":
            labels = None
        else:
            labels = DiffusionBackbone._labels_or_null(self, labels, x.shape[0], x.device)
        return self.denoiser(x, t, labels)

    def forward(self, x, t, labels=None, encoder_hidden_states=None):
        from pipeline.models import DiffusionBackbone

        return DiffusionBackbone.forward(self, x, t, labels, encoder_hidden_states)

    def decode(self, x):
        from pipeline.models import DiffusionBackbone

        return DiffusionBackbone.decode(self, x)

    def image_shape(self):
        from pipeline.models import DiffusionBackbone

        return DiffusionBackbone.image_shape(self)


def deployed_backbone(export_dir, like, threads: Optional[int] = None, optimize: bool = True) -> DeployedBackbone:
    """A :class:`DeployedBackbone` of ``export_dir/model.onnx`` with the attributes (guidance, scheduler,
    autoencoder) of ``like``, the backbone the graph was exported from. The export's ``deploy.json`` must
    match ``like`` (kind, conditioning, classes, sample shape), else one error says which differs."""
    from pipeline.deploy.onnx_export import DEPLOY_FILE, MODEL_FILE

    export_dir = Path(export_dir)
    info_path = export_dir / DEPLOY_FILE
    if not info_path.is_file():
        raise FileNotFoundError(f"deploy: {info_path} not found (run the export first)")
    info = json.loads(info_path.read_text())
    for key in ("kind", "conditioning", "num_classes"):
        if info.get(key) != getattr(like, key):
            raise ValueError(f"deploy: {key} of the exported model ({info.get(key)!r}) differs from the backbone's "
                             f"({getattr(like, key)!r})")
    if list(info.get("sample_shape", [])) != list(like.sample_shape):
        raise ValueError(f"deploy: sample_shape of the exported model ({info.get('sample_shape')}) differs from the "
                         f"backbone's ({list(like.sample_shape)})")
    return DeployedBackbone(OrtDenoiser(export_dir / MODEL_FILE, threads=threads, optimize=optimize,
                                        one_timestep_per_call=bool(info.get("one_timestep_per_call"))), like)


def optimized_op_counts(model_path, threads: int = 1) -> dict:
    """{op type: count} of the graph after ONNX Runtime's optimizations (which int8 kernels it fused)."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        OrtDenoiser(model_path, threads=threads, optimized_path=out)
        model = onnx.load_model(str(out), load_external_data=False)
    counts: dict = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
