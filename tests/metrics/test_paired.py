"""Paired fidelity metrics against the FP images: PSNR against its formula, SSIM = 1 for identical images
and falling with noise, feature distance zero for identical features, clear shape errors."""
import math

import pytest
import torch

from pipeline.metrics import paired


def _imgs(n=6, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_psnr_matches_its_formula_and_caps_identical_images():
    a = _imgs()
    b = (a + 0.1).clamp(-1, 1)
    mse = (((a + 1) / 2 - (b + 1) / 2) ** 2).flatten(1).mean(1)
    expect = 10 * torch.log10(1 / mse)
    torch.testing.assert_close(paired.psnr(b, a), expect.float(), rtol=1e-5, atol=1e-4)
    assert torch.all(paired.psnr(a, a) == 100.0)


def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    a = _imgs()
    assert torch.allclose(paired.ssim(a, a), torch.ones(6), atol=1e-6)
    g = torch.Generator().manual_seed(1)
    s = [paired.ssim((a + sd * torch.randn(a.shape, generator=g)).clamp(-1, 1), a).mean().item()
         for sd in (0.05, 0.2, 0.6)]
    assert s[0] > s[1] > s[2]
    assert paired.ssim_sigma(8, 8) == 1.0 and paired.ssim_sigma(64, 64) == 1.5


def test_feature_distance_and_bundle():
    f = torch.randn(6, 16)
    assert torch.all(paired.feature_distance(f, f) == 0)
    d = paired.feature_distance(f + 1.0, f)
    assert math.isclose(d[0].item(), 4.0 / f.norm(dim=1).mean().item(), rel_tol=1e-5)
    out = paired.paired_metrics(_imgs(), _imgs(seed=2), f, f * 0.5)
    assert set(out) == set(paired.PAIRED_METRICS) and all(v.shape == (6,) for v in out.values())


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="same noise"):
        paired.psnr(_imgs(4), _imgs(6))
