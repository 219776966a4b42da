"""Evaluator networks trained on the reference data: a digit classifier and a tiny CLIP.

No pretrained metric network is available offline (no Inception, no CLIP), so the embedded default
evaluates samples with networks trained here, once, on the training split:

* :class:`DigitClassifier` -- a small CNN. Its penultimate embedding (``features``) is the default
  FID feature space (:mod:`pipeline.metrics.fid`); its logits give the class-conditional accuracy
  of generated samples (:mod:`pipeline.metrics.accuracy`).
* a tiny transformers ``CLIPModel`` (:func:`build_tiny_clip`, :func:`train_clip`) trained
  contrastively on (image, caption) pairs, so CLIPScore (:mod:`pipeline.metrics.clip`) measures
  image-caption agreement the same way it would with a real CLIP.

These numbers are pipeline-internal quality measures, not comparable to published FID / CLIP scores.

Image convention (project-wide): float tensors in [-1, 1], shape [N, C, H, W]. The classifier also
accepts uint8 images in [0, 255]; a 1-channel image given to a 3-channel network is repeated, a
3-channel image given to a 1-channel network is averaged over channels.
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.data import DIGIT_NAMES, caption  # one caption template for the whole project

log = logging.getLogger("pipeline")

CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier.json"
CLIP_META = "tiny_clip.json"


def caption_text(class_name: str) -> str:
    """The caption of a class (``pipeline.data.caption``)."""
    return caption(class_name)


# ----------------------------------------------------------------------------------------------
# image helpers (shared with pipeline.metrics)
# ----------------------------------------------------------------------------------------------
def check_images(images: torch.Tensor, name: str = "images") -> None:
    """Raise a clear error unless ``images`` is a 4-d [N, C, H, W] float or uint8 tensor."""
    if not torch.is_tensor(images):
        raise TypeError(f"{name}: expected a torch.Tensor [N, C, H, W], got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{name}: expected shape [N, C, H, W], got {tuple(images.shape)}")
    if not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise TypeError(f"{name}: expected float images in [-1, 1] or uint8 in [0, 255], got dtype {images.dtype}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"{name}: expected 1 or 3 channels, got {images.shape[1]}")


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (clamped) or uint8 [0, 255] -> float32 in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return ((images.float().clamp(-1.0, 1.0) + 1.0) * 0.5)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (clamped) or uint8 -> uint8 [0, 255], rounded like a saved 8-bit PNG."""
    if images.dtype == torch.uint8:
        return images
    return torch.round(to_unit_float(images) * 255.0).to(torch.uint8)


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Repeat a gray image to ``channels`` or average a colour image down to one channel."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1:
        return images.expand(-1, channels, -1, -1)
    if channels == 1:
        if images.dtype == torch.uint8:
            return torch.round(images.float().mean(dim=1, keepdim=True)).to(torch.uint8)
        return images.mean(dim=1, keepdim=True)
    raise ValueError(f"images: cannot convert {c} channels to {channels}")


def random_shift(x: torch.Tensor, max_shift: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Shift each image by an independent integer offset in [-max_shift, max_shift] (edge pixels
    replicated into the gap: the digits' border is background)."""
    if max_shift <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    gen_device = generator.device if generator is not None else x.device
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator, device=gen_device).to(x.device)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator, device=gen_device).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def _stratified_holdout(labels: torch.Tensor, fraction: float, generator: torch.Generator):
    """Indices (train, holdout): ``fraction`` of every class held out (at least one per class
    with two or more members)."""
    train_idx, hold_idx = [], []
    labels_cpu = labels.cpu()
    for c in torch.unique(labels_cpu).tolist():
        idx = torch.nonzero(labels_cpu == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        k = int(round(fraction * idx.numel()))
        if fraction > 0 and idx.numel() >= 2:
            k = max(k, 1)
        hold_idx.append(idx[:k])
        train_idx.append(idx[k:])
    return torch.cat(train_idx), torch.cat(hold_idx)


def _cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _check_training_inputs(images, labels, num_classes, steps, batch_size, lr):
    check_images(images)
    if not torch.is_tensor(labels) or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels: expected an int64 tensor [N] with N = {images.shape[0]}, got "
                         f"{getattr(labels, 'shape', type(labels))}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels: values must lie in 0..{num_classes - 1}, got "
                         f"{int(labels.min())}..{int(labels.max())}")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("lr", lr)):
        if v <= 0:
            raise ValueError(f"{name}: must be > 0, got {v}")


# ----------------------------------------------------------------------------------------------
# digit classifier
# ----------------------------------------------------------------------------------------------
class DigitClassifier(nn.Module):
    """Small CNN for [N, C, H, W] images in [-1, 1] (any H, W >= 8).

    conv3x3(C->w) - conv3x3 stride 2 (w->2w) - conv3x3 (2w->2w), GELU after each, adaptive average
    pool to 4x4, linear to ``embed_dim`` + GELU (the embedding returned by :meth:`features`), then a
    linear head to ``num_classes`` logits (:meth:`forward`). No batch norm, so train/eval behave
    the same and features do not depend on batch composition.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 8,
                 width: int = 16, embed_dim: int = 64):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels: must be 1 or 3, got {in_channels}")
        if image_size < 8:
            raise ValueError(f"image_size: must be >= 8, got {image_size}")
        if num_classes < 2:
            raise ValueError(f"num_classes: must be >= 2, got {num_classes}")
        self.config = dict(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                           width=width, embed_dim=embed_dim)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.image_size = image_size
        self.embed_dim = embed_dim
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GELU(),
        )
        self.embed = nn.Linear(2 * width * 16, embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.train_info: dict = {}

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, "images")
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1.0
        x = match_channels(x, self.in_channels)
        return x.to(self.embed.weight.dtype)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding [N, embed_dim]."""
        h = self.body(self._prepare(x))
        if h.shape[-2:] != (4, 4):  # 8x8 inputs are already 4x4 here (CPU adaptive pooling is slow)
            h = F.adaptive_avg_pool2d(h, 4)
        return F.gelu(self.embed(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [N, num_classes]."""
        return self.head(self.features(x))


@torch.no_grad()
def predict_labels(classifier: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Arg-max class of every image, in batches, on the classifier's device."""
    device = next(classifier.parameters()).device
    out = []
    for i in range(0, images.shape[0], batch_size):
        out.append(classifier(images[i:i + batch_size].to(device)).argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     steps: int = 1000, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                     holdout_fraction: float = 0.1, weight_decay: float = 1e-4,
                     width: int = 16, embed_dim: int = 64) -> DigitClassifier:
    """Train a :class:`DigitClassifier` with cross-entropy.

    Optimiser AdamW, linear warm-up over 5% of the steps then cosine decay; gradient-norm clip 1.0.
    Augmentation: random integer shifts of up to max(1, size // 8) pixels (no flips or rotations,
    which change digit identity). ``holdout_fraction`` of every class is held out; the held-out
    accuracy, the train time and the step count are stored in ``model.train_info`` (and logged).
    Runs on the device of ``images``. Returns the model in eval mode.
    """
    _check_training_inputs(images, labels, num_classes, steps, batch_size, lr)
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction: must be in [0, 1), got {holdout_fraction}")
    t0 = time.perf_counter()
    device = images.device
    gen = torch.Generator().manual_seed(seed)
    x_all = images.float() if images.dtype == torch.uint8 else images
    if images.dtype == torch.uint8:
        x_all = x_all / 127.5 - 1.0
    tr_idx, ho_idx = _stratified_holdout(labels, holdout_fraction, gen)
    x_tr, y_tr = x_all[tr_idx.to(device)], labels[tr_idx.to(device)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(images.shape[1], num_classes, min(images.shape[-2:]), width, embed_dim)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)
    max_shift = max(1, min(images.shape[-2:]) // 8)
    warmup = max(1, steps // 20)
    n = x_tr.shape[0]
    perm, pos = torch.randperm(n, generator=gen), 0
    for step in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + batch_size].to(device)
        pos += batch_size
        xb = random_shift(x_tr[idx], max_shift, gen)
        loss = F.cross_entropy(model(xb), y_tr[idx])
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, steps, lr, warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    info = {"steps": steps, "train_seconds": round(time.perf_counter() - t0, 3),
            "final_loss": float(loss.detach()), "train_count": int(n)}
    if ho_idx.numel():
        pred = predict_labels(model, x_all[ho_idx.to(device)])
        info["holdout_accuracy"] = float((pred == labels[ho_idx.to(device)].cpu()).float().mean())
        info["holdout_count"] = int(ho_idx.numel())
    model.train_info = info
    log.info("digit classifier: %s", info)
    return model


def save_classifier(model: DigitClassifier, out_dir: str | Path) -> None:
    """``classifier.safetensors`` (weights) + ``classifier.json`` (architecture and train info)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / CLASSIFIER_WEIGHTS))
    meta = {"config": model.config, "train_info": model.train_info}
    (out_dir / CLASSIFIER_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_classifier(path: str | Path, device: Optional[torch.device | str] = None) -> DigitClassifier:
    """Load a classifier saved by :func:`save_classifier` (eval mode, gradients off)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, w_file = path / CLASSIFIER_CONFIG, path / CLASSIFIER_WEIGHTS
    for f in (cfg_file, w_file):
        if not f.is_file():
            raise FileNotFoundError(f"load_classifier: {f} not found (expected a directory written by save_classifier)")
    meta = json.loads(cfg_file.read_text())
    model = DigitClassifier(**meta["config"])
    model.load_state_dict(load_file(str(w_file)))
    model.train_info = meta.get("train_info", {})
    model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model


# ----------------------------------------------------------------------------------------------
# tiny CLIP
# ----------------------------------------------------------------------------------------------
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
    _check_training_inputs(images, labels, len(names), steps, batch_size, lr)
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction: must be in [0, 1), got {holdout_fraction}")
    t0 = time.perf_counter()
    device = images.device
    size = min(images.shape[-2:])
    model, tokenizer, processor = build_tiny_clip(size, images.shape[1], seed, names, hidden_size,
                                                  num_layers, num_heads, patch_size)
    model.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    tr_idx, ho_idx = _stratified_holdout(labels, holdout_fraction, gen)
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
            g["lr"] = _cosine_lr(step, steps, lr, warmup)
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
    info = dict(getattr(model, "train_info", {}) or {})
    info["caption_template"] = caption_text("{class_name}")
    (out_dir / CLIP_META).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
