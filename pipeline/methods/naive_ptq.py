"""Naive PTQ: round-to-nearest with min-max ranges — the baseline every method is compared with.

What it quantizes: every ``nn.Linear`` / ``nn.Conv2d`` of the backbone to W<b> integer weights with one
asymmetric min-max range per output channel, their input activations to A<b> integers with one
asymmetric min-max range per tensor (static, from the calibration set), and — so that "A<b>" means the
same thing as in the methods it is compared with — the attention matmul operands (Q, K, softmax
probabilities, V) with the same per-tensor static quantizers.

Choices where the task is silent (ours):
- input / output layers and the embedding paths (timestep, class, patch) stay at
  ``keep_first_last_bits`` (8 by default), as in Q-Diffusion / EfficientDM research code;
- activation ranges come from ``calib_batches`` batches of the shared calibration file (all selected
  timesteps mixed), min-max over everything seen; no timestep-specific ranges (that is what the
  stronger methods add).
"""
from __future__ import annotations


from dataclasses import dataclass

from ..config import WEIGHT_BITS, ConfigError, choice
from . import Family, MethodContext, QuantResult, Variant, register_family


@dataclass
class NaivePTQConfig:
    """Options of the naive PTQ baseline (params section ``naive``).

    weight_init / act_init: range init (min-max, or the MSE search of the core).
    keep_first_last_bits: bits of the input/output/embedding layers (0 = keep them FP).
    calib_batches: batches of 64 calibration inputs used for the activation ranges.
    seed: which calibration batches are drawn (the method seed of the family offsets it).
    """

    weight_init: str = choice("minmax", "mse", default="minmax")
    act_init: str = choice("minmax", "mse", default="minmax")
    keep_first_last_bits: int = 8
    calib_batches: int = 4
    seed: int = 0

    def validate(self, p: str) -> None:
        if self.keep_first_last_bits not in (0, *WEIGHT_BITS):
            raise ConfigError(f"{p}.keep_first_last_bits: must be 0 (FP) or one of {list(WEIGHT_BITS)}, "
                              f"got {self.keep_first_last_bits}")
        if self.calib_batches < 1:
            raise ConfigError(f"{p}.calib_batches: must be >= 1, got {self.calib_batches}")


def naive_spec(setting, cfg: NaivePTQConfig):
    from ..quant.surgery import LayerQuant, QuantSpec, default_rules

    abits = setting.abits if setting.act_quantized else None
    default = LayerQuant(
        w_bits=setting.wbits, w_format="int", w_granularity="channel", w_symmetric=False,
        w_init=cfg.weight_init, a_bits=abits, a_format="int", a_mode="static" if abits else "none",
        a_symmetric=False, a_init=cfg.act_init, attn_bits=abits,
    )
    keep = cfg.keep_first_last_bits or None
    return QuantSpec(default=default, rules=default_rules(keep))


def quantize(backbone, calib, setting, cfg: NaivePTQConfig, ctx: MethodContext) -> QuantResult:
    """Min-max round-to-nearest PTQ."""
    from ..quant.surgery import calibrate_on, quantize_model, quant_state

    spec = naive_spec(setting, cfg)
    layers = quantize_model(backbone.net, spec, timesteps=calib.timesteps)
    if setting.act_quantized:
        calibrate_on(backbone, calib, batches=cfg.calib_batches, seed=cfg.seed, device=ctx.device)
    quant_state(backbone.net, weight=True, act=setting.act_quantized)
    return QuantResult(backbone, spec, {"n_quant_layers": sum(1 for v in layers.values() if v is not None)})


register_family(Family(
    name="naive", config_cls=NaivePTQConfig, quantize=quantize,
    description="round-to-nearest min-max PTQ (W per output channel, A per tensor, static)",
    variants=(Variant("naive", "round-to-nearest min-max PTQ (W per channel, A per tensor)"),),
    backbones=("unet", "dit", "pixart"),
))
