"""Backbone factories (tiny UNet / DiT / PixArt from config) and diffusers-directory save/load.

A :class:`DiffusionBackbone` wraps one diffusers denoiser behind a single call ``forward(x, t, labels)
-> prediction`` so that training, calibration, quantization and evaluation never branch on the model type.
``labels`` index the model's conditions: class labels, or prompts of a text-conditioned model (the text
encoder ran once per prompt when the model was loaded; its outputs form the frozen ``caption_table``).
The prediction is what the model predicts (epsilon, or v for a v-prediction scheduler), cut to the first
C channels of a learned-sigma model. Conditioning (``conditioning``):

* ``none``: an unconditional model (DDPM CIFAR-10, LDM); ``labels`` are ignored and ``num_classes`` is 1.
* ``class``: UNet (``UNet2DModel``, ``num_class_embeds`` = number of classes, an embedding added to the
  timestep embedding) or DiT (``DiTTransformer2DModel``, adaLN-Zero with ``num_embeds_ada_norm`` classes;
  diffusers' label embedding reserves index ``num_classes`` as the "null" class for classifier-free
  guidance and drops labels with probability 0.1 while the module is in train mode).
* ``text``: cross-attention to a caption embedding sequence: PixArt (``PixArtTransformer2DModel``, T5
  embeddings with their attention mask) or Stable Diffusion's ``UNet2DConditionModel`` (CLIP text
  embeddings). The embedded PixArt has no text encoder: a learned table
  (``nn.Embedding(num_classes + 1, caption_length * caption_channels)``) maps a class to its sequence.
  Row ``num_classes`` is always the null caption (the empty prompt of a real model).

Classifier-free guidance (``guidance_scale`` > 1) runs inside ``forward`` exactly as the diffusers
pipelines run it: both branches in one batch (DiTPipeline puts the conditional half first, PixArt and
Stable Diffusion the unconditional half), ``uncond + s * (cond - uncond)``. Every stage that calls the
backbone (calibration, reconstruction, QAT, evaluation) therefore sees the guided step, and a quantized
layer sees both branches, as Q-Diffusion calibrates Stable Diffusion.

A latent model carries its full-precision autoencoder in ``codec`` (:class:`LatentCodec`), outside the
module tree, so no quantization pass, parameter count or ``state_dict`` ever sees it; its sampler settings
(a diffusers ``scheduler_config``) travel in ``scheduler_config``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file
from torch import nn

from pipeline.config import BackboneModel
from pipeline.io import save_safetensors

KINDS = ("unet", "dit", "pixart")
CONDITIONINGS = ("none", "class", "text")
CLASS_FOR_KIND = {"unet": "UNet2DModel", "dit": "DiTTransformer2DModel", "pixart": "PixArtTransformer2DModel"}
# every denoiser class a directory may hold -> the backbone kind whose quantization rules apply to it (one
# more entry, and its call in DiffusionBackbone._predict, adds a class, e.g. SD3Transformer2DModel)
KIND_FOR_CLASS = {**{v: k for k, v in CLASS_FOR_KIND.items()}, "UNet2DConditionModel": "unet"}
AUTOENCODER_CLASSES = ("AutoencoderKL", "VQModel")
_NO_RESOLUTION = {"resolution": None, "aspect_ratio": None}


def _diffusers_class(kind_or_class: str):
    import diffusers

    return getattr(diffusers, CLASS_FOR_KIND.get(kind_or_class, kind_or_class))


def null_condition(kind: str, conditioning: str) -> bool:
    """Whether a denoiser of ``kind`` with ``conditioning`` has an unconditional ("null") input, which
    classifier-free guidance needs: a text model's empty-prompt caption, or a class DiT's extra label row
    (diffusers builds it for label dropout). A class UNet (``num_class_embeds``) and an unconditional model
    have none. The one rule the directory check, ``validate`` and :class:`DiffusionBackbone` apply."""
    return conditioning == "text" or (conditioning == "class" and kind == "dit")


class LatentCodec:
    """A latent model's autoencoder (``AutoencoderKL`` or ``VQModel``), in full precision as in every paper.

    ``decode(z)`` maps latents to images in [-1, 1] as the diffusers pipelines do (``vae.decode(z /
    scaling_factor)``; a VQ autoencoder quantizes ``z`` to its codebook on the way). It is not an
    ``nn.Module`` attribute of the backbone, and a deep copy of the backbone shares it (it is never
    changed), so quantizing or copying a backbone neither touches nor duplicates it."""

    def __init__(self, vae: nn.Module):
        name = type(vae).__name__
        if name not in AUTOENCODER_CLASSES:
            raise ValueError(f"vae: unsupported autoencoder class {name!r} (supported: "
                             f"{', '.join(AUTOENCODER_CLASSES)})")
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", None) or 1.0)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side: 2 ** (number of encoder blocks - 1)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def image_shape(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        c = int(self.vae.config.out_channels)
        return c, latent_shape[1] * self.downscale, latent_shape[2] * self.downscale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        device = next(self.vae.parameters()).device
        x = self.vae.decode(z.to(device) / self.scaling_factor).sample
        return x.clamp(-1.0, 1.0)

    def __deepcopy__(self, memo):
        return self


class DiffusionBackbone(nn.Module):
    """One diffusers denoiser with a uniform ``forward(x, t, labels) -> prediction`` (module docstring).

    Attributes: ``net`` (the diffusers model), ``kind`` ("unet" | "dit" | "pixart": which quantization rules
    apply), ``conditioning`` ("none" | "class" | "text"), ``num_classes`` (classes or prompts; 1 when
    unconditional), ``sample_shape`` (C, H, W of what the denoiser sees: latents for a latent model),
    ``guidance_scale``, ``codec`` (a latent model's autoencoder, else None), ``scheduler_config`` (the
    model's own sampler settings, else None), ``caption_table`` / ``caption_mask`` (text conditions).
    """

    def __init__(
        self,
        net: nn.Module,
        kind: str,
        num_classes: int,
        sample_shape: tuple[int, int, int],
        caption_table: Optional[nn.Embedding] = None,
        caption_length: Optional[int] = None,
        conditioning: Optional[str] = None,
        guidance_scale: float = 1.0,
        codec: Optional[LatentCodec] = None,
        scheduler_config: Optional[dict] = None,
        caption_mask: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind: unknown backbone kind {kind!r} (allowed values: {', '.join(KINDS)})")
        if conditioning is None:
            conditioning = "text" if kind == "pixart" else ("class" if num_classes > 0 else "none")
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning: {conditioning!r} is not one of {', '.join(CONDITIONINGS)}")
        self.net = net
        self.kind = kind
        self.conditioning = conditioning
        self.num_classes = max(1, int(num_classes)) if conditioning == "none" else int(num_classes)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.caption_table = caption_table
        self.caption_length = caption_length
        self.register_buffer("caption_mask", caption_mask, persistent=False)
        self.codec = codec
        self.scheduler_config = dict(scheduler_config) if scheduler_config is not None else None
        self.prompts: Optional[list[str]] = None  # a text model's prompts (labels index them), when loaded with them
        if caption_table is not None:
            if caption_length is None or caption_table.embedding_dim % caption_length:
                raise ValueError(
                    f"caption_length: must divide the caption table width {caption_table.embedding_dim}, "
                    f"got {caption_length!r}"
                )
        self.guidance_scale = 1.0
        self.set_guidance(guidance_scale)

    @property
    def channels(self) -> int:
        return self.sample_shape[0]

    @property
    def has_null_condition(self) -> bool:
        """:func:`null_condition` for this model, with a class DiT's label table checked for its extra row."""
        if not null_condition(self.kind, self.conditioning):
            return False
        if self.conditioning == "class":
            table = getattr(getattr(self.net, "transformer_blocks", [None])[0], "norm1", None)
            emb = getattr(getattr(getattr(table, "emb", None), "class_embedder", None), "embedding_table", None)
            return emb is None or emb.num_embeddings > self.num_classes
        return True

    def set_guidance(self, scale: float) -> "DiffusionBackbone":
        """Set the classifier-free guidance scale (1 = no guidance); refused where the model has no null
        condition. Returns the backbone."""
        try:
            s = float(scale)
        except (TypeError, ValueError):
            raise ValueError(f"guidance_scale: must be a number >= 1, got {scale!r}") from None
        if not math.isfinite(s) or s < 1.0:
            raise ValueError(f"guidance_scale: must be a finite number >= 1 (1 = no guidance), got {scale!r}")
        if s > 1.0 and not self.has_null_condition:
            raise ValueError(f"guidance_scale: {s} needs a null condition, and this {self.conditioning}-conditioned "
                             f"{type(self.net).__name__} has none (use 1.0)")
        self.guidance_scale = s
        return self

    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model produces: the decoded size for a latent model."""
        return self.codec.image_shape(self.sample_shape) if self.codec is not None else self.sample_shape

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Sampler output -> images in [-1, 1] (the autoencoder's decoder for a latent model)."""
        return self.codec.decode(x) if self.codec is not None else x.clamp(-1.0, 1.0)

    def _apply(self, fn, recurse=True):  # .to(device) / .float() move the autoencoder with the denoiser
        super()._apply(fn, recurse)
        if self.codec is not None:
            self.codec.vae._apply(fn, recurse)
        return self

    def caption_embeddings(self, labels: torch.Tensor) -> torch.Tensor:
        """Condition indices [B] -> caption sequence [B, caption_length, caption_channels]."""
        if self.caption_table is None:
            raise ValueError(
                "encoder_hidden_states: this backbone has no caption table; pass caption "
                "embeddings explicitly (encoder_hidden_states=[B, L, caption_channels])"
            )
        e = self.caption_table(labels)
        return e.view(labels.shape[0], self.caption_length, -1)

    def _predict(self, x, t, labels, encoder_hidden_states=None):
        b = x.shape[0]
        if self.kind == "unet":
            if self.conditioning == "text":
                if encoder_hidden_states is None:
                    encoder_hidden_states = self.caption_embeddings(self._labels_or_null(labels, b, x.device))
                return self.net(x, t, encoder_hidden_states=encoder_hidden_states).sample
            if self.conditioning == "none":
                return self.net(x, t).sample
            if labels is None and getattr(self.net, "class_embedding", None) is not None:
                raise ValueError("labels: this UNet is class-conditional; pass labels [B]")
            return self.net(x, t, class_labels=labels).sample
        if self.kind == "dit":
            # diffusers' DiT keeps index num_classes as the null (unconditional) class
            return self.net(x, timestep=t, class_labels=self._labels_or_null(labels, b, x.device)).sample
        mask = None
        if encoder_hidden_states is None:
            labels = self._labels_or_null(labels, b, x.device)
            encoder_hidden_states = self.caption_embeddings(labels)
            if self.caption_mask is not None:
                mask = self.caption_mask[labels]
        added = dict(_NO_RESOLUTION)
        if getattr(self.net, "use_additional_conditions", False):  # PixArt-α 1024: size conditioning
            h, w = self.image_shape()[1:]
            added = {"resolution": torch.tensor([[h, w]], dtype=x.dtype, device=x.device).repeat(b, 1),
                     "aspect_ratio": torch.tensor([[h / w]], dtype=x.dtype, device=x.device).repeat(b, 1)}
        return self.net(x, encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=mask, timestep=t,
                        added_cond_kwargs=added).sample

    def _labels_or_null(self, labels, b, device):
        if labels is None:
            return torch.full((b,), self.num_classes, dtype=torch.long, device=device)
        return labels

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | int,
        labels: Optional[torch.Tensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The model's prediction for noisy inputs ``x`` [B,C,H,W] at timesteps ``t`` ([B] or scalar), guided
        when ``guidance_scale`` > 1 (module docstring). Learned-sigma models (2C output channels) are cut to
        their first C channels.
        """
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        t = t.to(torch.long)
        if labels is not None:
            labels = torch.as_tensor(labels, device=x.device).to(torch.long)
            if labels.ndim == 0:
                labels = labels.expand(b)
        c = self.channels
        if self.guidance_scale == 1.0 or encoder_hidden_states is not None:
            return self._predict(x, t, labels, encoder_hidden_states)[:, :c]
        if labels is None:
            raise ValueError("labels: guided sampling (guidance_scale > 1) needs a condition per sample [B]")
        null = torch.full_like(labels, self.num_classes)
        cond_first = self.kind == "dit"  # DiTPipeline: [cond, null]; PixArt / Stable Diffusion: [null, cond]
        both = torch.cat((labels, null) if cond_first else (null, labels))
        out = self._predict(torch.cat([x, x]), torch.cat([t, t]), both)[:, :c]
        first, second = out.chunk(2)
        cond, uncond = (first, second) if cond_first else (second, first)
        return uncond + self.guidance_scale * (cond - uncond)


def _down_up_blocks(attention_levels: list[bool]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
    return down, up


def build_backbone(
    kind: str, model_cfg: BackboneModel, image_size: int, channels: int, num_classes: int,
    seed: Optional[int] = None,
) -> DiffusionBackbone:
    """A freshly initialised class-conditional backbone of ``kind`` from ``model_cfg``'s architecture.

    ``seed``: initialise the weights from ``torch.manual_seed(seed)`` without touching the caller's
    global RNG state (the same seed gives bit-identical weights); None draws from the global RNG."""
    if seed is None:
        return _build_backbone(kind, model_cfg, image_size, channels, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return _build_backbone(kind, model_cfg, image_size, channels, num_classes)


def _build_backbone(kind: str, model_cfg: BackboneModel, image_size: int, channels: int,
                    num_classes: int) -> DiffusionBackbone:
    if kind not in KINDS:
        raise ValueError(f"kind: unknown backbone kind {kind!r} (allowed values: {', '.join(KINDS)})")
    if num_classes < 1:
        raise ValueError(f"num_classes: must be >= 1, got {num_classes}")
    cls = _diffusers_class(kind)
    shape = (channels, image_size, image_size)
    if kind == "unet":
        a = model_cfg.unet
        for c in a.block_out_channels:
            if c % a.norm_num_groups:
                raise ValueError(
                    f"model.unet.block_out_channels: {c} is not divisible by norm_num_groups={a.norm_num_groups}"
                )
        down, up = _down_up_blocks(list(a.attention_levels))
        net = cls(
            sample_size=image_size,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=tuple(a.block_out_channels),
            layers_per_block=a.layers_per_block,
            down_block_types=down,
            up_block_types=up,
            norm_num_groups=a.norm_num_groups,
            attention_head_dim=8,
            num_class_embeds=num_classes,
        )
        return DiffusionBackbone(net, kind, num_classes, shape)
    if kind == "dit":
        a = model_cfg.dit
        if image_size % a.patch_size:
            raise ValueError(f"model.dit.patch_size: {a.patch_size} does not divide image_size {image_size}")
        net = cls(
            num_attention_heads=a.num_attention_heads,
            attention_head_dim=a.attention_head_dim,
            in_channels=channels,
            out_channels=channels,
            num_layers=a.num_layers,
            sample_size=image_size,
            patch_size=a.patch_size,
            num_embeds_ada_norm=num_classes,
            norm_type="ada_norm_zero",
        )
        return DiffusionBackbone(net, kind, num_classes, shape)
    a = model_cfg.pixart
    if image_size % a.patch_size:
        raise ValueError(f"model.pixart.patch_size: {a.patch_size} does not divide image_size {image_size}")
    net = cls(
        num_attention_heads=a.num_attention_heads,
        attention_head_dim=a.attention_head_dim,
        in_channels=channels,
        out_channels=channels,
        num_layers=a.num_layers,
        cross_attention_dim=a.num_attention_heads * a.attention_head_dim,
        sample_size=image_size,
        patch_size=a.patch_size,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
        caption_channels=a.caption_channels,
    )
    table = nn.Embedding(num_classes + 1, a.caption_length * a.caption_channels)
    nn.init.normal_(table.weight, std=1.0)
    return DiffusionBackbone(net, kind, num_classes, shape, caption_table=table, caption_length=a.caption_length)


def save_backbone(backbone: DiffusionBackbone, out_dir: str | Path) -> None:
    """Write ``out_dir/net`` (diffusers ``save_pretrained``), ``backbone.json`` and, where the backbone has
    them, ``conditioning.safetensors`` (the caption table and mask), ``vae/`` (the autoencoder,
    ``save_pretrained``) and ``scheduler_config.json`` (the model's own sampler settings). Keys that hold
    their defaults (class conditioning, no guidance) are left out of ``backbone.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone.net.save_pretrained(str(out / "net"), safe_serialization=True)
    meta = {
        "kind": backbone.kind,
        "num_classes": backbone.num_classes,
        "sample_shape": list(backbone.sample_shape),
        "class_name": type(backbone.net).__name__,
    }
    default_cond = "text" if backbone.kind == "pixart" else "class"
    if backbone.conditioning != default_cond:
        meta["conditioning"] = backbone.conditioning
    if backbone.guidance_scale != 1.0:
        meta["guidance_scale"] = backbone.guidance_scale
    if backbone.caption_table is not None:
        meta["caption_length"] = backbone.caption_length
        if not backbone.caption_table.weight.requires_grad:
            meta["caption_frozen"] = True
        tensors = {"caption_table": backbone.caption_table.weight.detach().float().contiguous().cpu()}
        if backbone.caption_mask is not None:
            tensors["caption_mask"] = backbone.caption_mask.detach().to(torch.int64).contiguous().cpu()
        save_safetensors(tensors, str(out / "conditioning.safetensors"))
    if backbone.codec is not None:
        backbone.codec.vae.save_pretrained(str(out / "vae"), safe_serialization=True)
        meta["autoencoder"] = type(backbone.codec.vae).__name__
    if backbone.prompts is not None:
        (out / "prompts.txt").write_text("".join(f"{p}\n" for p in backbone.prompts), encoding="utf-8")
    if backbone.scheduler_config is not None:
        (out / "scheduler_config.json").write_text(json.dumps(backbone.scheduler_config, indent=2, sort_keys=True)
                                                   + "\n")
    (out / "backbone.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"path: {path / 'config.json'} is not valid JSON: {exc}") from None


def _kind_of(config: dict, path: Path) -> str:
    name = config.get("_class_name")
    if name == "UNet2DConditionModel":
        raise ValueError(f"path: {path} holds a text-conditioned UNet2DConditionModel: point at its pipeline "
                         f"directory (model_index.json, with text_encoder/ and tokenizer/), not at the unet/ folder")
    if name not in CLASS_FOR_KIND.values():
        raise ValueError(
            f"path: {path} holds a {name!r} model; supported diffusers classes (config.json _class_name): "
            f"{', '.join(CLASS_FOR_KIND.values())}, or a pipeline directory (model_index.json)"
        )
    return KIND_FOR_CLASS[name]


def _shape_from_config(config: dict) -> tuple[int, int, int]:
    size = config.get("sample_size")
    if isinstance(size, (list, tuple)):
        h, w = int(size[0]), int(size[1])
    else:
        h = w = int(size)
    return int(config.get("in_channels", 3)), h, w


def _plain_num_classes(kind: str, config: dict) -> int:
    if kind == "unet":
        return int(config.get("num_class_embeds") or 0)
    return int(config.get("num_embeds_ada_norm") or 0) if kind == "dit" else 0


def attach_caption_embeddings(backbone, embeddings: torch.Tensor, mask: Optional[torch.Tensor] = None):
    """Condition a text-conditioned backbone (PixArt, or Stable Diffusion's UNet) with precomputed caption
    embeddings, one sequence per prompt or class and the null (empty) caption last: ``embeddings``
    [num_classes + 1, L, caption_channels] (e.g. T5 outputs [K, 120, 4096] computed once, offline) and,
    for a T5-conditioned PixArt, their attention ``mask`` [num_classes + 1, L]. They become the backbone's
    frozen ``caption_table`` (and ``caption_mask``), so ``backbone(x, t, labels)`` — and with it
    calibration, reconstruction and evaluation — works unchanged. Returns the backbone."""
    if getattr(backbone, "kind", None) != "pixart" and getattr(backbone, "conditioning", None) != "text":
        raise ValueError(f"backbone.kind: caption embeddings condition a text-conditioned backbone ('pixart' or "
                         f"a UNet2DConditionModel), got {getattr(backbone, 'kind', None)!r}")
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 3 or embeddings.shape[0] < 2:
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise ValueError(f"embeddings: expected a tensor [num_classes + 1, caption_length, caption_channels] "
                         f"(null caption last), got {shape}")
    k, length, channels = embeddings.shape
    cfg = backbone.net.config
    field = "caption_channels" if getattr(cfg, "caption_channels", None) else "cross_attention_dim"
    expected = getattr(cfg, field, None)
    if expected is not None and int(expected) != channels:
        raise ValueError(f"embeddings: {channels} channels per token, but the {type(backbone.net).__name__}'s "
                         f"{field} is {expected}")
    if mask is not None and tuple(mask.shape) != (k, length):
        raise ValueError(f"mask: expected shape {(k, length)} (one entry per caption token), got {tuple(mask.shape)}")
    weight = embeddings.detach().float().reshape(k, length * channels)
    table = nn.Embedding.from_pretrained(weight, freeze=True)
    device = next(backbone.net.parameters()).device
    backbone.caption_table = table.to(device)
    backbone.caption_length = int(length)
    backbone.caption_mask = mask.to(device=device, dtype=torch.long) if mask is not None else None
    backbone.num_classes = int(k - 1)
    return backbone


CAPTION_EMBEDDINGS_FILE = "caption_embeddings.safetensors"


def load_backbone(path: str | Path, device: str | torch.device | None = None) -> DiffusionBackbone:
    """Load a backbone saved by :func:`save_backbone`, or a plain local diffusers model directory.

    A plain directory's ``config.json`` must name UNet2DModel, DiTTransformer2DModel or
    PixArtTransformer2DModel. A plain PixArt has no caption table: pass ``encoder_hidden_states`` to
    ``forward``, or put ``caption_embeddings.safetensors`` (key ``caption_embeddings``: one text-encoder
    output per class, null caption last, computed once offline) beside its ``config.json`` and it is
    attached as the caption table. The model is returned in eval mode.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"path: backbone directory not found: {root}")
    if (root / "backbone.json").exists():
        meta = json.loads((root / "backbone.json").read_text())
        kind = meta.get("kind")
        if kind not in KINDS:
            raise ValueError(f"{root / 'backbone.json'}: kind {kind!r} is not one of {', '.join(KINDS)}")
        net_dir = root / "net"
        if not (net_dir / "config.json").exists():
            raise FileNotFoundError(f"path: {net_dir / 'config.json'} not found (incomplete backbone directory)")
        net_config = _read_config(net_dir)
        found = KIND_FOR_CLASS.get(net_config.get("_class_name")) or _kind_of(net_config, net_dir)
        if found != kind:
            raise ValueError(f"{root}: backbone.json says kind {kind!r} but net/ holds a {CLASS_FOR_KIND[found]}")
        class_name = meta.get("class_name", CLASS_FOR_KIND[kind])
        net = _diffusers_class(class_name).from_pretrained(str(net_dir), low_cpu_mem_usage=False)
        table, length, mask = None, None, None
        cond = root / "conditioning.safetensors"
        if cond.exists():
            tensors = load_file(str(cond))
            w = tensors["caption_table"]
            table = nn.Embedding(w.shape[0], w.shape[1])
            with torch.no_grad():
                table.weight.copy_(w)
            table.weight.requires_grad_(not meta.get("caption_frozen", False))
            length = int(meta["caption_length"])
            mask = tensors.get("caption_mask")
        codec = None
        if meta.get("autoencoder"):
            codec = LatentCodec(_diffusers_class(meta["autoencoder"]).from_pretrained(str(root / "vae"),
                                                                                      low_cpu_mem_usage=False))
        sched = root / "scheduler_config.json"
        bb = DiffusionBackbone(net, kind, meta["num_classes"], tuple(meta["sample_shape"]), table, length,
                               conditioning=meta.get("conditioning"), guidance_scale=meta.get("guidance_scale", 1.0),
                               codec=codec, scheduler_config=json.loads(sched.read_text()) if sched.exists() else None,
                               caption_mask=mask)
        if (root / "prompts.txt").exists():
            bb.prompts = (root / "prompts.txt").read_text(encoding="utf-8").splitlines()
    elif (root / "model_index.json").exists():
        from .hub import load_pipeline

        return load_pipeline(root, device=device)
    elif (root / "config.json").exists():
        config = _read_config(root)
        kind = _kind_of(config, root)
        net = _diffusers_class(kind).from_pretrained(str(root), low_cpu_mem_usage=False)
        bb = DiffusionBackbone(net, kind, _plain_num_classes(kind, config), _shape_from_config(config))
        if kind == "pixart" and (root / CAPTION_EMBEDDINGS_FILE).exists():
            try:
                emb = load_file(str(root / CAPTION_EMBEDDINGS_FILE))["caption_embeddings"]
            except KeyError:
                raise ValueError(f"{root / CAPTION_EMBEDDINGS_FILE}: no tensor named 'caption_embeddings'") from None
            attach_caption_embeddings(bb, emb)
    else:
        raise FileNotFoundError(
            f"path: {root} is neither a saved backbone (backbone.json), a diffusers pipeline directory "
            f"(model_index.json) nor a diffusers model directory (config.json)"
        )
    bb.eval()
    if device is not None:
        bb.to(device)
    return bb
