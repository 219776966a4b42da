"""CLIPScore (Hessel et al. 2021) with a local transformers CLIP, through torchmetrics.

CLIPScore = max(100 * mean_i cos(E_image_i, E_caption_i), 0) (torchmetrics clamps the mean).
The model comes from a local directory written by ``save_pretrained``: the embedded tiny CLIP
trained by :func:`pipeline.train.tiny_clip.train_clip`, or a real CLIP (``eval.clip.model_dir``,
e.g. a downloaded ``openai/clip-vit-base-patch16`` for paper-comparable numbers). Nothing is
fetched from a hub.

Two compatibility points (see references/environment.md §2.3):
* torchmetrics only loads hub names itself, so it is given a callable returning (model, processor);
* transformers 5 returns model outputs from ``get_image_features`` / ``get_text_features`` where
  torchmetrics 1.9 expects tensors; :class:`CLIPModelV5Compat` returns the pooled projection tensor.

Images: float [-1, 1] [N, C, H, W] (or uint8 [0, 255]); they are rounded to uint8, gray images
repeated to RGB, and handed to torchmetrics as uint8 [N, 3, H, W] on the model's device.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

from pipeline.images import check_images, match_channels, to_uint8


class CLIPModelV5Compat(CLIPModel):
    """``CLIPModel`` whose feature getters return tensors (the transformers 4 behaviour)."""

    def get_image_features(self, *args, **kwargs):
        out = super().get_image_features(*args, **kwargs)
        return out if torch.is_tensor(out) else out.pooler_output

    def get_text_features(self, *args, **kwargs):
        out = super().get_text_features(*args, **kwargs)
        return out if torch.is_tensor(out) else out.pooler_output


def load_clip_processor(model_dir: str | Path) -> CLIPProcessor:
    """Tokenizer + image processor of a local CLIP directory (PIL image backend when torchvision is
    missing, which reads the same ``preprocessor_config.json``)."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import CLIPImageProcessor as ImageProcessor
    else:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    return CLIPProcessor(image_processor=ImageProcessor.from_pretrained(str(model_dir)),
                         tokenizer=CLIPTokenizer.from_pretrained(str(model_dir)))


def load_clip(model_dir: str | Path, device: Optional[torch.device | str] = None):
    """``(CLIPModelV5Compat, CLIPProcessor)`` from a local transformers CLIP directory (eval mode)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"eval.clip.model_dir: {model_dir} is not a transformers CLIP directory "
                                "(no config.json); expected a directory written by save_pretrained")
    model = CLIPModelV5Compat.from_pretrained(str(model_dir)).eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model, load_clip_processor(model_dir)


class CLIPScoreMetric:
    """torchmetrics ``CLIPScore`` on a local CLIP. ``compute(images, captions) -> float``."""

    def __init__(self, model_dir: str | Path, device: Optional[torch.device | str] = None,
                 batch_size: int = 250):
        from torchmetrics.multimodal.clip_score import CLIPScore

        if batch_size <= 0:
            raise ValueError(f"batch_size: must be > 0, got {batch_size}")
        self.model, self.processor = load_clip(model_dir, device)
        self.batch_size = batch_size
        self.metric = CLIPScore(model_name_or_path=lambda: (self.model, self.processor))
        self.metric.to(self.device)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def _rgb_uint8(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        check_images(images)
        if isinstance(captions, str) or len(captions) != images.shape[0]:
            raise ValueError(f"captions: expected a list of {images.shape[0]} strings (one per image), got "
                             f"{'a single string' if isinstance(captions, str) else len(captions)}")
        return match_channels(to_uint8(images), 3).contiguous()

    @torch.no_grad()
    def compute(self, images: torch.Tensor, captions: Sequence[str]) -> float:
        """CLIPScore of (image, caption) pairs, averaged over the pairs."""
        rgb = self._rgb_uint8(images, captions)
        self.metric.reset()
        for i in range(0, rgb.shape[0], self.batch_size):
            self.metric.update(rgb[i:i + self.batch_size].to(self.device), list(captions[i:i + self.batch_size]))
        return float(self.metric.compute())

    @torch.no_grad()
    def pair_scores(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """Per-pair 100 * cos(image, caption) [N], unclamped (same preprocessing as :meth:`compute`)."""
        rgb = self._rgb_uint8(images, captions)
        out = []
        for i in range(0, rgb.shape[0], self.batch_size):
            batch = rgb[i:i + self.batch_size]
            proc = self.processor(text=list(captions[i:i + self.batch_size]), images=[im for im in batch.cpu()],
                                  return_tensors="pt", padding=True)
            img = self.model.get_image_features(pixel_values=proc["pixel_values"].to(self.device))
            txt = self.model.get_text_features(input_ids=proc["input_ids"].to(self.device),
                                               attention_mask=proc["attention_mask"].to(self.device))
            out.append(100 * torch.nn.functional.cosine_similarity(img, txt, dim=-1).cpu())
        return torch.cat(out)
