"""Backbone factories (tiny UNet / DiT / PixArt from config) and diffusers-directory save/load.

A :class:`DiffusionBackbone` wraps one diffusers model behind a single call ``forward(x, t, labels)
-> eps`` so that training, calibration, quantization and evaluation never branch on the model type.
Class conditioning:

* UNet (``UNet2DModel``): ``num_class_embeds`` = number of classes (an embedding added to the
  timestep embedding).
* DiT (``DiTTransformer2DModel``): adaLN-Zero with ``num_embeds_ada_norm`` = number of classes.
  diffusers' label embedding reserves one extra "null" class for classifier-free guidance and drops
  labels with probability 0.1 while the module is in train mode.
* PixArt (``PixArtTransformer2DModel``): conditioned by cross-attention on a caption embedding
  sequence. The embedded model has no text encoder; a learned table (``caption_table``,
  ``nn.Embedding(num_classes + 1, caption_length * caption_channels)``) maps a class to its
  [caption_length, caption_channels] sequence; index ``num_classes`` is the null caption.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file
from torch import nn

from pipeline.config import BackboneModel
from pipeline.io import save_safetensors

KINDS = ("unet", "dit", "pixart")
CLASS_FOR_KIND = {"unet": "UNet2DModel", "dit": "DiTTransformer2DModel", "pixart": "PixArtTransformer2DModel"}
KIND_FOR_CLASS = {v: k for k, v in CLASS_FOR_KIND.items()}
_NO_RESOLUTION = {"resolution": None, "aspect_ratio": None}


def _diffusers_class(kind: str):
    import diffusers

    return getattr(diffusers, CLASS_FOR_KIND[kind])


class DiffusionBackbone(nn.Module):
    """One diffusers denoiser with a uniform ``forward(x, t, labels) -> eps``.

    Attributes: ``net`` (the diffusers model), ``kind`` ("unet" | "dit" | "pixart"), ``num_classes``,
    ``sample_shape`` (C, H, W) and, for the embedded PixArt, ``caption_table``.
    """

    def __init__(
        self,
        net: nn.Module,
        kind: str,
        num_classes: int,
        sample_shape: tuple[int, int, int],
        caption_table: Optional[nn.Embedding] = None,
        caption_length: Optional[int] = None,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind: unknown backbone kind {kind!r} (allowed values: {', '.join(KINDS)})")
        self.net = net
        self.kind = kind
        self.num_classes = int(num_classes)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.caption_table = caption_table
        self.caption_length = caption_length
        if caption_table is not None:
            if caption_length is None or caption_table.embedding_dim % caption_length:
                raise ValueError(
                    f"caption_length: must divide the caption table width {caption_table.embedding_dim}, "
                    f"got {caption_length!r}"
                )

    @property
    def channels(self) -> int:
        return self.sample_shape[0]

    def caption_embeddings(self, labels: torch.Tensor) -> torch.Tensor:
        """Class labels [B] -> caption sequence [B, caption_length, caption_channels]."""
        if self.caption_table is None:
            raise ValueError(
                "encoder_hidden_states: this PixArt backbone has no caption table; pass caption "
                "embeddings explicitly (encoder_hidden_states=[B, L, caption_channels])"
            )
        e = self.caption_table(labels)
        return e.view(labels.shape[0], self.caption_length, -1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | int,
        labels: Optional[torch.Tensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Predict the noise ``eps`` for noisy images ``x`` [B,C,H,W] at timesteps ``t`` ([B] or scalar).

        Learned-sigma models (2C output channels) are cut to their first C channels.
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
        if self.kind == "unet":
            if labels is None and getattr(self.net, "class_embedding", None) is not None:
                raise ValueError("labels: this UNet is class-conditional; pass labels [B]")
            out = self.net(x, t, class_labels=labels).sample
        elif self.kind == "dit":
            if labels is None:  # diffusers' DiT keeps index num_classes as the null (unconditional) class
                labels = torch.full((b,), self.num_classes, dtype=torch.long, device=x.device)
            out = self.net(x, timestep=t, class_labels=labels).sample
        else:
            if encoder_hidden_states is None:
                if labels is None:
                    labels = torch.full((b,), self.num_classes, dtype=torch.long, device=x.device)
                encoder_hidden_states = self.caption_embeddings(labels)
            out = self.net(
                x, encoder_hidden_states=encoder_hidden_states, timestep=t, added_cond_kwargs=dict(_NO_RESOLUTION)
            ).sample
        return out[:, : self.channels]


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
    """Write ``out_dir/net`` (diffusers ``save_pretrained``), ``backbone.json`` and, for the embedded
    PixArt, ``conditioning.safetensors`` (the caption table)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone.net.save_pretrained(str(out / "net"), safe_serialization=True)
    meta = {
        "kind": backbone.kind,
        "num_classes": backbone.num_classes,
        "sample_shape": list(backbone.sample_shape),
        "class_name": type(backbone.net).__name__,
    }
    if backbone.caption_table is not None:
        meta["caption_length"] = backbone.caption_length
        save_safetensors(
            {"caption_table": backbone.caption_table.weight.detach().float().contiguous().cpu()},
            str(out / "conditioning.safetensors"),
        )
    (out / "backbone.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"path: {path / 'config.json'} is not valid JSON: {exc}") from None


def _kind_of(config: dict, path: Path) -> str:
    name = config.get("_class_name")
    if name not in KIND_FOR_CLASS:
        raise ValueError(
            f"path: {path} holds a {name!r} model; supported diffusers classes (config.json _class_name): "
            f"{', '.join(KIND_FOR_CLASS)}"
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


def attach_caption_embeddings(backbone, embeddings: torch.Tensor):
    """Condition a PixArt backbone loaded from a plain diffusers directory (a real PixArt-α/Σ transformer
    has no caption table) with precomputed caption embeddings, one sequence per class and the null caption
    last: ``embeddings`` [num_classes + 1, L, caption_channels] (e.g. T5 outputs [K, 120, 4096] computed
    once, offline, for the captions ``caption(class_name)``). They become the backbone's frozen
    ``caption_table``, so ``backbone(x, t, labels)`` — and with it calibration, reconstruction and
    evaluation — works unchanged. Returns the backbone."""
    if getattr(backbone, "kind", None) != "pixart":
        raise ValueError(f"backbone.kind: caption embeddings condition a 'pixart' backbone, got "
                         f"{getattr(backbone, 'kind', None)!r}")
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 3 or embeddings.shape[0] < 2:
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise ValueError(f"embeddings: expected a tensor [num_classes + 1, caption_length, caption_channels] "
                         f"(null caption last), got {shape}")
    k, length, channels = embeddings.shape
    expected = getattr(backbone.net.config, "caption_channels", None)
    if expected is not None and int(expected) != channels:
        raise ValueError(f"embeddings: {channels} channels per token, but the PixArt model's caption_channels "
                         f"is {expected}")
    weight = embeddings.detach().float().reshape(k, length * channels)
    table = nn.Embedding.from_pretrained(weight, freeze=True)
    device = next(backbone.net.parameters()).device
    backbone.caption_table = table.to(device)
    backbone.caption_length = int(length)
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
        found = _kind_of(_read_config(net_dir), net_dir)
        if found != kind:
            raise ValueError(f"{root}: backbone.json says kind {kind!r} but net/ holds a {CLASS_FOR_KIND[found]}")
        net = _diffusers_class(kind).from_pretrained(str(net_dir), low_cpu_mem_usage=False)
        table, length = None, None
        cond = root / "conditioning.safetensors"
        if cond.exists():
            w = load_file(str(cond))["caption_table"]
            table = nn.Embedding(w.shape[0], w.shape[1])
            with torch.no_grad():
                table.weight.copy_(w)
            length = int(meta["caption_length"])
        bb = DiffusionBackbone(net, kind, meta["num_classes"], tuple(meta["sample_shape"]), table, length)
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
            f"path: {root} is neither a saved backbone (backbone.json) nor a diffusers model directory (config.json)"
        )
    bb.eval()
    if device is not None:
        bb.to(device)
    return bb
