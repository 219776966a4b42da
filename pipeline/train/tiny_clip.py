"""The tiny CLIP evaluator: a transformers ``CLIPModel`` (:func:`build_tiny_clip`, :func:`train_clip`)
trained contrastively on (image, caption) pairs of the reference data, so CLIPScore
(:mod:`pipeline.metrics.clip`) measures image-caption agreement the same way it would with a real CLIP.
Pipeline-internal, not comparable to published CLIP scores. Images follow :mod:`pipeline.images`.
"""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.data import DIGIT_NAMES, caption  # one caption template for the whole project
from pipeline.images import check_images, match_channels, random_shift, to_uint8
from pipeline.train.common import check_training_inputs, cosine_lr, stratified_holdout

log = logging.getLogger("pipeline")

CLIP_META = "tiny_clip.json"


def caption_text(class_name: str) -> str:
    """The caption of a class (``pipeline.data.caption``)."""
    return caption(class_name)


_WORD_RE = re.compile(r"[^\W\d_]+|\d|[^\s\w]+|_+")


def _byte_level_words(texts: Sequence[str]) -> list[str]:
    """The lower-cased words of ``texts`` as CLIP pre-tokenises them (letters runs, single digits,
    punctuation runs), spelled in the byte-level alphabet."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_char = bytes_to_unicode()
    words = []
    for t in texts:
        for w in _WORD_RE.findall(" ".join(t.lower().split())):
            bw = "".join(byte_char[b] for b in w.encode("utf-8"))
            if bw not in words:
                words.append(bw)
    return words


def build_clip_tokenizer(texts: Sequence[str]):
    """A byte-level BPE ``CLIPTokenizer`` built in memory.

    Vocabulary: the 256 byte characters, the same 256 with the end-of-word mark ``</w>``, one merge
    chain per word of ``texts`` (left to right, so each word becomes a single token), then
    ``<|startoftext|>`` / ``<|endoftext|>`` (last, so end-of-text has the largest id as in OpenAI CLIP).
    Any other text still tokenises, into byte pieces.
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    seen = set()
    for word in _byte_level_words(texts):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        cur = pieces[0]
        for nxt in pieces[1:]:
            if (cur, nxt) not in seen:
                seen.add((cur, nxt))
                merges.append((cur, nxt))
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


def _clip_patch_size(image_size: int) -> int:
    """Patch size of the tiny CLIP's vision tower.

    Images up to 16 px: two patches per side (8x8 digits: 4x4-pixel patches, 4 tokens + class token).
    Trained from scratch on ~1k images a ViT learns much faster with few large patches (digits,
    hidden 32: a 2x2 grid reached 93% zero-shot accuracy after 400 steps, a 4x4 grid 83% after 500).
    Larger images: the largest patch that divides the image and leaves at least a 4x4 grid.
    """
    if image_size <= 16 and image_size % 2 == 0:
        return image_size // 2
    for p in range(max(1, image_size // 4), 0, -1):
        if image_size % p == 0:
            return p
    return 1  # pragma: no cover


def make_clip_image_processor(image_size: int):
    """Image processor mapping uint8 RGB [0, 255] to pixel values in [-1, 1] at ``image_size``.

    Images already at ``image_size`` are not resampled (the resize to the same size is the
    identity), so training inputs and CLIPScore inputs are bit-identical. The PIL backend is used
    when torchvision is missing (this project's default install), the torchvision one otherwise.
    """
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import CLIPImageProcessor as Processor
    else:
        from transformers import CLIPImageProcessorPil as Processor
    return Processor(size={"height": image_size, "width": image_size}, do_resize=True,
                     do_center_crop=False, crop_size={"height": image_size, "width": image_size},
                     do_rescale=True, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                     resample=2, do_convert_rgb=True)


def build_tiny_clip(image_size: int = 8, channels: int = 1, seed: int = 0,
                    class_names: Optional[Sequence[str]] = None, hidden_size: int = 32,
                    num_layers: int = 2, num_heads: int = 2, patch_size: Optional[int] = None):
    """Build ``(CLIPModel, CLIPTokenizer, CLIPImageProcessor)`` fully offline, randomly initialised.

    Text and vision towers: ``hidden_size`` wide, ``num_layers`` layers, ``num_heads`` heads, MLP 4x,
    GELU, projection ``hidden_size``. Vision input: RGB at the dataset's own ``image_size`` with the
    patch size of :func:`_clip_patch_size` (8x8 images: 4x4 patches, 4 tokens + class token).
    ``channels`` is the dataset's channel count; the network always sees RGB (gray images are
    repeated to 3 channels before the processor, as torchmetrics CLIPScore expects RGB).
    The tokenizer's vocabulary covers the words of the class captions (see :func:`build_clip_tokenizer`).
    """
    from transformers import CLIPConfig, CLIPModel

    if channels not in (1, 3):
        raise ValueError(f"channels: must be 1 or 3, got {channels}")
    if image_size < 8:
        raise ValueError(f"image_size: must be >= 8, got {image_size}")
    patch = patch_size if patch_size is not None else _clip_patch_size(image_size)
    if patch <= 0 or image_size % patch:
        raise ValueError(f"patch_size: must divide image_size {image_size}, got {patch}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size: must be divisible by num_heads ({num_heads}), got {hidden_size}")
    names = list(class_names) if class_names is not None else DIGIT_NAMES
    tokenizer = build_clip_tokenizer([caption_text(n) for n in names])
    processor = make_clip_image_processor(image_size)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=4 * hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, max_position_embeddings=32,
                         hidden_act="gelu", projection_dim=hidden_size, **special),
        vision_config=dict(hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                           num_hidden_layers=num_layers, num_attention_heads=num_heads,
                           image_size=image_size, patch_size=patch,
                           num_channels=3, hidden_act="gelu", projection_dim=hidden_size),
        projection_dim=hidden_size,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.eval()
    return model, tokenizer, processor



def clip_pixel_values(processor, images: torch.Tensor) -> torch.Tensor:
    """Run float [-1, 1] / uint8 images through the CLIP processor exactly as CLIPScore does
    (uint8 RGB [3, H, W] tensors in, pixel values out)."""
    check_images(images)
    rgb = match_channels(to_uint8(images), 3).cpu()
    return processor(images=[im for im in rgb], return_tensors="pt")["pixel_values"]


def _embeddings(out) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.pooler_output


def clip_text_embeddings(model, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """L2-normalised text embeddings [len(texts), D]."""
    device = model.logit_scale.device
    tok = tokenizer(list(texts), padding=True, return_tensors="pt")
    emb = _embeddings(model.get_text_features(input_ids=tok["input_ids"].to(device),
                                              attention_mask=tok["attention_mask"].to(device)))
    return F.normalize(emb, dim=-1)


def clip_image_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings of processed pixel values."""
    emb = _embeddings(model.get_image_features(pixel_values=pixel_values.to(model.logit_scale.device)))
    return F.normalize(emb, dim=-1)


@torch.no_grad()
def clip_zero_shot_accuracy(model, tokenizer, processor, images: torch.Tensor, labels: torch.Tensor,
                            class_names: Sequence[str], batch_size: int = 500) -> float:
    """Fraction of images whose most similar caption (among all class captions) is their own."""
    text = clip_text_embeddings(model, tokenizer, [caption_text(n) for n in class_names])
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        img = clip_image_embeddings(model, clip_pixel_values(processor, images[i:i + batch_size]))
        correct += int((( img @ text.T).argmax(dim=1).cpu() == labels[i:i + batch_size].cpu()).sum())
    return correct / max(1, images.shape[0])


def train_clip(images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
               steps: int = 600, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
               holdout_fraction: float = 0.1, weight_decay: float = 1e-4, hidden_size: int = 32,
               num_layers: int = 2, num_heads: int = 2, patch_size: Optional[int] = None):
    """Train a tiny CLIP contrastively on (image, caption) pairs; returns (model, tokenizer, processor).

    Captions are ``"a handwritten digit {class_name}"``. With one caption per class a batch holds
    many identical captions, so the usual in-batch InfoNCE would treat copies of the positive caption
    as negatives. The loss is therefore the symmetric InfoNCE over de-duplicated captions:
    image->text cross-entropy against all class captions, plus text->image with every same-class
    image of the batch as a positive (-log of the softmax mass on the positives), averaged over the
    classes present. Logit scale learnable (CLIP init 1/0.07, clamped at 100).

    Pixel values come from the saved processor itself (computed once), so training sees exactly
    what CLIPScore will feed the model. Augmentation: random shifts of up to max(1, size // 8) px.
    AdamW, 5% warm-up + cosine decay, gradient clip 1.0. ``holdout_fraction`` of every class is
    held out and its zero-shot accuracy stored in ``model.train_info``. Runs on the device of ``images``.
    """
    names = list(class_names)
    check_training_inputs(images, labels, len(names), steps, batch_size, lr)
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction: must be in [0, 1), got {holdout_fraction}")
    t0 = time.perf_counter()
    device = images.device
    size = min(images.shape[-2:])
    model, tokenizer, processor = build_tiny_clip(size, images.shape[1], seed, names, hidden_size,
                                                  num_layers, num_heads, patch_size)
    model.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    tr_idx, ho_idx = stratified_holdout(labels, holdout_fraction, gen)
    pixels = clip_pixel_values(processor, images[tr_idx.to(device)]).to(device)
    y_tr = labels[tr_idx.to(device)]
    tok = tokenizer([caption_text(n) for n in names], padding=True, return_tensors="pt")
    ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)
    max_shift = max(1, size // 8)
    warmup = max(1, steps // 20)
    n = pixels.shape[0]
    perm, pos = torch.randperm(n, generator=gen), 0
    for step in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + batch_size].to(device)
        pos += batch_size
        img = F.normalize(_embeddings(model.get_image_features(
            pixel_values=random_shift(pixels[idx], max_shift, gen))), dim=-1)
        txt = F.normalize(_embeddings(model.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100.0) * img @ txt.T      # [B, K]
        y = y_tr[idx]
        loss_i2t = F.cross_entropy(logits, y)
        # text -> image: for each class present, softmax over the batch's images, positives = its images
        log_p = logits.T.log_softmax(dim=1)                                    # [K, B]
        pos_mask = F.one_hot(y, len(names)).T.bool()                           # [K, B]
        present = pos_mask.any(dim=1)
        loss_t2i = -torch.logsumexp(log_p.masked_fill(~pos_mask, float("-inf")), dim=1)[present].mean()
        loss = 0.5 * (loss_i2t + loss_t2i)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    info = {"steps": steps, "train_seconds": round(time.perf_counter() - t0, 3),
            "final_loss": float(loss.detach()), "train_count": int(n)}
    if ho_idx.numel():
        info["holdout_zero_shot_accuracy"] = clip_zero_shot_accuracy(
            model, tokenizer, processor, images[ho_idx.to(device)], labels[ho_idx.to(device)], names)
        info["holdout_count"] = int(ho_idx.numel())
    info["class_names"] = names
    model.train_info = info
    log.info("tiny CLIP: %s", {k: v for k, v in info.items() if k != "class_names"})
    return model, tokenizer, processor


def save_clip(model, tokenizer, processor, out_dir: str | Path) -> None:
    """``save_pretrained`` of model, tokenizer and image processor into one directory (loadable by
    :func:`pipeline.metrics.clip.load_clip` and by ``CLIPModel/CLIPProcessor.from_pretrained``),
    plus ``tiny_clip.json`` with the training info."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    processor.save_pretrained(str(out_dir))
    from pipeline.io import TIMING_SUFFIX, split_timings

    info, timing = split_timings(dict(getattr(model, "train_info", {}) or {}))  # wall clock: a side file
    info["caption_template"] = caption_text("{class_name}")
    (out_dir / CLIP_META).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    (out_dir / f"{Path(CLIP_META).stem}{TIMING_SUFFIX}").write_text(json.dumps(timing, sort_keys=True) + "\n")
