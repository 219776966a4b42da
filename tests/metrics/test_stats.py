"""Bootstrap statistics: FID from features equals torchmetrics', resampling weights equal resampled rows,
intervals and verdicts behave (separated rows -> holds / does not hold, identical rows -> not separable)."""
import numpy as np
import pytest
import torch

from pipeline.metrics import stats


def _feats(n, d, shift=0.0, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_fid_matches_torchmetrics_formula():
    from torchmetrics.image.fid import _compute_fid

    a, b = _feats(300, 8, 0.3, 1), _feats(400, 8, 0.0, 2) * 1.5
    ours = stats.Reference.from_features(b).fid_of(a)
    mu_a, s_a = torch.tensor(a.mean(0)), torch.tensor(np.cov(a, rowvar=False))
    mu_b, s_b = torch.tensor(b.mean(0)), torch.tensor(np.cov(b, rowvar=False))
    ref = float(_compute_fid(mu_a, s_a, mu_b, s_b))
    assert ours == pytest.approx(ref, rel=1e-6)
    assert stats.fid_between(a, b) == pytest.approx(ours)


def test_weighted_stats_equal_the_resampled_rows():
    x = _feats(50, 4)
    idx = np.random.default_rng(3).integers(0, 50, 50)
    w = np.bincount(idx, minlength=50)
    mu_w, cov_w = stats.gaussian_stats(x, w)
    mu_r, cov_r = stats.gaussian_stats(x[idx])
    np.testing.assert_allclose(mu_w, mu_r, rtol=1e-12)
    np.testing.assert_allclose(cov_w, cov_r, rtol=1e-10, atol=1e-12)


def test_verdicts_follow_the_interval():
    assert stats.verdict(-2.0, -1.0, lower_is_better=True) == "holds"
    assert stats.verdict(1.0, 2.0, lower_is_better=True) == "does not hold"
    assert stats.verdict(-1.0, 1.0, lower_is_better=True) == "not separable at this N"
    assert stats.verdict(1.0, 2.0, lower_is_better=False) == "holds"


def test_paired_bootstrap_separates_a_real_difference_and_not_noise():
    n = 400
    boot = stats.Bootstrap(n, replicates=200, seed=0)
    base = np.random.default_rng(0).normal(size=n)
    better = [base - 0.5 + 0.01 * np.random.default_rng(s).normal(size=n) for s in range(3)]
    worse = [base + 0.01 * np.random.default_rng(10 + s).normal(size=n) for s in range(3)]
    d = boot.replicate_mean(better) - boot.replicate_mean(worse)
    point = np.mean([b.mean() for b in better]) - np.mean([w.mean() for w in worse])
    lo, hi = stats.interval(point, d)
    assert lo <= point <= hi and hi < 0
    same = boot.replicate_mean(worse) - boot.replicate_mean(worse)
    assert stats.verdict(*stats.interval(0.0, same), lower_is_better=True) == "not separable at this N"


def test_fid_interval_covers_the_point_and_narrows_with_more_samples():
    ref = stats.Reference.from_features(_feats(2000, 4, 0.0, 5))
    widths = []
    for n in (100, 800):
        f = _feats(n, 4, 0.2, 6)
        boot = stats.Bootstrap(n, replicates=100, seed=1)
        point = ref.fid_of(f)
        lo, hi = stats.interval(point, boot.replicate_fid(ref, [f]))
        assert lo <= point <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0]


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="at least 10"):
        stats.Bootstrap(10, replicates=5)
    with pytest.raises(ValueError, match=r"\[N >= 2, D\]"):
        stats.gaussian_stats(np.zeros((1, 3)))
