"""Embedded datasets and image-folder loading.

Images are float32 tensors in [-1, 1] with shape [N, C, H, W]; labels are int64 in 0..num_classes-1.
The embedded default is scikit-learn's bundled 8x8 digits (1797 images, 10 classes), which needs no
download. Any other ``source`` is a local folder with one sub-folder per class (the sub-folder names,
sorted, are the class names).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pipeline.config import PrepareConfig
from pipeline.io import read_json, save_safetensors, write_json

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLITS = ("train", "reference")


def caption(class_name: str) -> str:
    """The text prompt of a class, shared by the text-conditioned evaluators."""
    return f"a handwritten digit {class_name}"


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _finish(images01: torch.Tensor, cfg: PrepareConfig) -> torch.Tensor:
    """[N, c, h, w] in [0, 1] -> [N, cfg.channels, S, S] in [-1, 1]."""
    x = _resize(images01.float(), cfg.image_size).clamp(0.0, 1.0)
    if x.shape[1] != cfg.channels:
        if x.shape[1] == 1:
            x = x.repeat(1, cfg.channels, 1, 1)
        else:  # RGB -> grey (ITU-R 601 luma), then repeat if needed
            w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
            x = (x[:, :3] * w).sum(1, keepdim=True).repeat(1, cfg.channels, 1, 1)
    return (x * 2.0 - 1.0).contiguous()


def _load_digits(cfg: PrepareConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    return _finish(x, cfg), y, list(DIGIT_NAMES)


def _load_folder(cfg: PrepareConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from PIL import Image

    root = Path(cfg.source).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"prepare.source: image folder not found: {root} (use 'digits' for the embedded dataset, "
            "or a folder with one sub-folder of images per class)"
        )
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"prepare.source: {root} has no class sub-folders (expected one sub-folder per class)")
    mode = "L" if cfg.channels == 1 else "RGB"
    images, labels = [], []
    for idx, d in enumerate(class_dirs):
        files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(
                f"prepare.source: class folder {d} holds no images (suffixes {', '.join(IMAGE_SUFFIXES)})"
            )
        for f in files:
            with Image.open(f) as im:
                im = im.convert(mode).resize((cfg.image_size, cfg.image_size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
            if arr.ndim == 2:
                arr = arr[None]
            else:
                arr = arr.transpose(2, 0, 1)
            images.append(torch.from_numpy(arr.copy()))
            labels.append(idx)
    x = torch.stack(images)
    return _finish(x, cfg), torch.tensor(labels, dtype=torch.int64), [d.name for d in class_dirs]


def load_images(cfg: PrepareConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Load the dataset named by ``cfg.source`` -> (images [N,C,S,S] in [-1,1], labels [N], class names).

    ``"digits"``: scikit-learn digits (0..16 grey levels), resized bilinearly to ``cfg.image_size`` and
    repeated to ``cfg.channels``. Otherwise ``cfg.source`` is a folder with one sub-folder per class.
    """
    if not isinstance(cfg, PrepareConfig):
        raise TypeError(f"cfg: expected a PrepareConfig, got {type(cfg).__name__}")
    if cfg.source == "digits":
        return _load_digits(cfg)
    return _load_folder(cfg)


def split_reference(
    images: torch.Tensor, labels: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stratified split -> (train_x, train_y, ref_x, ref_y).

    Each class sends round(fraction * n_class) of its images (at least one, and at least one left
    for training when the class has two or more) to the reference set, chosen by a seeded permutation.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction: must be in (0, 1), got {fraction!r}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images and labels: lengths differ ({images.shape[0]} vs {labels.shape[0]})")
    g = torch.Generator().manual_seed(int(seed))
    ref_idx, train_idx = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        k = int(round(fraction * idx.numel()))
        k = max(1, min(k, idx.numel() - 1)) if idx.numel() > 1 else 0
        ref_idx.append(idx[:k])
        train_idx.append(idx[k:])
    tr = torch.cat(train_idx).sort().values
    rf = torch.cat(ref_idx).sort().values
    return images[tr], labels[tr], images[rf], labels[rf]


def save_dataset(
    out_dir: str | Path,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    ref_x: torch.Tensor,
    ref_y: torch.Tensor,
    class_names: list[str],
) -> None:
    """Write ``train.safetensors``, ``reference.safetensors`` (keys images, labels) and ``meta.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, x, y in (("train", train_x, train_y), ("reference", ref_x, ref_y)):
        save_safetensors(
            {"images": x.detach().float().contiguous().cpu(), "labels": y.detach().long().contiguous().cpu()},
            str(out / f"{name}.safetensors"),
        )
    write_json(
        out / "meta.json",
        {
            "class_names": list(class_names),
            "num_classes": len(class_names),
            "image_size": int(train_x.shape[-1]),
            "channels": int(train_x.shape[1]),
            "counts": {"train": int(train_x.shape[0]), "reference": int(ref_x.shape[0])},
            "train_class_counts": torch.bincount(train_y, minlength=len(class_names)).tolist(),
            "reference_class_counts": torch.bincount(ref_y, minlength=len(class_names)).tolist(),
        },
    )


def load_split(data_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one split written by :func:`save_dataset` -> (images, labels)."""
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not allowed (allowed values: {', '.join(SPLITS)})")
    path = Path(data_dir) / f"{split}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{split} split not found: {path} (run the prepare stage first)")
    t = load_file(str(path))
    return t["images"], t["labels"]


def load_meta(data_dir: str | Path) -> dict:
    return read_json(Path(data_dir) / "meta.json", what="dataset meta.json")
