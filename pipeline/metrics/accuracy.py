"""Class-conditional accuracy: how often a generated image is recognised as the class it was
sampled for, judged by the reference-trained :class:`~pipeline.train.classifier.DigitClassifier`."""
from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.images import check_images
from pipeline.train.classifier import predict_labels


def conditional_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                         batch_size: int = 500) -> float:
    """Fraction of ``images`` (float [-1, 1] or uint8, [N, C, H, W]) whose arg-max class under
    ``classifier`` equals ``labels`` (int [N]). Runs on the classifier's device, in batches."""
    check_images(images)
    if not torch.is_tensor(labels) or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels: expected an integer tensor [N] with N = {images.shape[0]} (one label per "
                         f"image), got {tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__}")
    if labels.is_floating_point():
        raise TypeError(f"labels: expected an integer tensor, got dtype {labels.dtype}")
    if images.shape[0] == 0:
        raise ValueError("images: empty batch, accuracy is undefined")
    num_classes = getattr(classifier, "num_classes", None)
    if num_classes is not None and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels: values must lie in 0..{num_classes - 1}, "
                         f"got {int(labels.min())}..{int(labels.max())}")
    was_training = classifier.training
    classifier.eval()
    try:
        pred = predict_labels(classifier, images, batch_size)
    finally:
        classifier.train(was_training)
    return float((pred == labels.cpu().long()).float().mean())
