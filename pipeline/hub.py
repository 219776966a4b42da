"""A local diffusers pipeline directory (a Hugging Face snapshot: ``model_index.json`` plus ``unet/`` or
``transformer/``, ``vae/`` or ``vqvae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) as a
:class:`pipeline.models.DiffusionBackbone`.

Its pieces come from ``model_index.json``:

* the denoiser (component ``transformer`` or ``unet``): any class in
  :data:`pipeline.models.KIND_FOR_CLASS` (UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel,
  PixArtTransformer2DModel);
* the autoencoder (``vae`` or ``vqvae``: AutoencoderKL or VQModel), kept in full precision outside the
  quantized module tree (:class:`pipeline.models.LatentCodec`);
* the text encoder and tokenizer (T5 as PixArt-α/Σ use it, CLIP text as Stable Diffusion does): they run
  once per prompt of the prompt file, here, in full precision, and only their outputs are kept (one
  caption sequence per prompt, plus the empty prompt as the null condition), so calibration data holds a
  prompt index per sample, not an embedding;
* the scheduler config (``scheduler/scheduler_config.json``): the model's noise schedule, prediction type
  and default sampler (:mod:`pipeline.sampling`).

Prompts are encoded as the diffusers pipelines encode them: T5 on the lower-cased, stripped prompt
(PixArt's ``clean_caption=False`` path; the optional bs4/ftfy caption cleaning is not applied), padded to
``max_sequence_length`` (120, PixArt-α's) with its attention mask; CLIP padded to the tokenizer's
``model_max_length`` with no mask (Stable Diffusion's default, ``clip_skip`` unset).

:func:`check_pipeline_dir` reads only the JSON files, so a bad directory is refused in the ``validate``
stage, before any weights are loaded.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from .models import (AUTOENCODER_CLASSES, KIND_FOR_CLASS, DiffusionBackbone, LatentCodec, _shape_from_config,
                     attach_caption_embeddings, null_condition)

DENOISER_COMPONENTS = ("transformer", "unet")
AUTOENCODER_COMPONENTS = ("vae", "vqvae")
TEXT_ENCODERS = {"T5EncoderModel": "t5", "CLIPTextModel": "clip"}
# pipelines whose denoiser works on latents: one without an autoencoder cannot produce images
LATENT_PIPELINES = ("LDMPipeline", "DiTPipeline", "PixArtAlphaPipeline", "PixArtSigmaPipeline",
                    "StableDiffusionPipeline")
T5_MAX_LENGTH = 120  # PixArt-α's max_sequence_length (Σ uses 300)


def is_pipeline_dir(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def _json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path} must hold a JSON object")
    return data


def _component(index: dict, names: Sequence[str]) -> tuple[Optional[str], Optional[str]]:
    """The first of ``names`` that model_index.json lists with a class: (name, class name)."""
    for n in names:
        entry = index.get(n)
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
            return n, str(entry[1])
    return None, None


def read_prompts(path: str | Path, key: str = "prompts") -> list[str]:
    """Non-empty lines of a prompt file (one prompt per line)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{key}: prompt file not found: {p}")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{key}: {p} holds no prompt (one prompt per line)")
    return prompts


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def check_pipeline_dir(path: str | Path, prompts: Optional[str | Path] = None, guidance_scale: float = 1.0,
                       prefix: str = "") -> dict:
    """Check a pipeline directory from its JSON files alone; returns what :func:`load_pipeline` will load
    (``denoiser``, ``denoiser_class``, ``kind``, ``autoencoder``, ``text_encoder``, ``conditioning``,
    ``scheduler_config``). Every refusal names the params key (``<prefix>.source``, ``<prefix>.prompts``,
    ``<prefix>.guidance_scale``; e.g. prefix ``model.dit``) and the piece of the directory."""
    root = Path(path)
    key = _key(prefix, "source")
    index = _json(root / "model_index.json", key)
    pipe_class = str(index.get("_class_name", ""))
    comp, cls = _component(index, DENOISER_COMPONENTS)
    if comp is None:
        raise ValueError(f"{key}: {root / 'model_index.json'} lists no denoiser (a 'transformer' or 'unet' "
                         f"component)")
    if cls not in KIND_FOR_CLASS:
        raise ValueError(f"{key}: the denoiser {comp}/ is a {cls}, which this pipeline does not support "
                         f"(supported: {', '.join(KIND_FOR_CLASS)})")
    den_cfg = _json(root / comp / "config.json", f"{key}: {comp}")
    sched_cfg = _json(root / "scheduler" / "scheduler_config.json", f"{key}: scheduler")
    sample_shape = _shape_from_config(den_cfg)
    _, h, w = image_shape = sample_shape
    ae_comp, ae_cls = _component(index, AUTOENCODER_COMPONENTS)
    if ae_comp is not None:
        if ae_cls not in AUTOENCODER_CLASSES:
            raise ValueError(f"{key}: the autoencoder {ae_comp}/ is a {ae_cls} (supported: "
                             f"{', '.join(AUTOENCODER_CLASSES)})")
        ae_cfg = _json(root / ae_comp / "config.json", f"{key}: {ae_comp}")
        latent_c, in_c = int(ae_cfg.get("latent_channels", 4)), sample_shape[0]
        if latent_c != in_c:
            raise ValueError(f"{key}: the autoencoder decodes {latent_c}-channel latents but the denoiser samples "
                             f"{in_c} channels")
        down = 2 ** (len(ae_cfg.get("block_out_channels", [0])) - 1)
        image_shape = (int(ae_cfg.get("out_channels", 3)), h * down, w * down)
    elif pipe_class in LATENT_PIPELINES:
        raise ValueError(f"{key}: a {pipe_class} samples latents, but {root / 'model_index.json'} lists no "
                         f"autoencoder ('vae' or 'vqvae')")
    conditioning = "none"
    text, texts = None, None
    if cls in ("PixArtTransformer2DModel", "UNet2DConditionModel"):
        conditioning = "text"
        te_comp, te_cls = _component(index, ("text_encoder",))
        tok_comp, _ = _component(index, ("tokenizer",))
        if te_comp is None or tok_comp is None:
            raise ValueError(f"{key}: the {cls} is text-conditioned, but {root / 'model_index.json'} lists no "
                             f"{'text_encoder' if te_comp is None else 'tokenizer'}")
        if te_cls not in TEXT_ENCODERS:
            raise ValueError(f"{key}: text_encoder/ is a {te_cls} (supported: {', '.join(TEXT_ENCODERS)})")
        for c in (te_comp, tok_comp):
            if not (root / c).is_dir():
                raise FileNotFoundError(f"{key}: {root / c} not found (model_index.json lists it)")
        text = TEXT_ENCODERS[te_cls]
        if prompts is None:
            raise ValueError(f"{_key(prefix, 'prompts')}: the text-conditioned {cls} in {root} needs a prompt file "
                             f"(one prompt per line)")
        texts = read_prompts(prompts, _key(prefix, "prompts"))
    elif cls == "DiTTransformer2DModel" and den_cfg.get("num_embeds_ada_norm"):
        conditioning = "class"
    elif cls == "UNet2DModel" and den_cfg.get("num_class_embeds"):
        conditioning = "class"
    g = float(guidance_scale)
    if not 1.0 <= g < float("inf"):
        raise ValueError(f"{_key(prefix, 'guidance_scale')}: must be a finite number >= 1 (1 = no guidance), "
                         f"got {guidance_scale!r}")
    if g > 1.0 and not null_condition(KIND_FOR_CLASS[cls], conditioning):
        raise ValueError(f"{_key(prefix, 'guidance_scale')}: {g} needs a null condition, and the "
                         f"{conditioning}-conditioned {cls} in {root} has none (use 1.0)")
    return {"denoiser": comp, "denoiser_class": cls, "kind": KIND_FOR_CLASS[cls], "autoencoder": ae_comp,
            "autoencoder_class": ae_cls, "text_encoder": text, "conditioning": conditioning, "image_shape": image_shape,
            "sample_shape": sample_shape, "scheduler_config": sched_cfg, "denoiser_config": den_cfg, "prompts": texts}


@torch.no_grad()
def encode_prompts(root: str | Path, prompts: Sequence[str], encoder: str,
                   max_sequence_length: Optional[int] = None, batch_size: int = 16
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The text encoder's outputs for ``prompts`` and the empty prompt (last): ([P + 1, L, D], mask [P + 1, L]
    for T5, None for CLIP), computed once, in full precision, on CPU."""
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    root = Path(root)
    tok = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    if encoder == "t5":
        model = T5EncoderModel.from_pretrained(str(root / "text_encoder")).eval()
        texts = [p.lower().strip() for p in prompts] + [""]
        length = int(max_sequence_length or T5_MAX_LENGTH)
    else:
        model = CLIPTextModel.from_pretrained(str(root / "text_encoder")).eval()
        texts = list(prompts) + [""]
        length = int(max_sequence_length or tok.model_max_length)
    embs, masks = [], []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i:i + batch_size]
        enc = tok(chunk, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                  return_tensors="pt")
        if encoder == "t5":
            out = model(enc.input_ids, attention_mask=enc.attention_mask)[0]
            masks.append(enc.attention_mask.to(torch.long))
        else:
            am = enc.attention_mask if getattr(model.config, "use_attention_mask", False) else None
            out = model(enc.input_ids, attention_mask=am)[0]
        embs.append(out.float())
    return torch.cat(embs), (torch.cat(masks) if masks else None)


def load_pipeline(path: str | Path, prompts: Optional[str | Path] = None, guidance_scale: float = 1.0,
                  device: str | torch.device | None = None, max_sequence_length: Optional[int] = None,
                  prefix: str = "") -> DiffusionBackbone:
    """A diffusers pipeline directory as a backbone (module docstring), in eval mode. ``prompts``: the prompt
    file a text-conditioned model is conditioned on (``labels`` then index its lines); ``guidance_scale``:
    classifier-free guidance in every forward call (1 = none)."""
    import diffusers

    root = Path(path)
    info = check_pipeline_dir(root, prompts, guidance_scale, prefix)
    cls = getattr(diffusers, info["denoiser_class"])
    net = cls.from_pretrained(str(root / info["denoiser"]), low_cpu_mem_usage=False)
    cfg = info["denoiser_config"]
    codec = None
    if info["autoencoder"] is not None:
        vae = getattr(diffusers, info["autoencoder_class"]).from_pretrained(str(root / info["autoencoder"]),
                                                                            low_cpu_mem_usage=False)
        codec = LatentCodec(vae)
    if info["conditioning"] == "class":
        num_classes = int(cfg.get("num_embeds_ada_norm") or cfg.get("num_class_embeds"))
    else:
        num_classes = 1
    bb = DiffusionBackbone(net, info["kind"], num_classes, info["sample_shape"], conditioning=info["conditioning"],
                           codec=codec, scheduler_config=info["scheduler_config"])
    if info["conditioning"] == "text":
        emb, mask = encode_prompts(root, info["prompts"], info["text_encoder"], max_sequence_length)
        attach_caption_embeddings(bb, emb, mask)
        bb.prompts = info["prompts"]
    bb.set_guidance(guidance_scale)
    bb.eval()
    if device is not None:
        bb.to(device)
    return bb


def load_source(path: str | Path, prompts: Optional[str | Path] = None, guidance_scale: float = 1.0,
                device: str | torch.device | None = None, prefix: str = "") -> DiffusionBackbone:
    """``model.<backbone>.source``: a pipeline directory (:func:`load_pipeline`), or a saved backbone or
    diffusers model directory (:func:`pipeline.models.load_backbone`) with ``guidance_scale`` set."""
    from .models import load_backbone

    if is_pipeline_dir(path):
        return load_pipeline(path, prompts, guidance_scale, device, prefix=prefix)
    bb = load_backbone(path, device=device)
    try:
        return bb.set_guidance(guidance_scale)
    except ValueError as exc:
        raise ValueError(f"{_key(prefix, str(exc))}") from None
