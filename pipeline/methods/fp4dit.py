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
2. Exclusions [CODE ``quant_model.py``: ``quant_module_refactor`` skips children named pos_embed,
   time_extra_emb, text_embedder, norm_out, proj_out]: one list (``exclude``) for every row of the family.
   Only the patch embedding (``pos_embed``), the final layer (``proj_out*``, ``norm_out``) and the
   Hunyuan-DiT embedders stay FP; everything else is quantized, including the adaLN modulation linears
   (``*norm1.linear``), the diffusers DiT's per-block timestep embedder and, on PixArt, ``adaln_single``
   and ``caption_projection`` (not in the official skip list). Tiny default DiT: 2.4 % of the linear/conv
   weights stay FP (44.2 % with the former list that kept ``*emb*`` and ``*norm1.linear``;
   :func:`fp_kept_share`).
3. Scale-aware FP AdaRound [CODE ``adaptive_rounding.py``], reconstructed block by block over the DiT's
   transformer blocks and layer by layer elsewhere (:mod:`pipeline.train.recon`): loss = block-output
   MSE + λ·Σ(1 − |2h − 1|^β), λ = 0.01, β 20 → 2 after a 20 % warm-up, Adam on the rounding logits only,
   inputs from the quantized-so-far model, targets from the FP model, hard rounding at the end.
   The official schedule is ``recon.iters: 2500`` (batch 16); the default here is short (CPU budget).
4. Online activation quantization [CODE ``online_per_tensor_quant``]: every quantized linear's input
   is FP-quantized per token with α = the token's absmax at run time (A4 = E2M1, A6 = E2M3, A8 = E3M4), no
   activation calibration. Attention: Q, K before Q·Kᵀ and P, V before P·V with their own per-token
   quantizers. P (post-softmax) at ``softmax_bits`` = 16 (official ``--sm_abit 16``), unsigned as the
   official code makes it (``sign_bits = 0``, mantissa unchanged): the activation's mantissa M and
   E = 16 − M (E13M3 at A6, E12M4 at A8, E15M1 at A4) — not lossless: P keeps the activations' relative
   precision with an unbounded range. ``softmax_bits: null`` = the activation width (E + 1, M).
   INT cells: P unsigned INT when ``softmax_bits`` <= 8, else FP (INT16 on [0, 1] is within 1.5e-5 of the
   row max; the core's INT widths stop at 8).

Calibration data (differs from the official code): the reconstruction uses the project's shared
calibration file — the FP model's own inputs (x_t, t, label) recorded along its DDIM sampling
trajectories (Q-Diffusion style). FP4DiT's released scripts instead forward-noise 128 real COCO
latents at 20 timesteps (apparently the 20 least noisy training timesteps, ``range(20)``) with their
captions. Ours covers the timesteps the sampler actually visits and needs no real data.

Variants: the crossed design at equal bits, group size and FP-kept layers, named
``<grid>_<act>_<rounding>``: grid ``fp`` (E2M1 + E3M0 FFN-1) | ``int-asym`` | ``int-sym`` (INT min-max per
group), act ``tok`` (online per-token) | ``static`` (per-tensor, calibrated by absmax on the calibration
set), rounding ``ada`` (block AdaRound; plain AdaRound on INT grids) | ``nearest``. Activations use the
grid's number format (FP ExMy, or symmetric INT for both INT grids, so the INT cells differ in the weights
only). The paper's cell ``fp_tok_ada`` is the method row ``fp4dit``. Also ``fp4dit_ffn_e2m1`` (E2M1 in
FFN-1) and the pre-cross names as aliases (``fp4dit_no_adaround`` = fp_tok_nearest, ``fp4dit_static_act``
= fp_static_ada, ``int_adaround`` = int-asym_tok_ada, ``int_no_adaround`` = int-asym_tok_nearest).
"""
from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field
from typing import Optional


from pipeline.models import attach_caption_embeddings  # noqa: F401  (re-exported)

from ..config import ConfigError, choice, layer_patterns
from ..train.configs import ReconConfig
from . import Claim, Family, MethodContext, QuantResult, Table, Variant, register_family

_FORMAT_RE = re.compile(r"^E(\d+)M(\d+)$")

# The one exclusion list of every row of the family: what the official code keeps in FP
# (``QuantModel.quant_module_refactor`` skips children named pos_embed, time_extra_emb, text_embedder,
# norm_out, proj_out) [CODE]. Everything inside the transformer blocks is quantized, including the adaLN
# modulation linears (diffusers DiT ``*norm1.linear``) and the per-block timestep embedder of the diffusers
# DiT (``*norm1.emb.timestep_embedder.*``; official PixArt: ``adaln_single`` and ``caption_projection`` are
# not in the skip list, so they are quantized too).
DEFAULT_EXCLUDE = [
    "pos_embed.*",  # patch embedding
    "time_extra_emb.*",  # Hunyuan-DiT timestep / size / style embedding (official name; absent in DiT/PixArt)
    "text_embedder.*",  # Hunyuan-DiT caption projection (official name; absent in DiT/PixArt)
    "norm_out*",  # final norm (PixArt has no linear there; DiT has none)
    "proj_out*",  # final layer (DiT proj_out_1 / proj_out_2, PixArt proj_out)
]
# the exclusion list used before the fidelity review (kept for the FP-share comparison and tests)
LEGACY_EXCLUDE = ["pos_embed.*", "*emb*", "adaln_single.*", "*norm1.linear", "caption_projection.*",
                  "proj_out*", "norm_out*"]


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
    ``act_format`` (null = A4 -> E2M1, A6 -> E2M3, A8 -> E3M4, other widths the core's default split),
    ``softmax_bits``: width of the post-softmax probabilities P (official ``--sm_abit 16``; null = the
    setting's activation bits); on the FP grid P is unsigned with the activation's mantissa and the rest of
    the width in the exponent (official ``sign_bits = 0``), on the INT grid unsigned INT when it fits 8 bits,
    else FP. ``group_size``: weights per clipping value (every cell of the cross). ``exclude``: module-name
    patterns kept in FP, one list for every row. ``recon``: the block reconstruction
    (:class:`pipeline.train.configs.ReconConfig`; the paper's setting is ``recon.iters: 2500``,
    ``recon.batch_size: 16``; ``recon.max_inputs`` caps the calibration inputs used, null = all;
    ``recon.seed`` the batch order). ``static_act_init``: absmax ("minmax") or MSE for the static cells.

    The cell of the cross (what a variant sets, :data:`CROSS_VARIANTS`): ``grid`` (weight grid: "fp" =
    FP4DiT's ExMy formats, "int" = integer), ``w_symmetric`` (INT weights symmetric), ``act_mode`` ("token" =
    online per-token activations, "static" = calibrated per-tensor), ``adaround`` (block AdaRound, else round
    to nearest), ``ffn1`` (the FFN-1 format rule, FP grid only).
    """

    weight_format: str = "E2M1"
    ffn1_format: str = "E3M0"
    ffn1_pattern: str = "*ff.net.0.proj"
    weight_format_rules: dict[str, str] = field(default_factory=dict)
    act_format: Optional[str] = None
    softmax_bits: Optional[int] = 16
    group_size: int = 128
    exclude: list[str] = layer_patterns(DEFAULT_EXCLUDE)
    recon: ReconConfig = field(default_factory=lambda: ReconConfig(iters=80, batch_size=16))
    static_act_init: str = "minmax"
    grid: str = choice("fp", "int", default="fp")
    w_symmetric: bool = False
    act_mode: str = choice("token", "static", default="token")
    adaround: bool = True
    ffn1: bool = True

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


# the crossed design: weight grid x activations x rounding, same bits / group size / exclusions everywhere
CROSS_GRIDS = {"fp": {"grid": "fp"}, "int-asym": {"grid": "int", "w_symmetric": False},
               "int-sym": {"grid": "int", "w_symmetric": True}}
CROSS_ACTS = {"tok": {"act_mode": "token"}, "static": {"act_mode": "static"}}
CROSS_ROUNDINGS = {"ada": {"adaround": True}, "nearest": {"adaround": False}}
_GRID_TEXT = {"fp": "FP weights (E2M1, E3M0 FFN-1)", "int-asym": "INT asymmetric weights",
              "int-sym": "INT symmetric weights"}
_ACT_TEXT = {"tok": "online per-token activations", "static": "static per-tensor activations"}
_ROUND_TEXT = {"ada": "AdaRound", "nearest": "round to nearest"}


def cross_name(grid: str, act: str, rounding: str) -> str:
    """Variant name of a cell of the cross; the paper's cell (fp, tok, ada) is the method row ``fp4dit``."""
    return "fp4dit" if (grid, act, rounding) == ("fp", "tok", "ada") else f"{grid}_{act}_{rounding}"


def _cross_variants() -> list:
    out = []
    for g, gs in CROSS_GRIDS.items():
        for a, as_ in CROSS_ACTS.items():
            for r, rs in CROSS_ROUNDINGS.items():
                name = cross_name(g, a, r)
                desc = f"{_GRID_TEXT[g]}, {_ACT_TEXT[a]}, {_ROUND_TEXT[r]} (same group size and exclusions)"
                if name == "fp4dit":
                    desc = "FP4DiT (cell fp_tok_ada): " + desc
                out.append(Variant(name, desc, {**gs, **as_, **rs}))
    return out


CROSS_VARIANTS = tuple(_cross_variants())
CROSS_NAMES = tuple(v.name for v in CROSS_VARIANTS)
# names used before the cross (same overrides; kept so existing experiment commands keep working)
LEGACY_ALIASES = {"fp4dit_no_adaround": "fp_tok_nearest", "fp4dit_static_act": "fp_static_ada",
                  "int_adaround": "int-asym_tok_ada", "int_no_adaround": "int-asym_tok_nearest"}


def format_at_width(text: str, bits: int, key: str) -> Optional[tuple[int, int]]:
    """(E, M) of format ``text`` when it is a signed ``bits``-bit format (1 + E + M == bits), else None:
    a format is a choice for its own width; at other widths (bit sweeps) the core's default split
    applies (``pipeline.quant.primitives.FP_WEIGHT_FORMATS`` / ``FP_ACT_FORMATS``)."""
    e, m = parse_format(text, key)
    return (e, m) if 1 + e + m == bits else None


def act_split(setting, cfg: FP4DiTConfig) -> tuple[int, int]:
    """Activation ExMy split: ``act_format`` when it has the setting's width, else the core's table
    (``pipeline.quant.primitives.FP_ACT_FORMATS``: FP4DiT's A6 E2M3 and A8 E3M4, E2M1 at A4, our split
    elsewhere)."""
    from ..quant.primitives import FP_ACT_FORMATS

    if cfg.act_format is not None:
        chosen = format_at_width(cfg.act_format, setting.abits, "act_format")
        if chosen is not None:
            return chosen
    if setting.abits not in FP_ACT_FORMATS:
        raise ValueError(f"setting {setting.name}: no FP activation format for {setting.abits} bits "
                         f"(supported widths: {sorted(FP_ACT_FORMATS)})")
    return FP_ACT_FORMATS[setting.abits]


def softmax_split(p_bits: int, act_man_bits: int) -> tuple[int, int]:
    """Unsigned (E, M) of P as the official code forms it: the activation quantizer's mantissa, sign bit 0,
    E = width − M (``quantize_to_fp8_ste_MM`` with ``sign_bits = 0``; at ``--sm_abit 16`` and A6 that is
    E13M3, at A8 E12M4, at A4 E15M1)."""
    e = p_bits - act_man_bits
    if e < 1:
        raise ValueError(f"softmax_bits {p_bits}: an unsigned FP P with the activation's {act_man_bits} "
                         "mantissa bits needs at least one exponent bit")
    return e, act_man_bits


def fp4dit_spec(setting, cfg: FP4DiTConfig):
    """The :class:`pipeline.quant.surgery.QuantSpec` of FP4DiT (or the cell of the cross ``cfg`` sets) at
    ``setting``.
    Every cell: group-``group_size`` weights, the same exclusions, activations and Q/K/V at the setting's
    bits in the grid's number format (FP ExMy or symmetric INT), P at ``softmax_bits`` (see
    :class:`FP4DiTConfig`)."""
    from ..quant.primitives import FP_WEIGHT_FORMATS, INT_BITS
    from ..quant.surgery import LayerQuant, QuantSpec

    act = setting.act_quantized
    a_fp = dict(a_format="fp", a_exp_bits=None, a_man_bits=None)
    if act and cfg.grid == "fp":
        e, m = act_split(setting, cfg)
        a_fp.update(a_exp_bits=e, a_man_bits=m)
    a_mode = cfg.act_mode if act else "none"
    a_init = cfg.static_act_init if act and cfg.act_mode == "static" else "minmax"
    common = dict(w_bits=setting.wbits, w_granularity="group", group_size=cfg.group_size,
                  a_bits=setting.abits if act else None, a_mode=a_mode,
                  attn_bits=setting.abits if act else None, a_init=a_init)
    p_bits = setting.abits if cfg.softmax_bits is None else cfg.softmax_bits
    if act and cfg.grid == "int":
        if p_bits > max(INT_BITS):
            common["attn_p_format"] = "none"  # INT16 P on [0, 1]: step <= 1.5e-5 of the row max, kept FP
        elif p_bits != setting.abits:
            common["attn_p_bits"] = p_bits
    elif act:
        pe, pm = softmax_split(p_bits, a_fp["a_man_bits"])
        common.update(attn_p_bits=p_bits, attn_p_exp_bits=pe, attn_p_man_bits=pm)
    rules: list = []
    if cfg.grid == "fp":
        if setting.wbits not in FP_WEIGHT_FORMATS:
            raise ValueError(f"setting {setting.name}: FP weights need {min(FP_WEIGHT_FORMATS)}..."
                             f"{max(FP_WEIGHT_FORMATS)} bits, got {setting.wbits}")
        we, wm = (format_at_width(cfg.weight_format, setting.wbits, "weight_format")
                  or FP_WEIGHT_FORMATS[setting.wbits])
        default = LayerQuant(w_format="fp", w_exp_bits=we, w_man_bits=wm, w_init="minmax", **common, **a_fp)
        overrides = [(cfg.ffn1_pattern, cfg.ffn1_format, "ffn1_format")] if cfg.ffn1 else []
        overrides += [(pat, fmt, f"weight_format_rules.{pat}") for pat, fmt in cfg.weight_format_rules.items()]
        for pat, fmt, key in overrides:
            chosen = format_at_width(fmt, setting.wbits, key)
            if chosen is not None:
                rules.append((pat, {"w_exp_bits": chosen[0], "w_man_bits": chosen[1]}))
    else:
        default = LayerQuant(w_format="int", w_symmetric=cfg.w_symmetric, w_init="minmax",
                             a_format="int", a_symmetric=True, **common)
    rules += [(pat, {"skip": True}) for pat in cfg.exclude]
    return QuantSpec(default=default, rules=rules)


def fp_kept_share(net, spec) -> dict:
    """How much of ``net``'s nn.Linear / nn.Conv2d weight ``spec`` keeps in FP: {"kept": n, "total": n,
    "share": kept / total, "layers": [names kept FP]} (resolved by name, nothing changed)."""
    from ..quant.surgery import quantizable_layers, resolve_model

    resolved = resolve_model(net, spec)
    kept, total, names = 0, 0, []
    for name, mod in quantizable_layers(net):
        n = mod.weight.numel()
        total += n
        lq = resolved.get(name)
        if lq is None or not lq.quantizes_weight:
            kept += n
            names.append(name)
    return {"kept": kept, "total": total, "share": kept / max(1, total), "layers": names}


def _calibration_inputs(calib, device, cfg: FP4DiTConfig):
    return [calib.x.to(device), calib.t.to(device), calib.labels.to(device)]


def quantize(backbone, calib, setting, cfg: FP4DiTConfig, ctx: MethodContext) -> QuantResult:
    """FP4DiT (or another cell of the cross: ``cfg.grid``, ``cfg.act_mode``, ``cfg.adaround``, ...)."""
    from ..quant.surgery import calibrate_on, quant_attention, quant_layers, quant_state, quantize_model
    from ..train.recon import reconstruct_model, summarize_units

    if backbone.kind not in ("dit", "pixart"):
        raise ValueError(f"backbone.kind: FP4DiT quantizes transformer backbones ('dit', 'pixart'), "
                         f"got {backbone.kind!r}")
    t0 = time.time()
    device = ctx.device
    backbone.eval()
    fp_backbone = copy.deepcopy(backbone) if cfg.adaround else None

    # 1-2. spec: FP (or INT) group weights, E3M0 FFN-1, online per-token activations, exclusions
    spec = fp4dit_spec(setting, cfg)
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
    if cfg.adaround:
        rec = reconstruct_model(backbone, fp_backbone, inputs, cfg.recon, root="net", run=ctx.run)
        info.update(summarize_units(rec, "recon"))
        del fp_backbone

    # 4. activations: online per-token quantizers need nothing; the static variant calibrates here
    if setting.act_quantized and cfg.act_mode == "static":
        quant_state(backbone.net, weight=True, act=True)  # quantizers observe (and pass FP values) while calibrating
        calibrate_on(backbone, calib, batches=None, device=device, batch_size=128)  # every input, in file order
    quant_state(backbone.net, weight=True, act=setting.act_quantized)
    backbone.eval()
    info["calibration_seconds"] = time.time() - t0
    return QuantResult(backbone, spec, info)


def check_setting(setting, cfg: FP4DiTConfig) -> None:
    """Refuse (ValueError) a bit setting this variant has no format for, before any compute."""
    fp4dit_spec(setting, cfg)


def _cross_table(act: str, title: str, claims: tuple = (), backbone: str = "dit") -> Table:
    cells = tuple(cross_name(g, act, r) for g in CROSS_GRIDS for r in CROSS_ROUNDINGS)
    return Table(
        title=title, backbone=backbone, baselines=("naive/naive",), variants=cells, claims=claims,
        columns=("fid_ratio", "accuracy", "clip_score", "bitops_g", "model_mb", "method_seconds"),
        note="Cells of the cross at equal bits: weight grid (fp = E2M1 + E3M0 FFN-1, int-asym / int-sym = "
             "INT min-max per group) x rounding (ada = block AdaRound, nearest); activations and Q/K/V in the "
             "grid's number format (FP ExMy / symmetric INT) at the setting's bits, P at fp4dit.softmax_bits; "
             "same group size and FP-kept layers in every cell. fp4dit = the cell fp_tok_ada. naive = min-max "
             "INT PTQ (per-channel W, static per-tensor A). Cells missing from the run: select them with "
             "dvc exp run -S 'fp4dit.variants=[...]'.")


_CLAIMS = (
    Claim("fp4dit/fp4dit", "fp4dit/int-asym_tok_ada", "FP4DiT: FP weights beat INT weights at equal bits "
          "(same pipeline, asymmetric INT twin)"),
    Claim("fp4dit/fp4dit", "fp4dit/int-sym_tok_ada", "FP4DiT: FP weights beat INT weights (symmetric INT twin)"),
    Claim("fp4dit/fp4dit", "fp4dit/fp_tok_nearest", "FP4DiT: scale-aware AdaRound improves on round-to-nearest"),
    Claim("fp4dit/fp4dit", "naive/naive", "FP4DiT: far better than min-max INT PTQ"),
)

register_family(Family(
    name="fp4dit", config_cls=FP4DiTConfig, quantize=quantize, check_setting=check_setting,
    backbones=("dit", "pixart"),
    description="FP4DiT (arXiv 2503.15465) and the grid x activations x rounding cross through the same pipeline",
    variants=CROSS_VARIANTS + (
        Variant("fp4dit_ffn_e2m1", "FP4DiT with E2M1 in the first FFN linear instead of E3M0", {"ffn1": False}),
    ) + tuple(Variant(old, f"alias of {new} (name before the cross)", dict(next(
        v.overrides for v in CROSS_VARIANTS if v.name == new))) for old, new in LEGACY_ALIASES.items()),
    tables=tuple(t for b, name in (("dit", "DiT"), ("pixart", "PixArt, text-conditioned")) for t in (
        _cross_table("tok", f"FP4DiT cross, online per-token activations ({name})", claims=_CLAIMS, backbone=b),
        _cross_table("static", f"FP4DiT cross, static per-tensor activations ({name})", backbone=b))),
))
