"""Block / layer output reconstruction of a quantized model (BRECQ; Q-Diffusion ``block_recon.py`` /
``layer_recon.py``; FP4DiT's scale-aware FP AdaRound) as a Lightning module.

Algorithm (BRECQ arXiv 2102.05426; Q-Diffusion arXiv 2302.04304; FP4DiT arXiv 2503.15465), for every
reconstruction unit in registration order:

1. Unit = a block whose name matches one of ``block_patterns`` (DiT / PixArt transformer blocks, UNet
   ResNet and attention blocks) and that holds quantized layers, or a quantized layer outside every block
   (layer-wise reconstruction, as Q-Diffusion does for stand-alone layers).
2. Cache the unit's inputs and targets on the calibration inputs: inputs from the *quantized-so-far*
   model (``asym=True``: every earlier unit already carries its hardened rounding), targets = the unit's
   output in the FP model (BRECQ / Q-Diffusion ``save_inp_oup_data`` with ``asym=True``). Both are taken
   with forward hooks that stop the model right after the unit, so the cost is a partial forward.
3. Attach AdaRound to each quantized layer of the unit (``QuantLinear.use_adaround``: integer AdaRound or
   FP4DiT's scale-aware FP AdaRound, decided by the layer's weight quantizer) and minimise

       L = ‖O_fp − Ô‖² + λ · Σ_layers Σ_w (1 − |2h(V) − 1|^β)

   with Adam over the rounding logits V only (step sizes / clipping values stay fixed, the rest of the unit
   is frozen). ‖·‖² is BRECQ's ``lp_loss``: squared error summed over dim 1 (tokens for [B, N, C]
   transformer outputs, channels for [B, C, H, W] conv outputs) and averaged over the rest. β follows
   :class:`pipeline.quant.adaround.BetaSchedule` (regulariser off during the warm-up, then β 20 → 2).
4. Harden (h = 1[V ≥ 0]): every weight of the unit lies on its quantizer's grid from then on.

Activation quantization is off while the weights are reconstructed unless ``act_quant`` is set
(Q-Diffusion's first phase is weight-only; FP4DiT's online activation quantizers have nothing to learn).

Where the papers are silent (ours): the number of iterations defaults to a small value so the embedded
pipeline stays within its CPU budget (the official 2500 / 20k iterations are a parameter value); each
iteration draws a random batch of cached inputs (seeded); the unit is kept in eval mode during
optimisation (diffusers' DiT label embedding would otherwise drop labels at random).

Block-wise knowledge distillation (DilateQuant BKD, arXiv 2409.14307; :func:`distill_model`): the same
units and input/target caching, but each unit trains its latent weights (straight-through through the weight
quantizers), the weight quantizers' Δ / z and the activation quantizers' Δ / z (per timestep for
timestep-indexed quantizers) with Adam, one learning rate per group, on the plain MSE of the unit output,
activations quantized. Every cached input keeps the timestep it was captured at and the unit runs with
those timesteps in the model's timestep context, so a batch may mix timesteps. With ``block_patterns=("net",)``
and ``root=""`` the whole network is one unit (full-network QAT on the same data).

Logging: one Lightning ``Trainer`` per unit; with ``run`` (a :class:`pipeline.tracking.StageRun`) the
per-step loss, reconstruction error, regulariser and β go to that MLflow run through Lightning's
``MLFlowLogger(run_id=...)``, as ``recon/<unit>/<metric>``. The logger never terminates the stage's run.
"""
from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import lightning as L
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, IterableDataset

from pipeline.quant.adaround import BetaSchedule
from pipeline.train.configs import BlockDistillConfig, ReconConfig  # noqa: F401  (public here too)
from pipeline.quant.layers import QUANT_LAYER_TYPES
from pipeline.quant.surgery import check_pattern, matches_any, quant_state

log = logging.getLogger("pipeline")

# transformer blocks (DiT / PixArt), UNet ResNet + attention blocks (Q-Diffusion's block units)
DEFAULT_BLOCK_PATTERNS = (
    r"re:(.*\.)?transformer_blocks\.\d+",
    r"re:(.*\.)?(down_blocks|up_blocks)\.\d+\.(resnets|attentions)\.\d+",
    r"re:(.*\.)?mid_block\.(resnets|attentions)\.\d+",
)


@dataclass
class ReconUnit:
    """One reconstruction unit: ``name`` (relative to the root module), the module, and its quantized
    layers as (name relative to the root, layer)."""

    name: str
    module: nn.Module
    layers: list

    @property
    def kind(self) -> str:
        return "layer" if isinstance(self.module, QUANT_LAYER_TYPES) else "block"


# ----------------------------------------------------------------------------------------------
# units
# ----------------------------------------------------------------------------------------------
def reconstruction_units(root: nn.Module, block_patterns: Sequence[str] = DEFAULT_BLOCK_PATTERNS) -> list:
    """The units of ``root`` in registration order: blocks matching ``block_patterns`` (glob or
    ``re:<regex>`` on the qualified name; the outermost match wins) that contain weight-quantized layers,
    then every weight-quantized layer outside those blocks as its own unit (ordered by where it sits in
    the module tree)."""
    for i, p in enumerate(block_patterns):
        check_pattern(p, f"block_patterns[{i}]")
    units: list = []
    block_prefixes: list = []
    for name, mod in root.named_modules():
        if not name or isinstance(mod, QUANT_LAYER_TYPES):
            continue
        if any(name == b or name.startswith(b + ".") for b in block_prefixes):
            continue  # nested inside a block already taken
        if matches_any(block_patterns, name):
            layers = [(f"{name}.{n}", m) for n, m in mod.named_modules()
                      if isinstance(m, QUANT_LAYER_TYPES) and len(m.weight_quantizers)]
            block_prefixes.append(name)
            if layers:
                units.append(ReconUnit(name, mod, layers))
    order = {n: i for i, (n, _) in enumerate(root.named_modules())}
    for name, mod in root.named_modules():
        if isinstance(mod, QUANT_LAYER_TYPES) and len(mod.weight_quantizers):
            if not any(name.startswith(b + ".") for b in block_prefixes):
                units.append(ReconUnit(name, mod, [(name, mod)]))
    units.sort(key=lambda u: order[u.name])
    return units


# ----------------------------------------------------------------------------------------------
# caching unit inputs / outputs
# ----------------------------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised by a capture hook once the unit has been seen: the rest of the model is not needed."""


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"reconstruction unit returned {type(out).__name__}; expected a tensor (or a tuple whose "
                    "first element is one)")


def _detach(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach()
    if isinstance(v, dict):
        return {k: _detach(x) for k, x in v.items()}
    if isinstance(v, (tuple, list)):
        return type(v)(_detach(x) for x in v)
    return v


def _merge(chunks: list, sizes: list) -> Any:
    """Concatenate per-chunk values along the batch dim where they carry it; other values must be
    the same in every chunk (e.g. None, flags) and are kept once."""
    first = chunks[0]
    if isinstance(first, torch.Tensor):
        if all(isinstance(c, torch.Tensor) and c.dim() > 0 and c.shape[0] == s for c, s in zip(chunks, sizes)):
            return torch.cat(chunks, dim=0)
        return first
    if isinstance(first, dict):
        return {k: _merge([c[k] for c in chunks], sizes) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_merge([c[i] for c in chunks], sizes) for i in range(len(first)))
    return first


def _index(v: Any, idx: torch.Tensor, n: int) -> Any:
    if isinstance(v, torch.Tensor):
        return v[idx] if v.dim() > 0 and v.shape[0] == n else v
    if isinstance(v, dict):
        return {k: _index(x, idx, n) for k, x in v.items()}
    if isinstance(v, (tuple, list)):
        return type(v)(_index(x, idx, n) for x in v)
    return v


@dataclass
class UnitData:
    """Cached ``args``/``kwargs`` of the unit's forward (batched along dim 0) and its FP ``target``;
    ``timesteps`` [N]: each cached input's sampling timestep (None unless the model has timestep-indexed
    activation quantizers), put back into the model's timestep context whenever the unit runs on its own
    (:meth:`running`)."""

    args: tuple
    kwargs: dict
    target: torch.Tensor
    timesteps: Optional[torch.Tensor] = None
    context: Any = None

    def __len__(self) -> int:
        return int(self.target.shape[0])

    def batch(self, idx: torch.Tensor) -> tuple:
        n = len(self)
        idx = idx.to(self.target.device)
        return _index(self.args, idx, n), _index(self.kwargs, idx, n), self.target[idx]

    @contextlib.contextmanager
    def running(self, idx: torch.Tensor):
        """Context: the timestep context holds the timesteps of the cached inputs ``idx`` (a batch may mix
        timesteps; timestep-indexed quantizers gather per sample), restored afterwards."""
        if self.context is None or self.timesteps is None:
            yield
            return
        old = self.context.current
        self.context.current = self.timesteps[idx.to(self.timesteps.device)]
        try:
            yield
        finally:
            self.context.current = old


def _split_inputs(inputs: Sequence[torch.Tensor], chunk: int) -> Iterator[tuple]:
    n = inputs[0].shape[0]
    for i in range(0, n, chunk):
        yield tuple(t[i:i + chunk] for t in inputs)


@torch.no_grad()
def _capture(model: Callable, module: nn.Module, inputs: Sequence[torch.Tensor], chunk: int, what: str,
             context=None):
    """Run ``model`` on ``inputs`` in chunks and capture ``module``'s inputs (``what="inputs"``) or its
    output (``what="output"``), stopping each forward right there. With a timestep ``context``
    (:class:`pipeline.quant.act.TimestepContext`) the per-sample timesteps in force when the unit is
    called are captured with its inputs (third element)."""
    got: list = []
    sizes: list = []

    if what == "inputs":
        def hook(mod, args, kwargs):
            t = None
            if context is not None and context.current is not None:
                t = context.current.detach().clone()
            got.append((_detach(args), _detach(kwargs), t))
            raise _StopForward
        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    else:
        def hook(mod, args, output):
            got.append(_first_tensor(output).detach())
            raise _StopForward
        handle = module.register_forward_hook(hook)
    try:
        for batch in _split_inputs(inputs, chunk):
            before = len(got)
            try:
                model(*batch)
            except _StopForward:
                pass
            if len(got) != before + 1:
                raise RuntimeError(f"reconstruction: the unit was not called by the model's forward ({what})")
            sizes.append(batch[0].shape[0])
    finally:
        handle.remove()
    return got, sizes


def collect_unit_data(quant_model: Callable, fp_model: Callable, quant_unit: nn.Module, fp_unit: nn.Module,
                      inputs: Sequence[torch.Tensor], asym: bool = True, chunk_size: int = 128,
                      context=None) -> UnitData:
    """Inputs of ``quant_unit`` while ``quant_model`` runs (``asym``; else of ``fp_unit`` in ``fp_model``)
    and the output of ``fp_unit`` in ``fp_model``, for every row of ``inputs`` (model arguments batched
    along dim 0). ``context``: the quantized model's timestep context (see :class:`UnitData`); its
    per-sample timesteps are cached with the inputs."""
    src_model, src_unit = (quant_model, quant_unit) if asym else (fp_model, fp_unit)
    if not asym and context is not None:
        raise ValueError("collect_unit_data: timestep capture needs asym=True (the context belongs to the "
                         "quantized model)")
    got, sizes = _capture(src_model, src_unit, inputs, chunk_size, "inputs", context)
    args = _merge([g[0] for g in got], sizes)
    kwargs = _merge([g[1] for g in got], sizes)
    ts = None
    if context is not None and all(g[2] is not None and g[2].numel() == s for g, s in zip(got, sizes)):
        ts = torch.cat([g[2] for g in got])
    outs, _ = _capture(fp_model, fp_unit, inputs, chunk_size, "output")
    return UnitData(tuple(args), dict(kwargs), torch.cat(outs, dim=0), ts, context if ts is not None else None)


# ----------------------------------------------------------------------------------------------
# the Lightning module
# ----------------------------------------------------------------------------------------------
def output_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BRECQ ``lp_loss`` (p = 2): squared error summed over dim 1, averaged over the other dims."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} does not match target {tuple(target.shape)}")
    err = (pred - target).pow(2)
    return err.sum(dim=1).mean() if err.dim() > 1 else err.mean()


class _RandomIndexBatches(IterableDataset):
    """Endless seeded random index batches over ``n`` cached inputs (consecutive permutations)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        pending = torch.empty(0, dtype=torch.long)
        bs = min(self.batch_size, self.n)
        while True:
            while pending.numel() < bs:
                pending = torch.cat([pending, torch.randperm(self.n, generator=g)])
            idx, pending = pending[:bs], pending[bs:]
            yield idx


class UnitReconstruction(L.LightningModule):
    """AdaRound reconstruction of one unit: Adam on the rounding logits, loss = output error + λ·reg."""

    def __init__(self, unit: nn.Module, rounding: Sequence[nn.Module], data: UnitData, cfg: ReconConfig,
                 name: str = "unit", heldout: Optional[UnitData] = None):
        super().__init__()
        self.heldout = heldout  # cfg.curve_every > 0: cached inputs not used for training
        self.curve: list = []
        self.unit = unit
        self.rounding = nn.ModuleList(rounding)  # AdaRoundWeight modules (their V are the only parameters trained)
        self.data = data
        self.cfg = cfg
        self.unit_name = name
        self.schedule = BetaSchedule(cfg.beta_start, cfg.beta_end, cfg.warmup)

    def train(self, mode: bool = True):
        super().train(mode)
        self.unit.eval()  # dropout / label dropout must stay off: the target is the eval-mode FP output
        return self

    def regularizer(self, beta: Optional[float]) -> torch.Tensor:
        if beta is None or self.cfg.reg_weight == 0:
            return torch.zeros((), device=self.data.target.device)
        return sum(r.regularizer(beta) for r in self.rounding)

    def training_step(self, idx, batch_idx):
        args, kwargs, target = self.data.batch(idx)
        with self.data.running(idx):
            pred = _first_tensor(self.unit(*args, **kwargs))
        rec = output_error(pred, target)
        beta = self.schedule(self.global_step, self.cfg.iters)
        reg = self.regularizer(beta)
        loss = rec + self.cfg.reg_weight * reg
        p = f"recon/{self.unit_name}"
        self.log(f"{p}/loss", loss, on_step=True, batch_size=idx.numel())
        self.log(f"{p}/rec", rec, on_step=True, batch_size=idx.numel())
        self.log(f"{p}/reg", reg, on_step=True, batch_size=idx.numel())
        self.log(f"{p}/beta", 0.0 if beta is None else float(beta), on_step=True, batch_size=idx.numel())
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam([r.V for r in self.rounding], lr=self.cfg.lr)

    def heldout_check(self, step: int, logger=None) -> float:
        """Held-out output error with hard rounding h = 1[V >= 0] (as if the unit were hardened now);
        read-only: the rounding goes back to soft."""
        flags = [bool(r.hardened) for r in self.rounding]
        for r in self.rounding:
            r.hardened.fill_(True)
        try:
            err = unit_error(self.unit, self.heldout)
        finally:
            for r, f in zip(self.rounding, flags):
                r.hardened.fill_(f)
        self.curve.append((step, err))
        lg = logger if logger is not None else (self.logger if self._trainer is not None else None)
        if lg:
            lg.log_metrics({f"recon/{self.unit_name}/heldout": err}, step=step)
        return err

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        every, s = self.cfg.curve_every, self.global_step
        if self.heldout is not None and every and (s % every == 0 or s == self.cfg.iters):
            self.heldout_check(s)

    def train_dataloader(self):
        return DataLoader(_RandomIndexBatches(len(self.data), self.cfg.batch_size, self.cfg.seed), batch_size=None)


def _attached_mlflow_logger(run_id: str, uri: str):
    """Lightning's MLFlowLogger on an existing run, without terminating that run when a fit ends (the
    stage closes its own run)."""
    from lightning.pytorch.loggers import MLFlowLogger

    class AttachedMLFlowLogger(MLFlowLogger):
        def finalize(self, status: str = "success") -> None:
            return None

    return AttachedMLFlowLogger(run_id=run_id, tracking_uri=uri)


@contextlib.contextmanager
def _quiet_lightning():
    names = ("lightning.pytorch", "lightning.fabric", "lightning")
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*IterableDataset.*")
            warnings.filterwarnings("ignore", ".*in eval mode.*")
            warnings.filterwarnings("ignore", ".*LeafSpec.*")
            warnings.filterwarnings("ignore", ".*GPU available but not used.*")
            yield
    finally:
        for n, lvl in old.items():
            logging.getLogger(n).setLevel(lvl)


@torch.no_grad()
def unit_error(unit: nn.Module, data: UnitData, index: Optional[torch.Tensor] = None, chunk: int = 256,
               error_fn: Callable = output_error) -> float:
    """Mean ``error_fn`` (default ``output_error``) of ``unit`` over the cached inputs ``index`` (default: all)."""
    index = torch.arange(len(data)) if index is None else index
    total, n = 0.0, index.numel()
    for i in range(0, n, chunk):
        idx = index[i:i + chunk]
        args, kwargs, target = data.batch(idx)
        with data.running(idx):
            pred = _first_tensor(unit(*args, **kwargs))
        total += float(error_fn(pred, target)) * idx.numel()
    return total / n


@contextlib.contextmanager
def _frozen_except(module: nn.Module, keep: Sequence[nn.Parameter]):
    """requires_grad off for every parameter of ``module`` except ``keep`` (restored afterwards)."""
    keep_ids = {id(p) for p in keep}
    saved = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in saved:
        p.requires_grad_(id(p) in keep_ids)
    try:
        yield
    finally:
        for p, flag in saved:
            if id(p) not in keep_ids:
                p.requires_grad_(flag)


def _unit_trainer(cfg, logger, accelerator: str):
    """The Lightning trainer of one unit's optimisation (AdaRound or BKD): ``cfg.iters`` steps, logging every
    ``cfg.log_every``, deterministic, no checkpoints or progress bar."""
    return L.Trainer(accelerator=accelerator, devices=1, max_steps=cfg.iters, max_epochs=-1,
                     logger=logger if logger is not None else False, enable_checkpointing=False,
                     enable_model_summary=False, enable_progress_bar=False,
                     log_every_n_steps=cfg.log_every, num_sanity_val_steps=0, precision="32-true",
                     deterministic="warn")


def _model_units(quant_model: nn.Module, fp_model: nn.Module, inputs: Sequence[torch.Tensor], root: str,
                 block_patterns: Sequence[str]):
    """Check ``inputs`` (non-empty tensors with one batch dim) and find the units: (q_root, f_root, units)."""
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ValueError("inputs: expected a non-empty sequence of tensors batched along dim 0")
    n = inputs[0].shape[0]
    if any(t.shape[0] != n for t in inputs):
        raise ValueError(f"inputs: every tensor must have the same first dim, got {[t.shape[0] for t in inputs]}")
    q_root = quant_model.get_submodule(root) if root else quant_model
    f_root = fp_model.get_submodule(root) if root else fp_model
    return q_root, f_root, reconstruction_units(q_root, block_patterns)


def _subsample(inputs: Sequence[torch.Tensor], max_inputs: Optional[int], seed: int) -> list:
    """At most ``max_inputs`` rows of ``inputs`` (a seeded random subset; all rows when None or enough)."""
    n = inputs[0].shape[0]
    if max_inputs is None or max_inputs >= n:
        return list(inputs)
    sel = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_inputs]
    return [t[sel.to(t.device)] for t in inputs]


def _run_logger(run, tracking_uri: Optional[str]):
    """A Lightning logger attached to the stage's MLflow ``run`` (None without a run)."""
    if run is None:
        return None
    from pipeline.tracking import tracking_uri as resolve_uri

    return _attached_mlflow_logger(run.run_id, tracking_uri or resolve_uri())


@contextlib.contextmanager
def _unit_session(quant_model: nn.Module, fp_model: nn.Module, q_root: nn.Module, act: bool):
    """Both models in eval mode, weight quantization on and activation quantization ``act`` for the unit loop;
    the activation-quantization state and the train/eval modes are restored afterwards."""
    act_was_on = any(layer.act_quant for _, layer in _quant_layers(q_root))
    q_mode, f_mode = quant_model.training, fp_model.training
    quant_model.eval()
    fp_model.eval()
    try:
        quant_state(q_root, weight=True, act=act)
        yield
    finally:
        quant_state(q_root, weight=True, act=act_was_on)
        quant_model.train(q_mode)
        fp_model.train(f_mode)


def reconstruct_unit(unit: ReconUnit, data: UnitData, cfg: ReconConfig, logger=None,
                     accelerator: str = "cpu", heldout: Optional[UnitData] = None) -> dict:
    """Attach AdaRound to the unit's layers, optimise the rounding (Lightning), harden. Returns
    {"error_rtn", "error_recon", "seconds"}: the unit's output error before (round to nearest) and after
    reconstruction, on ``cfg.error_inputs`` cached inputs."""
    t0 = time.time()
    was_training = unit.module.training
    unit.module.eval()
    n = len(data)
    probe = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 1))[:min(n, cfg.error_inputs)]
    error_rtn = unit_error(unit.module, data, probe)
    rounding = []
    for _, layer in unit.layers:
        rounding.extend(layer.use_adaround())
    params = [r.V for r in rounding]
    module = UnitReconstruction(unit.module, rounding, data, cfg, unit.name, heldout)
    if heldout is not None:
        module.heldout_check(0, logger)
    with _frozen_except(unit.module, params), _quiet_lightning():
        _unit_trainer(cfg, logger, accelerator).fit(module)
    for _, layer in unit.layers:
        layer.harden_adaround()
    unit.module.eval()
    error_recon = unit_error(unit.module, data, probe)
    extra = {}
    if heldout is not None:
        extra = {"error_heldout": unit_error(unit.module, heldout), "curve": list(module.curve)}
    unit.module.train(was_training)
    return {"error_rtn": error_rtn, "error_recon": error_recon, "seconds": time.time() - t0, **extra}


def reconstruct_model(quant_model: nn.Module, fp_model: nn.Module, inputs: Sequence[torch.Tensor],
                      cfg: ReconConfig, root: str = "net",
                      block_patterns: Sequence[str] = DEFAULT_BLOCK_PATTERNS, run=None,
                      tracking_uri: Optional[str] = None) -> dict:
    """BRECQ-style reconstruction of every unit of ``quant_model`` (see module docstring).

    ``quant_model`` / ``fp_model``: callables with the same signature (e.g. two
    :class:`pipeline.models.DiffusionBackbone`, the second an FP copy of the first taken before surgery);
    ``inputs``: their positional arguments batched along dim 0 (e.g. calibration x, t, labels);
    ``root``: attribute path of the sub-module holding the quantized layers in both (``""`` = the
    model itself); ``run``: a StageRun (its ``run_id``) to log into. Leaves weight quantization on and
    activation quantization as it was; returns per-unit errors and times.
    """
    if not isinstance(cfg, ReconConfig):
        raise TypeError(f"cfg must be a ReconConfig, got {type(cfg).__name__}")
    q_root, f_root, units = _model_units(quant_model, fp_model, inputs, root, block_patterns)
    n = inputs[0].shape[0]
    held_inputs = None
    if cfg.curve_every:  # held-out rows (never trained on) for the per-unit curves
        k = min(cfg.curve_inputs, n // 2)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 2))
        held_inputs = [t[perm[:k].to(t.device)] for t in inputs]
        inputs = [t[perm[k:].to(t.device)] for t in inputs]
    inputs = _subsample(inputs, cfg.max_inputs, cfg.seed)
    accelerator = "gpu" if inputs[0].device.type == "cuda" else "cpu"
    logger = _run_logger(run, tracking_uri)
    t0 = time.time()
    out: dict = {"units": {}}
    with _unit_session(quant_model, fp_model, q_root, cfg.act_quant):
        for i, unit in enumerate(units):
            fp_unit = f_root.get_submodule(unit.name)
            data = collect_unit_data(quant_model, fp_model, unit.module, fp_unit, inputs, cfg.asym, cfg.chunk_size,
                                     context=timestep_context(q_root) if cfg.asym else None)
            held = None if held_inputs is None else collect_unit_data(
                quant_model, fp_model, unit.module, fp_unit, held_inputs, cfg.asym, cfg.chunk_size)
            res = reconstruct_unit(unit, data, cfg, logger, accelerator, held)
            res["kind"] = unit.kind
            out["units"][unit.name] = res
            log.info("reconstruction %d/%d %s (%s, %d layers): output error %.4g -> %.4g in %.1f s", i + 1,
                     len(units), unit.name, unit.kind, len(unit.layers), res["error_rtn"], res["error_recon"],
                     res["seconds"])
            del data
    out["seconds"] = time.time() - t0
    out["n_units"] = len(units)
    out["n_inputs"] = int(inputs[0].shape[0])
    return out


def summarize_units(res: dict, prefix: str) -> dict:
    """The one summary of a :func:`reconstruct_model` or :func:`distill_model` result that a family logs:
    ``<prefix>_seconds``, ``_units``, ``_inputs``, the mean over units of the output error before and after
    (``_error_rtn`` / ``_error`` for a reconstruction, ``_mse_before`` / ``_mse_after`` for a distillation)
    and, for a distillation, the trained parameters by kind summed over units (``_<kind>_params``)."""
    units = list(res["units"].values())
    out = {f"{prefix}_seconds": res["seconds"], f"{prefix}_units": res["n_units"], f"{prefix}_inputs": res["n_inputs"]}
    fields = {"error_rtn": "error_rtn", "error": "error_recon"} if "error_rtn" in (units[0] if units else {}) \
        else {"mse_before": "mse_before", "mse_after": "mse_after"}
    for name, field in fields.items():
        out[f"{prefix}_{name}"] = sum(u[field] for u in units) / max(1, len(units))
    counts: dict = {}
    for u in units:
        for kind, n in u.get("params", {}).items():
            counts[kind] = counts.get(kind, 0) + n
    out.update({f"{prefix}_{kind}_params": n for kind, n in counts.items()})
    return out


def _quant_layers(root: nn.Module):
    return [(n, m) for n, m in root.named_modules() if isinstance(m, QUANT_LAYER_TYPES)]


def timestep_context(root: nn.Module):
    """The timestep context of the quantized model under ``root`` (installed by ``quantize_model`` on the
    wrapped net, which may be ``root`` or a sub-module of it), or None."""
    from pipeline.quant.surgery import get_timestep_context

    for m in root.modules():
        ctx = get_timestep_context(m)
        if ctx is not None:
            return ctx
    return None


# ----------------------------------------------------------------------------------------------
# block-wise knowledge distillation (DilateQuant BKD): train weights + quantizer parameters per unit
# ----------------------------------------------------------------------------------------------
def unit_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element (DilateQuant's block loss, eq. 15)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} does not match target {tuple(target.shape)}")
    return (pred - target).pow(2).mean()


def unit_trainables(module: nn.Module) -> dict:
    """{"weight": latent weights, "weight_quant": Δ_w / z_w, "act_quant": Δ_x / z_x} of every quantized
    layer, and attention operand quantizer, inside ``module`` (learnable quantizers only contribute their
    parameters; biases, norms and embeddings stay frozen)."""
    from pipeline.quant.attention import QuantAttnProcessor

    groups: dict = {"weight": [], "weight_quant": [], "act_quant": []}
    seen: set = set()

    def add(key, params):
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                groups[key].append(p)

    for m in module.modules():
        if isinstance(m, QUANT_LAYER_TYPES):
            if len(m.weight_quantizers) and m.packed_weight is None:
                add("weight", [m.weight])
                for q in m.weight_quantizers:
                    add("weight_quant", q.parameters())
            if m.act_quantizer is not None:
                add("act_quant", m.act_quantizer.parameters())
        elif isinstance(m, QuantAttnProcessor):
            for q in m.quantizers().values():
                add("act_quant", q.parameters())
    return groups


class UnitDistillation(L.LightningModule):
    """BKD of one unit: Adam on its latent weights (STE through the weight quantizers), Δ_w / z_w and the
    per-timestep Δ_x / z_x, each group with its own learning rate; loss = MSE(FP unit output, quantized
    unit output) on cached (asym) inputs, the cached timesteps back in the context for every batch."""

    def __init__(self, unit: nn.Module, groups: dict, data: UnitData, cfg: BlockDistillConfig, name: str = "unit",
                 prefix: str = "bkd"):
        super().__init__()
        self.prefix = prefix
        self.unit = unit
        self.groups = groups
        self.data = data
        self.cfg = cfg
        self.unit_name = name

    def train(self, mode: bool = True):
        super().train(mode)
        self.unit.eval()  # the target is the eval-mode FP output (no dropout / label dropout)
        return self

    def training_step(self, idx, batch_idx):
        args, kwargs, target = self.data.batch(idx)
        with self.data.running(idx):
            pred = _first_tensor(self.unit(*args, **kwargs))
        loss = unit_mse(pred, target)
        self.log(f"{self.prefix}/{self.unit_name}/mse", loss, on_step=True, batch_size=idx.numel())
        return loss

    def configure_optimizers(self):
        lrs = self.cfg.group_lrs()
        groups = [{"params": ps, "lr": lrs[k], "name": k} for k, ps in self.groups.items() if ps and lrs[k] > 0]
        return torch.optim.Adam(groups)

    def train_dataloader(self):
        return DataLoader(_RandomIndexBatches(len(self.data), self.cfg.batch_size, self.cfg.seed), batch_size=None)


def distill_unit(unit: ReconUnit, data: UnitData, cfg: BlockDistillConfig, logger=None,
                 accelerator: str = "cpu", prefix: str = "bkd") -> dict:
    """Train one unit (:class:`UnitDistillation`) for ``cfg.iters`` steps. Returns {"mse_before",
    "mse_after", "seconds", "params"} (MSE on ``cfg.error_inputs`` cached inputs)."""
    t0 = time.time()
    was_training = unit.module.training
    unit.module.eval()
    n = len(data)
    probe = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 1))[:min(n, cfg.error_inputs)]
    before = unit_error(unit.module, data, probe, error_fn=unit_mse)
    groups = unit_trainables(unit.module)
    lrs = cfg.group_lrs()
    trained = [p for k, ps in groups.items() if lrs[k] > 0 for p in ps]
    counts = {k: sum(p.numel() for p in ps) for k, ps in groups.items()}
    if cfg.iters > 0 and trained:
        module = UnitDistillation(unit.module, groups, data, cfg, unit.name, prefix)
        with _frozen_except(unit.module, trained), _quiet_lightning():
            for p in trained:
                p.requires_grad_(True)
            try:
                _unit_trainer(cfg, logger, accelerator).fit(module)
            finally:
                for p in trained:
                    p.requires_grad_(False)
    unit.module.eval()
    after = unit_error(unit.module, data, probe, error_fn=unit_mse)
    unit.module.train(was_training)
    return {"mse_before": before, "mse_after": after, "seconds": time.time() - t0, "params": counts}


def distill_model(quant_model: nn.Module, fp_model: nn.Module, inputs: Sequence[torch.Tensor],
                  cfg: BlockDistillConfig, root: str = "net",
                  block_patterns: Sequence[str] = DEFAULT_BLOCK_PATTERNS, run=None,
                  tracking_uri: Optional[str] = None, act_quant: bool = True, prefix: str = "bkd") -> dict:
    """Block-wise knowledge distillation of every unit of ``quant_model`` in order (DilateQuant BKD):
    the same units, asym input caching and MLflow logging as :func:`reconstruct_model`, but each unit
    trains its latent weights and quantizer parameters (:class:`UnitDistillation`) with activation
    quantization ``act_quant`` on. Timestep-indexed activation quantizers get each cached input's own
    timestep (captured with the unit inputs). ``block_patterns=("net",)`` with ``root=""`` makes the whole
    network one unit (full-network distillation). Returns per-unit MSEs, times and trained-parameter counts.
    """
    if not isinstance(cfg, BlockDistillConfig):
        raise TypeError(f"cfg must be a BlockDistillConfig, got {type(cfg).__name__}")
    q_root, f_root, units = _model_units(quant_model, fp_model, inputs, root, block_patterns)
    inputs = _subsample(inputs, cfg.max_inputs, cfg.seed)
    accelerator = "gpu" if inputs[0].device.type == "cuda" else "cpu"
    logger = _run_logger(run, tracking_uri)
    context = timestep_context(q_root) if cfg.asym else None
    t0 = time.time()
    out: dict = {"units": {}}
    with _unit_session(quant_model, fp_model, q_root, act_quant):
        for i, unit in enumerate(units):
            fp_unit = f_root.get_submodule(unit.name)
            data = collect_unit_data(quant_model, fp_model, unit.module, fp_unit, inputs, cfg.asym, cfg.chunk_size,
                                     context=context)
            res = distill_unit(unit, data, cfg, logger, accelerator, prefix)
            res["kind"] = unit.kind
            out["units"][unit.name] = res
            log.info("%s %d/%d %s (%s, %d layers): output MSE %.4g -> %.4g in %.1f s", prefix, i + 1, len(units),
                     unit.name, unit.kind, len(unit.layers), res["mse_before"], res["mse_after"], res["seconds"])
            del data
    out["seconds"] = time.time() - t0
    out["n_units"] = len(units)
    out["n_inputs"] = int(inputs[0].shape[0])
    return out
