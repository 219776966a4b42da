"""FP4DiT: floating-point post-training quantization for diffusion transformers (W4A6 / W4A8).

Paper: Chen, Mills, Niu, "FP4DiT: Towards Effective Floating Point Quantization for Diffusion
Transformers", arXiv 2503.15465 (TMLR 2025); official code ``cccrrrccc/FP4DiT`` (Q-Diffusion based).
What it quantizes: weights to 4-bit floating point (ExMy), activations to 6/8-bit floating point
computed online per token, attention matmul operands included (github.com/cccrrrccc/FP4DiT).

Algorithm (top to bottom, as :func:`quantize` runs it):

1. FP weight grid per group of ``group_size`` = 128 consecutive weights of each output row, clipping
   value α = absmax of the group (official code: ``weight_group_size=128``, no MSE search) [CODE].
   Format E2M1 by default, E3M0 for the first linear of each feed-forward block (diffusers
   ``*ff.net.0.proj``, GELU inside: more levels near 0) [CODE]; E1M2 is the PixArt-Σ setting
   (``weight_format: E1M2``). Each format is a parameter, with extra per-pattern formats
   (``weight_format_rules``, official ``--attn_weight_mantissa``). A layer whose input dim is smaller
   than the group size has one group per row (the core zero-pads the short group; 0 is on every grid,
   so this equals per-row absmax). A format is the choice for its own width: in bit sweeps, a setting
   whose weight width differs from a format's width uses the core's default ExMy split for that width
   (``pipeline.quant.primitives.FP_WEIGHT_FORMATS``: W3 E1M1, W5 E2M2, W6 E2M3, W8 E4M3) and per-pattern formats of another width
   are not applied (ours; the paper only runs W4).
2. Exclusions [CODE ``quant_model.py``, adapted to diffusers names]: patch embedding (``pos_embed``),
   timestep / class / caption embeddings (``*emb*``, ``adaln_single``, ``caption_projection``), the
   per-block adaLN modulation of the diffusers DiT (``*norm1.linear``: the projection of the timestep +
   class embedding, i.e. the conditioning path; PixArt's equivalent is the global ``adaln_single``), and
   the final layer (``proj_out*``, ``norm_out``) stay FP. The list is the ``exclude`` parameter.
3. Scale-aware FP AdaRound [CODE ``adaptive_rounding.py``], reconstructed block by block over the DiT's
   transformer blocks and layer by layer elsewhere (:mod:`pipeline.train.recon`): loss = block-output
   MSE + λ·Σ(1 − |2h − 1|^β), λ = 0.01, β 20 → 2 after a 20 % warm-up, Adam on the rounding logits only,
   inputs from the quantized-so-far model, targets from the FP model, hard rounding at the end.
   The official schedule is ``recon.iters: 2500`` (batch 16); the default here is short (CPU budget).
4. Online activation quantization [CODE ``online_per_tensor_quant``]: every quantized linear's input
   is FP-quantized per token with α = the token's absmax at run time (A6 = E2M3, A8 = E3M4), no
   activation calibration. Attention: Q, K before Q·Kᵀ and P, V before P·V with their own per-token
   quantizers; P (post-softmax) unsigned, the sign bit going to the mantissa. ``softmax_bits`` sets P's
   width (null = the setting's activation bits, so "A6" means every activation operand is 6-bit as for
   the other methods of this project; the official default ``--sm_abit 16`` is ``softmax_bits: 16``).

Calibration data (differs from the official code): the reconstruction uses the project's shared
calibration file — the FP model's own inputs (x_t, t, label) recorded along its DDIM sampling
trajectories (Q-Diffusion style). FP4DiT's released scripts instead forward-noise 128 real COCO
latents at 20 timesteps (apparently the 20 least noisy training timesteps, ``range(20)``) with their
captions. Ours covers the timesteps the sampler actually visits and needs no real data.

Ablation variants (registered names, one row each in the results):
``fp4dit`` (everything), ``fp4dit_no_adaround`` (round to nearest on the FP grid),
``fp4dit_static_act`` (static per-tensor FP activations calibrated by absmax on the calibration set
instead of online per-token ones), ``fp4dit_ffn_e2m1`` (E2M1 also in the first FFN linear), and the
INT baselines on the same pipeline: ``int_adaround`` (INT weights, same group size, asymmetric min-max
per group, plain AdaRound with the same reconstruction; INT per-token activations, symmetric absmax;
unsigned INT for P) and ``int_no_adaround`` (the same INT grid with round to nearest), so that the
difference to ``fp4dit`` / ``fp4dit_no_adaround`` is the grid alone.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import time
from dataclasses import dataclass, field
from typing import Optional


from pipeline.models import attach_caption_embeddings  # noqa: F401  (re-exported)

from ..config import ConfigError
from ..train.configs import ReconConfig
from . import Family, MethodContext, QuantResult, Table, Variant, register_family

_FORMAT_RE = re.compile(r"^E(\d+)M(\d+)$")

DEFAULT_EXCLUDE = [
    "pos_embed.*",  # patch embedding
    "*emb*",  # timestep / class / caption / size embedders (DiT norm1.emb.*, PixArt adaln_single.emb.*)
    "adaln_single.*",  # PixArt: global timestep conditioning (adaLN-single)
    "*norm1.linear",  # DiT: per-block adaLN modulation of the timestep + class embedding
    "caption_projection.*",  # PixArt: caption projection (FP4DiT's text_embedder)
    "proj_out*",  # final layer (DiT proj_out_1 / proj_out_2, PixArt proj_out)
    "norm_out*",
]


def parse_format(text: str, key: str) -> tuple[int, int]:
    """'E2M1' -> (2, 1); errors name ``key``."""
    m = _FORMAT_RE.match(str(text).strip().upper()) if isinstance(text, str) else None
    if not m:
        raise ConfigError(f"{key}: {text!r} is not an FP format; write it as E<exp bits>M<mantissa bits>, "
                          "e.g. 'E2M1'")
    e, mbits = int(m.group(1)), int(m.group(2))
    if e < 1:
        raise ConfigError(f"{key}: {text!r} needs at least one exponent bit (E0 is an integer grid)")
    return e, mbits


@dataclass
class FP4DiTConfig:
    """Options of FP4DiT and its variants (params section ``fp4dit``).

    Formats: ``weight_format`` (default layers), ``ffn1_format`` for ``ffn1_pattern`` (first FFN linear),
    ``weight_format_rules`` (more ``pattern: format`` pairs, applied after the FFN-1 rule),
    ``act_format`` (null = A6 -> E2M3, A8 -> E3M4, other widths the core's default split),
    ``softmax_bits`` (null = the setting's activation bits). ``group_size``: weights per clipping value.
    ``exclude``: module-name patterns kept in FP. ``recon``: the block reconstruction
    (:class:`pipeline.train.configs.ReconConfig`; the paper's setting is ``recon.iters: 2500``,
    ``recon.batch_size: 16``; ``recon.max_inputs`` caps the calibration inputs used, null = all;
    ``recon.seed`` the batch order).
    ``int_weight_symmetric``: symmetric INT weights for the INT variants (default asymmetric min-max).
    ``static_act_init``: absmax ("minmax") or MSE for the static-activation variant.
    """

    weight_format: str = "E2M1"
    ffn1_format: str = "E3M0"
    ffn1_pattern: str = "*ff.net.0.proj"
    weight_format_rules: dict[str, str] = field(default_factory=dict)
    act_format: Optional[str] = None
    softmax_bits: Optional[int] = None
    group_size: int = 128
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    recon: ReconConfig = field(default_factory=lambda: ReconConfig(iters=80, batch_size=16))
    int_weight_symmetric: bool = False
    static_act_init: str = "minmax"

    def validate(self, p: str) -> None:
        parse_format(self.weight_format, f"{p}.weight_format")
        parse_format(self.ffn1_format, f"{p}.ffn1_format")
        for pat, fmt in self.weight_format_rules.items():
            parse_format(fmt, f"{p}.weight_format_rules.{pat}")
        if self.act_format is not None:
            parse_format(self.act_format, f"{p}.act_format")
        from ..quant.act import FP_ACT_BITS

        if self.softmax_bits is not None and self.softmax_bits not in FP_ACT_BITS:
            raise ConfigError(f"{p}.softmax_bits: must be null or in {FP_ACT_BITS[0]}..{FP_ACT_BITS[-1]}, "
                              f"got {self.softmax_bits}")
        if self.group_size < 1:
            raise ConfigError(f"{p}.group_size: must be a positive int, got {self.group_size}")
        if self.static_act_init not in ("minmax", "mse"):
            raise ConfigError(f"{p}.static_act_init: {self.static_act_init!r} is not allowed "
                              "(allowed values: minmax, mse)")
        for i, pat in enumerate(self.exclude):
            if not pat:
                raise ConfigError(f"{p}.exclude[{i}]: empty pattern")


# fixed switches of the registered variants
VARIANT_DEFAULTS = {"grid": "fp", "adaround": True, "act_mode": "token", "ffn1": True}


def format_at_width(text: str, bits: int, key: str) -> Optional[tuple[int, int]]:
    """(E, M) of format ``text`` when it is a signed ``bits``-bit format (1 + E + M == bits), else None:
    a format is a choice for its own width; at other widths (bit sweeps) the core's default split
    applies (``pipeline.quant.primitives.FP_WEIGHT_FORMATS`` / ``FP_ACT_FORMATS``)."""
    e, m = parse_format(text, key)
    return (e, m) if 1 + e + m == bits else None


def act_split(setting, cfg: FP4DiTConfig) -> tuple[int, int]:
    """Activation ExMy split: ``act_format`` when it has the setting's width, else the core's table
    (``pipeline.quant.primitives.FP_ACT_FORMATS``: FP4DiT's A6 E2M3 and A8 E3M4, our split elsewhere)."""
    from ..quant.primitives import FP_ACT_FORMATS

    if cfg.act_format is not None:
        chosen = format_at_width(cfg.act_format, setting.abits, "act_format")
        if chosen is not None:
            return chosen
    if setting.abits not in FP_ACT_FORMATS:
        raise ValueError(f"setting {setting.name}: no FP activation format for {setting.abits} bits "
                         f"(supported widths: {sorted(FP_ACT_FORMATS)})")
    return FP_ACT_FORMATS[setting.abits]


def fp4dit_spec(setting, cfg: FP4DiTConfig, variant: Optional[dict] = None):
    """The :class:`pipeline.quant.surgery.QuantSpec` of FP4DiT (or a variant) at ``setting``. P (post-softmax)
    at ``softmax_bits`` is a spec field (``attn_p_bits``; unsigned, its own split: the core's table for widths
    up to 8, E5 beyond); an INT grid wider than the integer range keeps P in FP (``attn_p_format: none``)."""
    from ..quant.primitives import FP_WEIGHT_FORMATS, INT_BITS
    from ..quant.surgery import LayerQuant, QuantSpec

    v = {**VARIANT_DEFAULTS, **(variant or {})}
    act = setting.act_quantized
    a_fp = dict(a_format="fp", a_exp_bits=None, a_man_bits=None)
    if act and v["grid"] == "fp":
        e, m = act_split(setting, cfg)
        a_fp.update(a_exp_bits=e, a_man_bits=m)
    a_mode = v["act_mode"] if act else "none"
    common = dict(w_bits=setting.wbits, w_granularity="group", group_size=cfg.group_size,
                  a_bits=setting.abits if act else None, a_mode=a_mode,
                  attn_bits=setting.abits if act else None, a_init="minmax")
    if act and cfg.softmax_bits is not None and cfg.softmax_bits != setting.abits:
        if v["grid"] == "int" and cfg.softmax_bits > max(INT_BITS):
            common["attn_p_format"] = "none"
        else:
            common["attn_p_bits"] = cfg.softmax_bits
    rules: list = []
    if v["grid"] == "fp":
        if setting.wbits not in FP_WEIGHT_FORMATS:
            raise ValueError(f"setting {setting.name}: FP weights need {min(FP_WEIGHT_FORMATS)}..."
                             f"{max(FP_WEIGHT_FORMATS)} bits, got {setting.wbits}")
        we, wm = (format_at_width(cfg.weight_format, setting.wbits, "weight_format")
                  or FP_WEIGHT_FORMATS[setting.wbits])
        default = LayerQuant(w_format="fp", w_exp_bits=we, w_man_bits=wm, w_init="minmax", **common, **a_fp)
        overrides = [(cfg.ffn1_pattern, cfg.ffn1_format, "ffn1_format")] if v["ffn1"] else []
        overrides += [(pat, fmt, f"weight_format_rules.{pat}") for pat, fmt in cfg.weight_format_rules.items()]
        for pat, fmt, key in overrides:
            chosen = format_at_width(fmt, setting.wbits, key)
            if chosen is not None:
                rules.append((pat, {"w_exp_bits": chosen[0], "w_man_bits": chosen[1]}))
    elif v["grid"] == "int":
        default = LayerQuant(w_format="int", w_symmetric=cfg.int_weight_symmetric, w_init="minmax",
                             a_format="int", a_symmetric=True, **common)
    else:
        raise ValueError(f"variant grid must be 'fp' or 'int', got {v['grid']!r}")
    if v["act_mode"] == "static" and act:
        default = dataclasses.replace(default, a_init=cfg.static_act_init)
    rules += [(pat, {"skip": True}) for pat in cfg.exclude]
    return QuantSpec(default=default, rules=rules)


def _calibration_inputs(calib, device, cfg: FP4DiTConfig):
    return [calib.x.to(device), calib.t.to(device), calib.labels.to(device)]


def quantize(backbone, calib, setting, cfg: FP4DiTConfig, ctx: MethodContext) -> QuantResult:
    """FP4DiT (or one of its ablation / INT variants, from ``ctx.variant``)."""
    from ..quant.surgery import calibrate_activations, quant_attention, quant_layers, quant_state, quantize_model
    from ..train.recon import reconstruct_model

    if backbone.kind not in ("dit", "pixart"):
        raise ValueError(f"backbone.kind: FP4DiT quantizes transformer backbones ('dit', 'pixart'), "
                         f"got {backbone.kind!r}")
    v = {**VARIANT_DEFAULTS, **(ctx.variant or {})}
    t0 = time.time()
    device = ctx.device
    backbone.eval()
    fp_backbone = copy.deepcopy(backbone) if v["adaround"] else None

    # 1-2. spec: FP (or INT) group weights, E3M0 FFN-1, online per-token activations, exclusions
    spec = fp4dit_spec(setting, cfg, v)
    quantize_model(backbone.net, spec, timesteps=calib.timesteps)
    quant_state(backbone.net, weight=True, act=False)
    info: dict = {"n_quant_layers": sum(1 for _ in quant_layers(backbone.net)),
                  "n_quant_attention": sum(1 for _ in quant_attention(backbone.net))}
    formats: dict = {}
    for _, layer in quant_layers(backbone.net):
        q = layer.weight_quantizers[0]
        key = f"E{q.exp_bits}M{q.man_bits}" if hasattr(q, "exp_bits") else f"INT{q.bits}"
        formats[key] = formats.get(key, 0) + 1
    info["weight_formats"] = formats
    inputs = _calibration_inputs(calib, device, cfg)

    # 3. block-wise scale-aware AdaRound (weights only, activations off; official first phase)
    if v["adaround"]:
        rec = reconstruct_model(backbone, fp_backbone, inputs, cfg.recon, root="net", run=ctx.run)
        errs = list(rec["units"].values())
        info.update(recon_seconds=rec["seconds"], recon_units=rec["n_units"], recon_inputs=rec["n_inputs"],
                    recon_error_rtn=sum(e["error_rtn"] for e in errs) / max(1, len(errs)),
                    recon_error=sum(e["error_recon"] for e in errs) / max(1, len(errs)))
        del fp_backbone

    # 4. activations: online per-token quantizers need nothing; the static variant calibrates here
    if setting.act_quantized and v["act_mode"] == "static":
        quant_state(backbone.net, weight=True, act=True)  # quantizers observe (and pass FP values) while calibrating

        def run():
            for i in range(0, inputs[0].shape[0], 128):
                backbone(*(t[i:i + 128] for t in inputs))

        calibrate_activations(backbone.net, run)
    quant_state(backbone.net, weight=True, act=setting.act_quantized)
    backbone.eval()
    info["calibration_seconds"] = time.time() - t0
    return QuantResult(backbone, spec, info)


def check_setting(setting, cfg: FP4DiTConfig, switches: dict) -> None:
    """Refuse (ValueError) a bit setting this variant has no format for, before any compute."""
    fp4dit_spec(setting, cfg, switches)


register_family(Family(
    name="fp4dit", config_cls=FP4DiTConfig, quantize=quantize, check_setting=check_setting,
    backbones=("dit", "pixart"),
    description="FP4DiT (arXiv 2503.15465) and INT twins through the same pipeline",
    variants=(
        Variant("fp4dit", "FP4DiT: FP group-128 weights (E2M1, E3M0 FFN-1), scale-aware FP AdaRound, online "
                          "per-token FP activations"),
        Variant("fp4dit_no_adaround", "FP4DiT without AdaRound (round to nearest on the FP grid)",
                {"adaround": False}),
        Variant("fp4dit_static_act", "FP4DiT with static per-tensor FP activations instead of online per-token "
                                     "ones", {"act_mode": "static"}),
        Variant("fp4dit_ffn_e2m1", "FP4DiT with E2M1 in the first FFN linear instead of E3M0", {"ffn1": False}),
        Variant("int_adaround", "INT group weights + INT per-token activations with the same AdaRound "
                                "reconstruction", {"grid": "int"}),
        Variant("int_no_adaround", "INT group weights + INT per-token activations, round to nearest",
                {"grid": "int", "adaround": False}),
    ),
    tables=(Table(
        title="FP4DiT vs INT at the same bits (DiT)", backbone="dit", baselines=("naive/naive",),
        columns=("fid_ratio", "accuracy", "clip_score", "bitops_g", "model_mb", "method_seconds"),
        note="naive = min-max INT PTQ (per-channel W, static per-tensor A); int_* = FP4DiT's pipeline (group-128 W, "
             "online per-token A) on an INT grid, with/without the same AdaRound; method_seconds = calibration + "
             "reconstruction time."),),
))
