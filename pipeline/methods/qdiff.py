"""Q-Diffusion: post-training quantization of diffusion models (the ancestor PTQ baseline).

Paper: Li, Dong, Wang, Mao, Chen, Gu, Keutzer, "Q-Diffusion: Quantizing Diffusion Models", ICCV 2023,
arXiv 2302.04304; official code ``github.com/Xiuyu-Li/q-diffusion`` (``qdiff/``: BRECQ-derived
``block_recon.py`` / ``layer_recon.py``, ``adaptive_rounding.py``, ``quant_layer.py`` with ``split``).
[CODE] = follows the official code as summarised in ``references/methods.md`` §5 / §6; [ours] = a
choice the paper and code leave open or a documented deviation.

What it quantizes: every nn.Linear / nn.Conv2d to W<b> integers (asymmetric, one range per output
channel, min-max init = the official ``scale_method: 'max'`` for weights [CODE]; ``weight_init: mse`` for
the core's L_2.4 search), their inputs to A<b> integers (asymmetric, one static step per tensor, MSE init =
the official default without ``--a_min_max`` [CODE]), and the attention matmul operands (Q, K, softmax
probabilities, V) with the same static per-tensor quantizers (official ``QuantQKMatMul`` /
``QuantSMVMatMul``, ``--sm_abit`` = the activation bits for pixel / LDM models [CODE]). Input / output
layers and the embedding paths keep ``keep_first_last_bits`` = 8-bit weights (official
``set_first_last_layer_to_8bit``; our ``default_rules`` also keep the timestep / class embeddings at
8 bits [ours]).

Algorithm (:func:`quantize`, in this order):

1. Shortcut splitting [CODE ``QuantModule.split``]: in the UNet's up blocks the first conv of every
   ResNet block (``up_blocks.*.resnets.*.conv1``) and its ``conv_shortcut`` read
   ``cat([hidden_states, skip], dim=1)``, two tensors with very different ranges. Their input gets two
   activation quantizers, one per part of the channel dim (:class:`pipeline.quant.act.SplitActQuantizer`;
   split point = the hidden_states channel count, :func:`shortcut_splits`), and their weight gets separate
   ranges for the two input-channel parts too (official: ``weight_quantizer`` / ``weight_quantizer_0``),
   realised as a per-(output channel, group) weight range with one group per part (group size = split ×
   kh × kw; the core zero-pads a shorter last group, 0 lies on every grid) [ours: the mechanism; the effect
   is the official one as long as the skip part has at most ``split`` channels, which holds in every
   diffusers UNet2DModel up block — :func:`shortcut_splits` checks it]. ``split_weights: false`` keeps one
   weight range per output channel (activation split only).
2. Phase 1 — BRECQ block reconstruction with AdaRound weights [CODE ``block_recon.py``], weight-only
   (activations off, as the official first pass): units = UNet ResNet / attention blocks and DiT
   transformer blocks, every other quantized layer on its own (:func:`pipeline.train.recon.reconstruct_model`);
   inputs from the quantized-so-far model (``asym``), targets from the FP model; loss ‖O − Ô‖² + λ·Σ(1 −
   |2h − 1|^β), λ = 0.01, β 20 → 2 after a 20 % warm-up, Adam on the rounding logits, hard rounding at the
   end. Official schedule: 20 000 iterations, batch 32 (``recon.iters: 20000``); default here: short.
3. Activation init [CODE]: activations on, static per-tensor steps from ``calib_batches`` batches of the
   calibration set (MSE: the core's 80-candidate L_2.4 search on ``act_mse_samples`` kept values), weights
   already hardened.
4. Phase 2 — LSQ-style learning of the activation steps in a second block reconstruction pass (the
   official ``cali_iters_a`` pass; chosen over joint learning) [CODE]: the same units, asym inputs with
   activation quantization on, Adam on the activation quantizers' parameters only (every layer input and
   attention operand of the unit; AdaRound weights frozen), lr ``act_recon.act_quant_lr`` = 4e-4 (official
   ``--cali_lr 4e-4``), :func:`pipeline.train.recon.distill_model`. Official: 5 000 iterations, batch 32.
   Deviations [ours]: the zero point is learned with the step (the official code learns Δ only), the loss
   is the plain output MSE (official: L_p with p = 2.4, no cosine schedule), and both phases use the same
   calibration subset.
5. Calibration data [CODE-like]: the shared calibration file — the FP sampler's own inputs (x_t, t, label)
   at time steps spread uniformly over its trajectory, Q-Diffusion's time-step-aware calibration.

Variants: ``qdiff`` (1-5), ``qdiff_no_split`` (no shortcut splitting: the paper's ablation),
``brecq_w`` (phase 1 only: AdaRound weights, split off, min-max static activations, no phase 2 — BRECQ
weights with naive activations). DiT backbones run too (they have no concatenated inputs; ``qdiff`` and
``qdiff_no_split`` are then the same).

Measured (``bench/qdiff_cost.py``: a freshly initialised default-size UNet — untrained, a sanity check, not a
result — 640 calibration inputs, 18 units, relative L2 error of ε vs FP on 128 held-out trajectory inputs,
1 thread on 2 shared cores): W4A8 naive 0.1626, qdiff 0.1517-0.1524, qdiff_no_split 0.1550-0.1561, brecq_w
0.1553; W8A8 naive 0.0380, qdiff 0.0351-0.0358, qdiff_no_split 0.0366, brecq_w 0.0379. 15-20 s per job, about
half of it phase 2 (per-unit caching and trainer set-up dominate: 10 vs 20 iterations saves ~3 s a pass).
Phase 2 at the default schedule (10 iterations, official lr 4e-4) barely moves the steps (W4A8 qdiff 0.1524
without it, 0.1517 with it); per unit the block MSE drops by 0-1.5 % (two of 18 units rise by < 20 %). A 10x larger lr (4e-3)
diverges: the block MSE rises on the training inputs themselves (attention blocks 0.0018 -> 0.049) and the
whole-model error becomes 0.4055 — Adam moves Δ by ~lr per step whatever its size, and the small steps
(post-softmax P at A8: Δ ≈ 1/255) overshoot. Keep the official lr; longer phase-2 schedules are untested here.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Optional


from ..config import WEIGHT_BITS, ConfigError, choice
from ..train.configs import BlockDistillConfig, ReconConfig
from . import Claim, Family, MethodContext, QuantResult, Table, Variant, register_family

SPLIT_LEAVES = ("conv1", "conv_shortcut")  # the ResNet layers that read cat([hidden, skip]) in up blocks


def _default_act_recon() -> BlockDistillConfig:
    return BlockDistillConfig(iters=10, batch_size=32, weight_lr=0.0, weight_quant_lr=0.0, act_quant_lr=4.0e-4)


@dataclass
class QDiffConfig:
    """Options of the Q-Diffusion family (params section ``qdiff``).

    weight_init: weight range init (minmax = official ``scale_method: 'max'``; mse = the core's search).
    act_init: activation step init (mse = official default; minmax = ``--a_min_max``).
    act_mse_samples: values each activation quantizer keeps for the MSE init.
    keep_first_last_bits: bits of the input/output/embedding layers (0 = keep them FP).
    calib_batches: batches of 64 calibration inputs for the activation init.
    split_weights: with shortcut splitting, also give the two input-channel parts separate weight ranges.
    recon: phase 1, AdaRound block reconstruction (:class:`pipeline.train.configs.ReconConfig`; official
        20 000 iterations, batch 32).
    act_recon: phase 2, activation-step learning (:class:`pipeline.train.configs.BlockDistillConfig` with
        ``weight_lr`` = ``weight_quant_lr`` = 0: only activation quantizers learn; official 5 000 iterations,
        batch 32, lr 4e-4; ``iters: 0`` = no phase 2).
    seed: calibration batches (the method seed offsets it, ``recon.seed`` and ``act_recon.seed``).
    split / act_learn: the method's parts the rows set (:data:`VARIANTS`): shortcut splitting of the up-block
        skip concatenations, and phase 2 (learned activation steps; off = the initial static steps stay).
    """

    weight_init: str = choice("minmax", "mse", default="minmax")
    act_init: str = choice("minmax", "mse", default="mse")
    act_mse_samples: int = 1024
    keep_first_last_bits: int = 8
    calib_batches: int = 4
    split_weights: bool = False
    recon: ReconConfig = field(default_factory=lambda: ReconConfig(iters=20, batch_size=32))
    act_recon: BlockDistillConfig = field(default_factory=_default_act_recon)
    seed: int = 0
    split: bool = True
    act_learn: bool = True

    def validate(self, p: str) -> None:
        if self.keep_first_last_bits not in (0, *WEIGHT_BITS):
            raise ConfigError(f"{p}.keep_first_last_bits: must be 0 (FP) or one of {list(WEIGHT_BITS)}, "
                              f"got {self.keep_first_last_bits!r}")
        for name in ("calib_batches", "act_mse_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{p}.{name}: must be a positive int, got {v!r}")
        if not isinstance(self.split_weights, bool):
            raise ConfigError(f"{p}.split_weights: must be true/false, got {self.split_weights!r}")
        self.recon.validate(f"{p}.recon")
        if self.recon.act_quant:
            raise ConfigError(f"{p}.recon.act_quant: must be false (phase 1 reconstructs the weights with "
                              "activations off; phase 2 learns the activation steps)")
        self.act_recon.validate(f"{p}.act_recon")
        for name in ("weight_lr", "weight_quant_lr"):
            if getattr(self.act_recon, name) != 0:
                raise ConfigError(f"{p}.act_recon.{name}: must be 0 (phase 2 learns only the activation "
                                  f"quantizers; the AdaRound weights are final), got {getattr(self.act_recon, name)!r}")
        if not self.act_recon.act_quant_lr > 0 and self.act_recon.iters > 0:
            raise ConfigError(f"{p}.act_recon.act_quant_lr: must be > 0 when act_recon.iters > 0 "
                              f"(use act_recon.iters: 0 to skip phase 2), got {self.act_recon.act_quant_lr!r}")


# each row: config overrides (brecq_w also sets the activation init: min-max static steps)
VARIANTS = {
    "qdiff": {"split": True, "act_learn": True},
    "qdiff_no_split": {"split": False, "act_learn": True},
    "brecq_w": {"split": False, "act_learn": False, "act_init": "minmax"},
}
_DESCRIPTIONS = {
    "qdiff": "Q-Diffusion: AdaRound block reconstruction + learned activation steps + shortcut splitting",
    "qdiff_no_split": "Q-Diffusion without shortcut splitting (one quantizer over the concatenated skip input)",
    "brecq_w": "BRECQ AdaRound weights only, min-max static activations (no activation learning, no split)",
}


# ------------------------------------------------------------------------------------------------
# shortcut splitting
# ------------------------------------------------------------------------------------------------
def shortcut_splits(net) -> dict:
    """{qualified layer name: split} for the layers of a diffusers UNet whose input is
    ``cat([hidden_states, skip], dim=1)``: ``up_blocks.<b>.resnets.<i>.conv1`` / ``.conv_shortcut``; split =
    the hidden_states channel count (resnet i > 0: the previous resnet's output; resnet 0: the previous up
    block's output, or the mid block's for the first up block). Empty for models without up blocks (DiT).
    Raises ValueError when the architecture does not fit (split outside (0, in_channels), or a skip part
    wider than the hidden part, which the one-group-per-part weight split cannot express)."""
    ups = getattr(net, "up_blocks", None)
    if ups is None:
        return {}
    mid = getattr(net, "mid_block", None)
    prev = mid.resnets[-1].out_channels if mid is not None and getattr(mid, "resnets", None) else None
    out: dict = {}
    for b, block in enumerate(ups):
        resnets = list(getattr(block, "resnets", None) or [])
        for i, r in enumerate(resnets):
            hidden = prev if i == 0 else resnets[i - 1].out_channels
            in_ch = int(r.in_channels)
            if hidden is None or not 0 < hidden < in_ch:
                raise ValueError(f"up_blocks.{b}.resnets.{i}: cannot locate the skip concatenation "
                                 f"(hidden channels {hidden}, input channels {in_ch})")
            if in_ch - hidden > hidden:
                raise ValueError(f"up_blocks.{b}.resnets.{i}: skip part ({in_ch - hidden} channels) wider than "
                                 f"the hidden part ({hidden}); the weight split needs skip <= hidden")
            for leaf in SPLIT_LEAVES:
                if getattr(r, leaf, None) is not None:
                    out[f"up_blocks.{b}.resnets.{i}.{leaf}"] = int(hidden)
        if resnets:
            prev = int(resnets[-1].out_channels)
    return out


def split_weight_rules(net, splits: dict) -> list:
    """Spec rules giving each split layer one weight range per (output channel, input part): group
    granularity with group size split × kh × kw."""
    rules = []
    for name, split in splits.items():
        w = net.get_submodule(name).weight
        per_channel = int(w[0, 0].numel())  # kh * kw
        rules.append((name, {"w_granularity": "group", "group_size": split * per_channel}))
    return rules


def apply_shortcut_split(net, splits: dict) -> int:
    """Replace the activation quantizer of every split layer by a :class:`SplitActQuantizer` with two
    copies of it (same bits / init / learnability). Returns the number of layers split."""
    from ..quant.act import SplitActQuantizer

    n = 0
    for name, split in splits.items():
        layer = net.get_submodule(name)
        q = getattr(layer, "act_quantizer", None)
        if q is None or isinstance(q, SplitActQuantizer):
            continue
        layer.act_quantizer = SplitActQuantizer(split, q, copy.deepcopy(q))
        n += 1
    return n


# ------------------------------------------------------------------------------------------------
# the method
# ------------------------------------------------------------------------------------------------
def qdiff_spec(setting, cfg: QDiffConfig, split_rules: Optional[list] = None):
    """W<b> asymmetric per-channel INT, A<b> static per-tensor asymmetric INT (learnable with phase 2) on
    layer inputs and attention operands, first/last/embedding layers at 8 bits, plus the weight-split rules."""
    from ..quant.surgery import LayerQuant, QuantSpec, default_rules

    abits = setting.abits if setting.act_quantized else None
    default = LayerQuant(w_bits=setting.wbits, w_format="int", w_granularity="channel", w_symmetric=False,
                         w_init=cfg.weight_init, a_bits=abits, a_format="int", a_mode="static" if abits else "none",
                         a_symmetric=False, a_init=cfg.act_init,
                         a_learnable=cfg.act_learn and abits is not None, attn_bits=abits)
    rules = default_rules(cfg.keep_first_last_bits or None) + list(split_rules or [])
    return QuantSpec(default=default, rules=rules)


def quantize(backbone, calib, setting, cfg: QDiffConfig, ctx: MethodContext) -> QuantResult:
    """Q-Diffusion (or an ablation: ``cfg.split``, ``cfg.act_learn``); see the module doc."""
    from ..quant.surgery import calibrate_on, quant_attention, quant_layers, quant_state, quantize_model
    from ..train.recon import distill_model, reconstruct_model, summarize_units

    v = {"split": cfg.split, "act_learn": cfg.act_learn, "act_init": cfg.act_init}
    device = ctx.device
    t0 = time.time()
    backbone.eval()
    net = backbone.net
    fp_backbone = copy.deepcopy(backbone)
    splits = shortcut_splits(net) if v["split"] else {}
    split_rules = split_weight_rules(net, splits) if splits and cfg.split_weights else []
    # 1. surgery (+ the weight split through group ranges)
    spec = qdiff_spec(setting, cfg, split_rules)
    quantize_model(net, spec, timesteps=calib.timesteps)
    info: dict = {"variant": v, "n_quant_layers": sum(1 for _ in quant_layers(net)),
                  "n_quant_attention": sum(1 for _ in quant_attention(net))}
    if setting.act_quantized:
        info["n_split_layers"] = apply_shortcut_split(net, splits)
    quant_state(net, weight=True, act=False)
    inputs = [calib.x.to(device), calib.t.to(device), calib.labels.to(device)]
    # 2. phase 1: weight-only AdaRound block reconstruction
    rec = reconstruct_model(backbone, fp_backbone, inputs, cfg.recon, root="net", run=ctx.run)
    info.update(summarize_units(rec, "recon"))
    if setting.act_quantized:
        # 3. activation init (weights hardened)
        quant_state(net, weight=True, act=True)  # the quantizers observe (and pass FP values) while calibrating
        calibrate_on(backbone, calib, batches=cfg.calib_batches, seed=cfg.seed, device=device,
                     mse_samples=cfg.act_mse_samples)
        # 4. phase 2: learn the activation steps block by block
        if v["act_learn"] and cfg.act_recon.iters > 0:
            res = distill_model(backbone, fp_backbone, inputs, cfg.act_recon, root="net", run=ctx.run,
                                act_quant=True, prefix="qdiff_act")
            info.update(summarize_units(res, "act_recon"))
    del fp_backbone
    quant_state(net, weight=True, act=setting.act_quantized)
    backbone.eval()
    info["method_inner_seconds"] = time.time() - t0
    return QuantResult(backbone, spec, info)


def check_setting(setting, cfg: QDiffConfig) -> None:
    """Refuse a setting the integer quantizers cannot run, before any compute."""
    qdiff_spec(setting, cfg)


def _table(backbone: str) -> Table:
    return Table(
        title=f"Q-Diffusion PTQ baseline ({'DiT' if backbone == 'dit' else 'UNet'})", backbone=backbone,
        baselines=("naive/naive", "peers/quanto", "peers/torchao", "dilatequant/dilatequant"),
        columns=("fid_ratio", "psnr", "ssim", "accuracy", "model_mb", "method_seconds"),
        note="qdiff = AdaRound block reconstruction (weights) + learned static activation steps (second pass) + "
             "shortcut splitting of the up-block skip concatenations (separate activation and weight ranges for "
             "the hidden and skip channels); qdiff_no_split = the same without the split; brecq_w = AdaRound "
             "weights with min-max activations. naive = min-max round-to-nearest; peers = optimum-quanto / torchao; "
             "dilatequant = a QAT-style method for reference. Short reconstruction schedules (qdiff.recon.iters, "
             "qdiff.act_recon.iters; paper: 20000 / 5000). Deviations from the official code: the weight split is "
             "realised as one weight range per (output channel, part) through group ranges; phase 2 learns the "
             "activation zero points with the steps, on the plain block MSE (official: steps only, L_2.4).",
        claims=(
            Claim("qdiff/qdiff", "naive/naive", "Q-Diffusion (arXiv 2302.04304) Tables 1-2: far better than "
                  "round-to-nearest PTQ at W4A8", settings=("W4A8",)),
            Claim("qdiff/qdiff", "qdiff/qdiff_no_split", "Q-Diffusion Fig. / ablation: shortcut splitting helps "
                  "at 4-bit weights", settings=("W4A8",)),
        ))


register_family(Family(
    name="qdiff", config_cls=QDiffConfig, quantize=quantize, check_setting=check_setting,
    backbones=("unet", "dit"),
    description="Q-Diffusion (arXiv 2302.04304): BRECQ AdaRound reconstruction + learned activation steps + "
                "shortcut splitting",
    variants=tuple(Variant(n, _DESCRIPTIONS[n], sw) for n, sw in VARIANTS.items()),
    tables=(_table("unet"),),
))
