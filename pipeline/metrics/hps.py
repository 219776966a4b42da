"""HPSv2 (Human Preference Score v2, Wu et al. 2023, arXiv 2306.09341) without open_clip / torchvision.

HPSv2 is an OpenCLIP ViT-H/14 fine-tuned on human preference pairs; its score for (image, prompt) is
the cosine similarity of the normalised image and text embeddings (``hpsv2.score`` reports it as a
fraction; papers quote 100x that). Here: ``score = 100 * cos(image_emb, text_emb)`` per pair,
reported as the mean over pairs.

The checkpoint (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``) is a torch state dict
(possibly under ``"state_dict"``, possibly with a ``module.`` prefix) in OpenCLIP layout. It is read
with ``torch.load(weights_only=True)``, the tower sizes are inferred from tensor shapes, and the
tensors are renamed into a transformers ``CLIPModel``:

=========================================================  ===============================================
OpenCLIP                                                    transformers CLIPModel
=========================================================  ===============================================
visual.conv1.weight                                         vision_model.embeddings.patch_embedding.weight
visual.class_embedding                                      vision_model.embeddings.class_embedding
visual.positional_embedding                                 vision_model.embeddings.position_embedding.weight
visual.ln_pre                                               vision_model.pre_layrnorm
visual.transformer.resblocks.N.ln_1 / ln_2                  vision_model.encoder.layers.N.layer_norm1 / 2
...resblocks.N.attn.in_proj_weight/bias (q;k;v stacked)     ...layers.N.self_attn.{q,k,v}_proj.weight/bias
...resblocks.N.attn.out_proj                                ...layers.N.self_attn.out_proj
...resblocks.N.mlp.c_fc / c_proj                            ...layers.N.mlp.fc1 / fc2
visual.ln_post                                              vision_model.post_layernorm
visual.proj [W, D]                                          visual_projection.weight [D, W] (transposed)
token_embedding / positional_embedding                      text_model.embeddings.token / position_embedding
transformer.resblocks.N.*                                   text_model.encoder.layers.N.* (as above)
ln_final                                                    text_model.final_layer_norm
text_projection [W, D]                                      text_projection.weight [D, W] (transposed)
logit_scale                                                 logit_scale
=========================================================  ===============================================

Semantics match OpenCLIP's: ``ln_post`` on the class token then ``proj``; causal text attention,
text pooled at the end-of-text token (OpenCLIP: arg-max token id; transformers: first end-of-text
id -- the same position, since end-of-text has the largest id in the CLIP vocabulary); exact GELU
(ViT-H-14 is not a QuickGELU model); LayerNorm eps 1e-5.

Head counts cannot be read from shapes: the defaults follow OpenCLIP's configs (head width 64;
ViT-H/14's vision tower, width 1280, uses head width 80 -> 16 heads). Pass ``vision_heads`` /
``text_heads`` for other models.

Image preprocessing follows OpenCLIP's eval transform: 8-bit rounding (as a saved image), resize of
the shorter side to the model's input size (bicubic, antialiased; skipped when already that size),
centre crop, OpenAI CLIP mean/std normalisation. The tokenizer is a local CLIP tokenizer directory
(``tokenizer_dir``; OpenCLIP uses the OpenAI CLIP BPE, e.g. the tokenizer files of
``openai/clip-vit-base-patch32``), padded/truncated to the checkpoint's context length.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from pipeline.images import check_images, match_channels, to_uint8

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_BLOCK_PARTS = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_IGNORED = {"attn_mask"}  # causal-mask buffer some OpenCLIP versions saved; rebuilt by transformers


def load_openclip_state(checkpoint: str | Path) -> dict:
    """The tensor state dict of an OpenCLIP/HPSv2 checkpoint (``weights_only=True``)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"eval.hps.checkpoint: HPSv2 checkpoint not found: {path}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"eval.hps.checkpoint: {path} is not loadable with "
                         f"torch.load(weights_only=True): {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"eval.hps.checkpoint: {path} does not hold a tensor state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _num_blocks(state: dict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in state for m in [pat.match(k)] if m}
    if not idx:
        raise ValueError(f"HPSv2 checkpoint: no transformer blocks under '{prefix}N.' (not an OpenCLIP state dict?)")
    return max(idx) + 1


def _default_heads(width: int, vision: bool) -> int:
    head_width = 80 if (vision and width == 1280) else 64
    return max(1, width // head_width)


def openclip_config(state: dict, vision_heads: Optional[int] = None, text_heads: Optional[int] = None,
                    eos_token_id: Optional[int] = None, bos_token_id: Optional[int] = None,
                    pad_token_id: Optional[int] = None):
    """A transformers ``CLIPConfig`` with the tower sizes read from the OpenCLIP tensors."""
    from transformers import CLIPConfig

    need = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
            "positional_embedding", "text_projection"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"HPSv2 checkpoint: missing OpenCLIP keys {missing} (expected an OpenCLIP ViT state dict)")
    conv = state["visual.conv1.weight"]
    v_width, patch = conv.shape[0], conv.shape[-1]
    grid = int(round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    if grid * grid + 1 != state["visual.positional_embedding"].shape[0]:
        raise ValueError("HPSv2 checkpoint: visual.positional_embedding is not 1 + grid^2 positions")
    v_layers = _num_blocks(state, "visual.transformer.resblocks.")
    v_mlp = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    vocab, t_width = state["token_embedding.weight"].shape
    ctx = state["positional_embedding"].shape[0]
    t_layers = _num_blocks(state, "transformer.resblocks.")
    t_mlp = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    proj_dim = state["visual.proj"].shape[1]
    if state["text_projection"].shape[1] != proj_dim:
        raise ValueError("HPSv2 checkpoint: visual.proj and text_projection have different output sizes")
    vh = vision_heads or _default_heads(v_width, True)
    th = text_heads or _default_heads(t_width, False)
    for name, w, h in (("vision_heads", v_width, vh), ("text_heads", t_width, th)):
        if w % h:
            raise ValueError(f"{name}: {h} heads do not divide the tower width {w}")
    special = {k: v for k, v in (("eos_token_id", eos_token_id), ("bos_token_id", bos_token_id),
                                 ("pad_token_id", pad_token_id)) if v is not None}
    return CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=t_width, intermediate_size=t_mlp,
                         num_hidden_layers=t_layers, num_attention_heads=th, max_position_embeddings=ctx,
                         hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=proj_dim, **special),
        vision_config=dict(hidden_size=v_width, intermediate_size=v_mlp, num_hidden_layers=v_layers,
                           num_attention_heads=vh, image_size=grid * patch, patch_size=patch, num_channels=3,
                           hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=proj_dim),
        projection_dim=proj_dim,
    )


def openclip_to_transformers(state: dict) -> dict:
    """Rename (and split / transpose) OpenCLIP tensors into a transformers ``CLIPModel`` state dict.
    Raises ValueError naming any OpenCLIP key that has no counterpart (e.g. layer-scale ``ls_1``)."""
    out: dict = {}
    used = set()

    def put(src: str, dst: str, fn=None):
        t = state[src]
        out[dst] = fn(t) if fn is not None else t
        used.add(src)

    for _tower, src_prefix, dst_prefix in (("vision", "visual.transformer.resblocks.", "vision_model.encoder.layers."),
                                          ("text", "transformer.resblocks.", "text_model.encoder.layers.")):
        for i in range(_num_blocks(state, src_prefix)):
            s, d = f"{src_prefix}{i}.", f"{dst_prefix}{i}."
            for part, new in _BLOCK_PARTS.items():
                if s + part in state:
                    put(s + part, d + new)
            for kind in ("weight", "bias"):
                key = f"{s}attn.in_proj_{kind}"
                if key in state:
                    q, k, v = state[key].chunk(3, dim=0)
                    out[f"{d}self_attn.q_proj.{kind}"] = q
                    out[f"{d}self_attn.k_proj.{kind}"] = k
                    out[f"{d}self_attn.v_proj.{kind}"] = v
                    used.add(key)
    put("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight")
    put("visual.class_embedding", "vision_model.embeddings.class_embedding")
    put("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight")
    for a, b in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for kind in ("weight", "bias"):
            put(f"visual.{a}.{kind}", f"vision_model.{b}.{kind}")
    put("visual.proj", "visual_projection.weight", lambda t: t.t().contiguous())
    put("token_embedding.weight", "text_model.embeddings.token_embedding.weight")
    put("positional_embedding", "text_model.embeddings.position_embedding.weight")
    for kind in ("weight", "bias"):
        put(f"ln_final.{kind}", f"text_model.final_layer_norm.{kind}")
    put("text_projection", "text_projection.weight", lambda t: t.t().contiguous())
    put("logit_scale", "logit_scale", lambda t: t.reshape(()))
    left = sorted(k for k in state if k not in used and k not in _IGNORED)
    if left:
        raise ValueError(f"HPSv2 checkpoint: {len(left)} OpenCLIP keys have no transformers counterpart "
                         f"(unsupported architecture variant): {left[:6]}")
    return out


def build_clip_from_openclip(state: dict, vision_heads: Optional[int] = None, text_heads: Optional[int] = None,
                             tokenizer=None):
    """A transformers ``CLIPModel`` (eval mode) holding the OpenCLIP weights of ``state``."""
    from transformers import CLIPModel

    special = {}
    if tokenizer is not None:
        special = dict(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = openclip_config(state, vision_heads, text_heads, **special)
    mapped = openclip_to_transformers(state)
    # build on the meta device: a ViT-H/14 is ~1B parameters, random init would be wasted work
    with torch.device("meta"):
        model = CLIPModel(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in mapped]
    unexpected = [k for k in mapped if k not in expected]
    if missing or unexpected:
        raise ValueError(f"HPSv2 checkpoint: key mapping incomplete: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    bad = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in mapped.items()
           if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise ValueError(f"HPSv2 checkpoint: shape mismatch after mapping: {bad[:5]}")
    model.load_state_dict({k: v.float() for k, v in mapped.items()}, strict=True, assign=True)
    for module in model.modules():  # non-persistent buffers stayed on meta
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                if name != "position_ids":
                    raise RuntimeError(f"unexpected non-persistent buffer {name} in {type(module).__name__}")
                module._buffers[name] = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
    return model.eval().requires_grad_(False)


class HPSv2Metric:
    """HPSv2 score of (image, prompt) pairs: mean of 100 * cos(image_emb, text_emb)."""

    def __init__(self, checkpoint: str | Path, tokenizer_dir: str | Path,
                 device: Optional[torch.device | str] = None, vision_heads: Optional[int] = None,
                 text_heads: Optional[int] = None, batch_size: int = 16):
        from transformers import CLIPTokenizer

        if batch_size <= 0:
            raise ValueError(f"batch_size: must be > 0, got {batch_size}")
        state = load_openclip_state(checkpoint)
        tok_dir = Path(tokenizer_dir)
        if not tok_dir.is_dir():
            raise FileNotFoundError(f"tokenizer_dir: CLIP tokenizer directory not found: {tok_dir}")
        self.tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
        rows = state["token_embedding.weight"].shape[0]
        if len(self.tokenizer) != rows:  # e.g. the tiny CLIP's tokenizer given for a real checkpoint
            raise ValueError(f"tokenizer_dir: the tokenizer in {tok_dir} has {len(self.tokenizer)} tokens but the "
                             f"checkpoint's token_embedding has {rows} rows; HPSv2 needs the tokenizer it was "
                             "trained with (the OpenAI CLIP BPE, 49408 tokens)")
        self.model = build_clip_from_openclip(state, vision_heads, text_heads, self.tokenizer)
        if device is not None:
            self.model.to(device)
        self.batch_size = batch_size
        self.image_size = self.model.config.vision_config.image_size
        self.context_length = self.model.config.text_config.max_position_embeddings

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """float [-1, 1] / uint8 [N, C, H, W] -> normalised [N, 3, S, S] pixel values."""
        check_images(images)
        x = match_channels(to_uint8(images), 3).float() / 255.0
        s = self.image_size
        h, w = x.shape[-2:]
        if (h, w) != (s, s):
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
            top, left = (nh - s) // 2, (nw - s) // 2
            x = x[..., top:top + s, left:left + s]
        mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Projected (unnormalised) image embeddings [N, D]."""
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            px = self.preprocess(images[i:i + self.batch_size]).to(self.device)
            vis = self.model.vision_model(pixel_values=px)
            out.append(self.model.visual_projection(vis.pooler_output).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Projected (unnormalised) text embeddings [N, D]."""
        out = []
        for i in range(0, len(prompts), self.batch_size):
            tok = self.tokenizer(list(prompts[i:i + self.batch_size]), padding="max_length", truncation=True,
                                 max_length=self.context_length, return_tensors="pt")
            txt = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                        attention_mask=tok["attention_mask"].to(self.device))
            out.append(self.model.text_projection(txt.pooler_output).float().cpu())
        return torch.cat(out)

    def pair_scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """100 * cos(image_emb, text_emb) per pair [N]."""
        check_images(images)
        if isinstance(prompts, str) or len(prompts) != images.shape[0]:
            raise ValueError(f"prompts: expected a list of {images.shape[0]} strings (one per image)")
        return 100.0 * F.cosine_similarity(self.image_embeddings(images), self.text_embeddings(prompts), dim=-1)

    def compute(self, images: torch.Tensor, prompts: Sequence[str]) -> float:
        """Mean HPSv2 score (x100) over the pairs."""
        return float(self.pair_scores(images, prompts).mean())
