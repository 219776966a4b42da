"""pipeline.train.fp: batches, LR schedule, EMA and a short Lightning run that lowers the loss."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from pipeline import models
from pipeline.config import DiffusionConfig, TrainRun
from pipeline.train.fp import DiffusionTrainingModule, RandomBatches, train_backbone, warmup_cosine


def toy_data(n: int = 48):
    """Three classes of 8x8 images: a bright horizontal bar, a vertical bar, a square."""
    labels = torch.arange(n) % 3
    x = -torch.ones(n, 1, 8, 8)
    x[labels == 0, :, 3:5, :] = 1.0
    x[labels == 1, :, :, 3:5] = 1.0
    x[labels == 2, :, 2:6, 2:6] = 1.0
    return x, labels


def test_random_batches_cover_each_pass_and_repeat_with_seed():
    x = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1)
    y = torch.arange(10)
    it = iter(RandomBatches(x, y, batch_size=5, seed=1))
    first_pass = torch.cat([next(it)[1] for _ in range(2)])
    assert sorted(first_pass.tolist()) == list(range(10))
    bx, by = next(iter(RandomBatches(x, y, batch_size=4, seed=1)))
    assert torch.equal(bx.flatten().long(), by)  # images stay paired with labels
    again = iter(RandomBatches(x, y, batch_size=5, seed=1))
    assert torch.equal(torch.cat([next(again)[1] for _ in range(2)]), first_pass)
    big = next(iter(RandomBatches(x, y, batch_size=25, seed=0)))[1]  # larger than the dataset
    assert big.shape == (25,) and torch.bincount(big, minlength=10).min() >= 2
    with pytest.raises(ValueError, match="batch_size"):
        RandomBatches(x, y, batch_size=0, seed=0)


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0, abs=1e-12)
    values = [warmup_cosine(s, 10, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert warmup_cosine(0, 0, 4) == pytest.approx(1.0)
    assert warmup_cosine(2, 0, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def test_ema_update_follows_the_decay(tiny_backbone):
    bb = tiny_backbone("unet", classes=3, unet_attention=(False, False))
    module = DiffusionTrainingModule(bb, DiffusionConfig(), TrainRun(ema_decay=0.5))
    ema_before = [p.detach().clone() for p in module.ema.parameters()]
    with torch.no_grad():
        for p in bb.parameters():
            p.add_(1.0)
    module.update_ema()  # first update: decay = min(0.5, 2/11)
    d = 2.0 / 11.0
    for e0, e, p in zip(ema_before, module.ema.parameters(), bb.parameters()):
        torch.testing.assert_close(e, d * e0 + (1 - d) * p)
    for _ in range(40):
        module.update_ema()
    for e, p in zip(module.ema.parameters(), bb.parameters()):
        torch.testing.assert_close(e, p, rtol=1e-4, atol=1e-4)
    assert not any(p.requires_grad for p in module.ema.parameters())


def fixed_loss(backbone, x, y, diffusion, seed=123) -> float:
    """Loss on a fixed set of (t, noise) so that before/after compare like for like."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = x.repeat(4, 1, 1, 1), y.repeat(4)
    t = torch.randint(0, diffusion.num_train_timesteps, (xs.shape[0],), generator=g)
    noise = torch.randn(xs.shape, generator=g)
    from pipeline.sampling import make_training_scheduler

    noisy = make_training_scheduler(diffusion).add_noise(xs, noise, t)
    backbone.eval()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(backbone(noisy, t, ys), noise).item()


def test_short_training_lowers_the_loss_and_returns_the_ema(tiny_backbone, caplog):
    bb = tiny_backbone("unet", classes=3, unet_attention=(False, False))
    x, y = toy_data()
    diffusion = DiffusionConfig()
    before = fixed_loss(bb, x, y, diffusion)
    initial = [p.detach().clone() for p in bb.parameters()]
    run = TrainRun(steps=3, batch_size=16, lr=5e-3, warmup_steps=0, ema_decay=0.999, seed=0)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        ema = train_backbone(bb, x, y, diffusion, run)
    assert isinstance(ema, models.DiffusionBackbone) and ema is not bb and not ema.training
    assert fixed_loss(bb, x, y, diffusion) < before
    assert fixed_loss(ema, x, y, diffusion) < before
    # the EMA lies between the initial and the trained weights
    moved = [(e - p0).abs().sum() for e, p0 in zip(ema.parameters(), initial)]
    assert sum(moved) > 0
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline"]
    assert any("train unet: step 3/3" in m for m in lines)


def test_train_backbone_rejects_mismatched_data(tiny_backbone):
    bb = tiny_backbone("unet", classes=3, unet_attention=(False, False))
    x, y = toy_data(6)
    with pytest.raises(ValueError, match="sample_shape"):
        train_backbone(bb, x[:, :, :4, :4], y, DiffusionConfig(), TrainRun(steps=1), progress=False)
    with pytest.raises(ValueError, match="labels"):
        train_backbone(bb, x, y + 5, DiffusionConfig(), TrainRun(steps=1), progress=False)
    with pytest.raises(TypeError, match="backbone"):
        train_backbone(bb.net, x, y, DiffusionConfig(), TrainRun(steps=1), progress=False)
