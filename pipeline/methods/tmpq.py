"""TMPQ-DM (Sun et al., arXiv 2404.09532): joint timestep reduction and layer-wise mixed precision.

What it quantizes: every ``nn.Linear`` / ``nn.Conv2d`` to integer weights (per output channel,
asymmetric) and integer input activations (per tensor, static), and the attention matmul operands
(Q, K, softmax P, V), each layer at its own searched widths, and it samples on a searched subsequence
of K timesteps instead of the full ``sampling.steps`` schedule. This module holds the pieces; the
search itself (Optuna) is :mod:`pipeline.search`, run by the stage ``search``; the family ``tmpq``
below turns the search's Pareto front into rows of the shared table.

Components, and whom they follow:

1. **Non-uniform timestep groups** (official code, ``group_method='quad'``): boundaries
   ``g_i = int((i · sqrt(0.8 T) / (K−1))²)``, i = 0..K−1, groups ``[g_{i−1}, g_i)`` and
   ``[g_{K−1}, T)``; a candidate picks exactly one timestep per group (dense near t = 0). Sampling on
   the picked subsequence uses the shared sampler (:func:`pipeline.sampling.sample` with
   ``timesteps=``, DDIM η as configured).
2. **Weight-sharing super-network** (official code's ``QuantModule_one``: one quantizer per candidate
   width, switched by index): :class:`SuperNet` builds, for every candidate width b, the uniform
   W<b>A<b> quantizers of every layer (weights calibrated on the weights, activation ranges on the
   calibration inputs), and a candidate only switches which quantizer each layer uses — no
   recalibration. Deviation (ours, for cost and for exactness): the activation ranges are observed on
   the FP network (weights unquantized during calibration), so each layer's quantizer at width b does
   not depend on the widths chosen elsewhere; switching is then exactly a freshly calibrated quantizer
   (tested), and the exported model (:func:`candidate_spec` built from scratch) is the searched one bit
   for bit. The official code calibrates each width with all layers at that width and runs BRECQ
   block reconstruction (AdaRound) per width; we use min-max / MSE ranges (``search.weight_init`` /
   ``act_init``), i.e. the naive PTQ rows' quantizers, so the gain measured is the search's alone.
3. **Search space** (official ``--split_quantization``): per layer a weight width and an input-activation
   width; per attention module one width for Q, K, P and V (the official code decides q, k, v and
   softmax separately; ours: one slot). Layers the protocol keeps at 8 bits (first, last, embeddings:
   ``keep_first_last_bits``) keep their weight width; their activation width is searched.
   ``consistent`` mode (the official scripts): one bit configuration for every selected timestep.
4. **Objective**: (quality proxy, BitOPs) — BitOPs = Σ_layers MACs × b_w × b_a summed over the selected
   timesteps (TMPQ-DM's ``bitops.py``; :func:`candidate_bitops`, equal to :func:`pipeline.quant.cost.bitops`
   on the switched network), constrained to ≤ the budget (uniform W6A6 at the full schedule by default).
   The official fitness is FID on 1–2k samples; ours is the paired pixel MSE to the FP model's images
   (``search.proxy``), far less noisy at the small sample the search affords; the full protocol (FID
   with CIs) scores the exported rows.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..config import ConfigError
from . import Claim, Family, MethodContext, QuantResult, Table, Variant, register_family


# ------------------------------------------------------------------------------------------------
# timestep groups
# ------------------------------------------------------------------------------------------------
def timestep_groups(num_train_timesteps: int, k: int) -> list[tuple[int, int]]:
    """The K groups ``[lo, hi)`` (increasing t) of TMPQ-DM's quadratic grouping."""
    if k < 2:
        raise ValueError(f"k: need at least 2 timestep groups, got {k}")
    t_total = int(num_train_timesteps)
    top = math.sqrt(0.8 * t_total)
    bounds = [int((i * top / (k - 1)) ** 2) for i in range(k)]
    if len(set(bounds)) != k:
        raise ValueError(f"{k} groups are too many for {t_total} timesteps (empty groups: boundaries {bounds})")
    return [(bounds[i - 1], bounds[i]) for i in range(1, k)] + [(bounds[-1], t_total)]


def group_default_timesteps(groups) -> list[int]:
    """The last (noisiest) timestep of every group, noisy end first: the start of the search's uniform
    seeds (the first step then starts from t = T−1, as the trailing-spacing sampler does)."""
    return sorted((hi - 1 for _, hi in groups), reverse=True)


# ------------------------------------------------------------------------------------------------
# quantization spec of a width / a candidate
# ------------------------------------------------------------------------------------------------
def uniform_spec(wbits: int, abits: int, weight_init: str = "minmax", act_init: str = "minmax",
                 keep_bits: int = 8):
    """W<wbits>A<abits> everywhere (attention operands at ``abits``), first/last/embeddings at ``keep_bits``:
    the naive PTQ spec (:func:`pipeline.methods.naive_ptq.naive_spec`) at that setting."""
    from ..config import BitSetting
    from .naive_ptq import NaivePTQConfig, naive_spec

    return naive_spec(BitSetting(wbits, abits),
                      NaivePTQConfig(weight_init=weight_init, act_init=act_init, keep_first_last_bits=keep_bits))


def _exact(name: str) -> str:
    return "re:" + re.escape(name)


def candidate_spec(candidate: "Candidate", weight_init: str = "minmax", act_init: str = "minmax",
                   keep_bits: int = 8):
    """The :class:`~pipeline.quant.surgery.QuantSpec` of a candidate: per-layer rules on exact names, then
    the keep rules (which only fix the weight width of the first / last / embedding layers)."""
    from ..quant.surgery import QuantSpec, default_rules

    base = uniform_spec(max(candidate.w.values(), default=8), max(candidate.a.values(), default=8),
                        weight_init, act_init, keep_bits)
    rules = []
    for name, a in candidate.a.items():
        if name in candidate.attention:
            rules.append((_exact(name), {"attn_bits": a}))
        else:
            rules.append((_exact(name), {"a_bits": a, **({"w_bits": candidate.w[name]} if name in candidate.w else {})}))
    return QuantSpec(default=base.default, rules=rules + default_rules(keep_bits or None))


@dataclass
class Candidate:
    """One point of the search space: per-slot widths and the timestep subsequence (noisy end first).

    ``w``: weight width per layer whose weight width is searched; ``a``: activation width per layer and
    per attention module (``attention`` names the latter)."""

    w: dict
    a: dict
    timesteps: list
    attention: frozenset = field(default_factory=frozenset)

    def to_dict(self) -> dict:
        return {"w": dict(self.w), "a": dict(self.a), "timesteps": [int(t) for t in self.timesteps],
                "attention": sorted(self.attention)}

    @classmethod
    def from_dict(cls, d: dict) -> "Candidate":
        return cls(w={k: int(v) for k, v in d["w"].items()}, a={k: int(v) for k, v in d["a"].items()},
                   timesteps=[int(t) for t in d["timesteps"]], attention=frozenset(d.get("attention", ())))

    @property
    def mean_w_bits(self) -> float:
        return sum(self.w.values()) / max(len(self.w), 1)

    @property
    def mean_a_bits(self) -> float:
        return sum(self.a.values()) / max(len(self.a), 1)


# ------------------------------------------------------------------------------------------------
# super-network
# ------------------------------------------------------------------------------------------------
def calibrate_fp_ranges(backbone, calib, batches: int, seed: int, device) -> None:
    """Activation ranges observed on the FP network (weights unquantized while observing)."""
    from ..quant.surgery import calibrate_on, quant_state

    quant_state(backbone.net, weight=False, act=True)  # observing quantizers pass FP values through
    calibrate_on(backbone, calib, batches=batches, seed=seed, device=device)
    quant_state(backbone.net, weight=True, act=True)


def build_uniform(fp_backbone, calib, wbits: int, abits: int, cfg, device):
    """A deep copy of ``fp_backbone`` at uniform W<wbits>A<abits>, calibrated as the super-network is."""
    import copy

    from ..quant.surgery import quantize_model

    b = copy.deepcopy(fp_backbone)
    quantize_model(b.net, uniform_spec(wbits, abits, cfg.weight_init, cfg.act_init, cfg.keep_first_last_bits))
    calibrate_fp_ranges(b, calib, cfg.calib_batches, cfg.seed, device)
    return b


class SuperNet:
    """Every layer's quantizers at every candidate width; :meth:`apply` switches them (no recalibration).

    ``cfg``: anything with ``w_bits``, ``a_bits``, ``weight_init``, ``act_init``, ``keep_first_last_bits``,
    ``calib_batches``, ``seed`` (:class:`pipeline.config.SearchConfig`)."""

    def __init__(self, fp_backbone, calib, cfg, device="cpu") -> None:
        from ..quant.surgery import quant_attention, quant_layers

        self.cfg = cfg
        self.widths = sorted(set(cfg.w_bits) | set(cfg.a_bits))
        self.copies = {b: build_uniform(fp_backbone, calib, b, b, cfg, device) for b in self.widths}
        self.backbone = self.copies[self.widths[-1]]  # the network whose quantizers get switched
        self.layers = dict(quant_layers(self.backbone.net))
        self.attention = {n: self.backbone.net.get_submodule(n) for n, _ in quant_attention(self.backbone.net)}
        layer_maps = {b: dict(quant_layers(c.net)) for b, c in self.copies.items()}
        processor_maps = {b: dict(quant_attention(c.net)) for b, c in self.copies.items()}
        self.w_quant = {n: {b: m[n].weight_quantizers for b, m in layer_maps.items()} for n in self.layers}
        self.a_quant = {n: {b: m[n].act_quantizer for b, m in layer_maps.items()} for n in self.layers}
        self.processors = {n: {b: m[n] for b, m in processor_maps.items()} for n in self.attention}
        lo, hi = self.widths[0], self.widths[-1]
        lo_bits = layer_maps[lo]
        # weight width searched where it follows the uniform width (the keep rules fix the others)
        self.w_slots = [n for n in self.layers if lo == hi or lo_bits[n].w_bits != self.layers[n].w_bits]
        self.a_slots = [n for n in self.layers if self.layers[n].act_quantizer is not None] + list(self.attention)

    def apply(self, cand: Candidate) -> None:
        """Install ``cand``'s widths (slots it omits keep their current quantizers)."""
        for n, b in cand.w.items():
            if n not in self.w_quant:
                raise KeyError(f"candidate: {n!r} is not a searchable layer of the super-network")
            if b not in self.w_quant[n]:
                raise ValueError(f"candidate: width {b} of {n!r} is not one of {self.widths}")
            self.layers[n].weight_quantizers = self.w_quant[n][b]
            self.layers[n]._wq_cache = None
        for n, b in cand.a.items():
            if n in self.processors:
                self.attention[n].set_processor(self.processors[n][b])
            elif n in self.a_quant:
                self.layers[n].act_quantizer = self.a_quant[n][b]
            else:
                raise KeyError(f"candidate: {n!r} is not a layer or attention module of the super-network")

    def uniform(self, wbits: int, abits: int, timesteps) -> Candidate:
        return Candidate(w={n: wbits for n in self.w_slots}, a={n: abits for n in self.a_slots},
                         timesteps=list(timesteps), attention=frozenset(self.attention))


# ------------------------------------------------------------------------------------------------
# cost
# ------------------------------------------------------------------------------------------------
def per_image_macs(backbone) -> dict:
    """MACs of one model call per image (:func:`pipeline.quant.cost.count_macs`, as the evaluate stage counts)."""
    import torch

    from ..quant.cost import count_macs
    from ..sampling import eval_labels, initial_noise

    device = next(backbone.net.parameters()).device
    x = initial_noise(2, backbone.sample_shape, 0).to(device)
    t = torch.full((2,), 500, device=device)
    y = eval_labels(2, backbone.num_classes).to(device)
    macs = count_macs(backbone.net, lambda: backbone(x, t, y))
    return {k: v / 2 for k, v in macs.items()}


class CostModel:
    """BitOPs of a candidate from per-slot MACs: fixed part (layers not searched) + Σ slots MACs × b_w × b_a,
    times the number of selected timesteps."""

    def __init__(self, supernet: SuperNet, macs: dict) -> None:
        from ..quant.cost import bitops

        self.macs = macs
        self.supernet = supernet
        slots = set(supernet.layers) | {f"{n}.{s}" for n in supernet.attention for s in ("qk", "pv")}
        fixed_macs = {k: v for k, v in macs.items() if k not in slots}
        self.fixed = bitops(supernet.backbone.net, fixed_macs, 1) if fixed_macs else 0.0
        self.fixed_w = {n: float(supernet.layers[n].w_bits) for n in supernet.layers if n not in supernet.w_slots}

    def per_step(self, cand: Candidate) -> float:
        total = self.fixed
        for n in self.supernet.layers:
            if n not in self.macs:
                continue
            wb = cand.w.get(n, self.fixed_w.get(n))
            total += self.macs[n] * wb * cand.a[n]
        for n in self.supernet.attention:
            total += (self.macs.get(f"{n}.qk", 0) + self.macs.get(f"{n}.pv", 0)) * cand.a[n] ** 2
        return total

    def bitops(self, cand: Candidate) -> float:
        """Per image, summed over the candidate's timesteps."""
        return self.per_step(cand) * len(cand.timesteps)


# ------------------------------------------------------------------------------------------------
# the family: rows of the table from the search's Pareto front
# ------------------------------------------------------------------------------------------------
@dataclass
class TMPQConfig:
    """Options of the ``tmpq`` family (its rows come from the ``search`` stage's Pareto front).

    search_dir: the search stage's output (``<search_dir>/<backbone>/front.json``).
    seed: calibration draw of the activation ranges (the method seed offsets it; the search used
    ``search.seed``): the exported configuration is rebuilt and recalibrated per method seed, so the CI
    covers the calibration draw, not the search.
    searched: the row's configuration: the best searched point within the uniform setting's BitOPs (true) or
    the uniform setting itself on the super-network's quantizers (false).
    """

    search_dir: str = "data/search"
    seed: int = 0
    searched: bool = True

    def validate(self, p: str) -> None:
        if not self.search_dir:
            raise ConfigError(f"{p}.search_dir: the search stage's output folder is required")


def read_front(search_dir, backbone: str) -> dict:
    from pathlib import Path

    from ..io import read_json

    path = Path(search_dir) / backbone / "front.json"
    if not path.exists():
        raise FileNotFoundError(f"TMPQ-DM search result {path} not found (stage search@{backbone} writes it)")
    return read_json(path, "search front")


def choose(front: dict, budget: float) -> dict:
    """The front point with the best held-out proxy among those within ``budget`` BitOPs per image."""
    pts = [p for p in front["front"] if p["bitops"] <= budget * (1 + 1e-9)]
    if not pts:
        cheapest = min(p["bitops"] for p in front["front"]) / 1e9
        raise ValueError(f"no searched configuration within {budget / 1e9:.3f} GBitOPs (cheapest on the front: "
                         f"{cheapest:.3f}); raise the setting or widen search.w_bits / a_bits")
    return min(pts, key=lambda p: (p["holdout_mean"], p["bitops"]))


def quantize(backbone, calib, setting, cfg: TMPQConfig, ctx: MethodContext) -> QuantResult:
    """``tmpq``: the searched configuration within the BitOPs of uniform ``setting`` at the full schedule;
    ``uniform``: uniform ``setting`` at the full schedule, calibrated the same way (the reference)."""
    from ..io import write_json
    from ..quant.surgery import quantize_model
    from ..sampling import timestep_values

    front = read_front(cfg.search_dir, ctx.backbone_name)
    sc = front["supernet"]  # the super-network options the search used

    opts = {"weight_init": sc["weight_init"], "act_init": sc["act_init"], "keep_bits": sc["keep_first_last_bits"]}

    full = timestep_values(ctx.diffusion, ctx.sampling, getattr(backbone, "scheduler_config", None))
    if cfg.searched:
        budget = front["uniform_cost_per_step"][setting.name] * len(full) if setting.name in \
            front["uniform_cost_per_step"] else None
        if budget is None:
            raise ValueError(f"setting {setting.name}: the search did not price it (uniform widths "
                             f"{sorted(front['uniform_cost_per_step'])})")
        point = choose(front, budget)
        cand = Candidate.from_dict(point["candidate"])
        spec = candidate_spec(cand, **opts)
        timesteps = cand.timesteps
        info = {"trial": point["trial"], "search_bitops_g": point["bitops"] / 1e9, "n_steps": len(timesteps),
                "mean_w_bits": cand.mean_w_bits, "mean_a_bits": cand.mean_a_bits,
                "holdout_mse": point["holdout_mean"]}
    else:
        spec = uniform_spec(setting.wbits, setting.abits, **opts)
        timesteps = full
        info = {"n_steps": len(full)}
    quantize_model(backbone.net, spec)
    calibrate_fp_ranges(backbone, calib, sc["calib_batches"], cfg.seed, ctx.device)
    if ctx.workdir is not None and timesteps != full:
        write_json(ctx.workdir / "sampling.json", {"timesteps": [int(t) for t in timesteps]})
    return QuantResult(backbone, spec, info)


def check_setting(setting, cfg: TMPQConfig) -> None:
    if not setting.act_quantized:
        raise ValueError("TMPQ-DM quantizes activations: use W<b>A<b> with b < 16")


def extra_inputs(cfg: TMPQConfig, backbone: str) -> list:
    from pathlib import Path

    path = Path(cfg.search_dir) / backbone / "front.json"
    if not path.exists():
        raise FileNotFoundError(f"TMPQ-DM search result {path} not found (stage search@{backbone} writes it)")
    return [path]


register_family(Family(
    name="tmpq", config_cls=TMPQConfig, quantize=quantize, check_setting=check_setting, extra_inputs=extra_inputs,
    description="TMPQ-DM: searched per-layer W/A widths + timestep subsequence (stage search)",
    variants=(
        Variant("tmpq", "TMPQ-DM: best searched configuration within the BitOPs of the uniform setting",
                {"searched": True}),
        Variant("uniform", "uniform bits at the full schedule, the super-network's quantizers", {"searched": False}),
    ),
    backbones=("unet", "dit"),
    tables=(Table(
        title="TMPQ-DM: searched bits + timesteps vs uniform bits at equal or lower BitOPs",
        backbone="unet", baselines=("naive/naive",),
        columns=("fid_ratio", "psnr", "accuracy", "bitops_g", "model_mb", "method_seconds"),
        note="tmpq rows sample on their searched timestep subsequence (bitops_g counts those steps); "
             "the Pareto front of the search on the proxy is in reports/search_<backbone>.md",
        claims=(Claim("tmpq/tmpq", "tmpq/uniform",
                      "TMPQ-DM (arXiv 2404.09532): the searched configuration beats uniform bits at equal BitOPs"),),
    ),),
))
