"""The results table: FID ratios against the matching FP model, DVC metrics keys, plots."""
import math

import pytest

from pipeline import report


def _rows():
    rows = []
    for b, fp_fid in [("unet", 2.0), ("dit", 4.0)]:
        rows.append(dict(backbone=b, family="fp", variant="fp", setting="FP32", fid=fp_fid, accuracy=0.95, clip_score=30.0,
                         hps=None, bitops_g=100.0, model_bytes=2**20, sec_per_image=0.01))
        for s, mult in [("W8A8", 1.1), ("W4A8", 2.0), ("W4A4", 10.0)]:
            rows.append(dict(backbone=b, family="naive", variant="naive", setting=s, fid=fp_fid * mult, accuracy=0.9 / mult,
                             clip_score=29.0, hps=None, bitops_g=10.0 / mult, model_bytes=2**18,
                             sec_per_image=0.012))
    return rows


def test_fid_ratio_is_relative_to_same_backbone_fp():
    df = report.results_frame(_rows())
    r = df[(df.backbone == "dit") & (df.setting == "W4A4")].iloc[0]
    assert math.isclose(r.fid_ratio, 10.0)
    assert (df[df.family == "fp"].fid_ratio == 1.0).all()
    assert df.iloc[0].family == "fp"  # FP rows first


def test_summary_keys_and_markdown():
    df = report.results_frame(_rows())
    s = report.summary(df)
    assert set(s) >= {"unet/fp/fp/FP32", "dit/naive/naive/W4A4"}
    assert s["unet/naive/naive/W4A8"]["fid_ratio"] == pytest.approx(2.0)
    assert "hps" not in s["unet/naive/naive/W4A8"]  # skipped metrics are absent, not zero
    # wall-clock columns differ between identical reruns: they go to timings(), never into the summary
    assert not any("sec_per_image" in v or "method_seconds" in v for v in s.values())
    t = report.timings(df)  # one entry per evaluated model: quantized ones carry their method seed
    assert "unet/fp/fp/FP32" in t and t["unet/naive/naive/W4A8#seed0"]["sec_per_image"] > 0
    md = report.markdown_report(df, failed=[{"backbone": "unet", "family": "toy", "variant": "t", "setting": "W4A4",
                                             "error": "ValueError: boom"}])
    assert "### unet" in md and "### dit" in md and "| naive | naive | W4A4 |" in md
    assert "## Failed jobs" in md and "| unet | toy | t | W4A4 | 0 | ValueError: boom |" in md


def test_rows_of_two_families_with_one_variant_name_stay_apart():
    rows = _rows() + [dict(backbone="unet", family="other", variant="naive", setting="W4A4", fid=3.0, accuracy=0.5,
                           clip_score=1.0, hps=None, bitops_g=1.0, model_bytes=1, sec_per_image=0.1)]
    s = report.summary(report.results_frame(rows))
    assert s["unet/other/naive/W4A4"]["fid"] == 3.0 and s["unet/naive/naive/W4A4"]["fid"] == 20.0


def test_focused_table_lists_rows_in_order_and_missing_ones():
    from pipeline.methods import Table

    df = report.results_frame(_rows())
    t = {**Table(title="Ablation", backbone="unet", baselines=("naive/naive",), variants=("magic",),
                 columns=("fid_ratio", "accuracy")).as_dict("toy"), "settings": ["W4A4", "W8A8"]}
    md = report.focused_table(df, t)
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert [line.split("|")[2:4] for line in lines[1:]] == [[" fp ", " FP32 "], [" naive ", " W4A4 "],
                                                            [" naive ", " W8A8 "]]
    assert "Not in this run: toy/magic W4A4, toy/magic W8A8." in md


def test_plots_are_written(tmp_path):
    df = report.results_frame(_rows())
    report.plot_fid_vs_wbits(df, tmp_path / "a.png")
    report.plot_fid_vs_bitops(df, tmp_path / "b.png")
    assert (tmp_path / "a.png").stat().st_size > 1000 and (tmp_path / "b.png").stat().st_size > 1000


def test_empty_results_is_a_clear_error():
    with pytest.raises(ValueError, match="no evaluation results"):
        report.results_frame([])


def _seeded(n=200, d=6):
    """Rows and per-sample arrays of an FP model and two 3-seed variants, ``good`` clearly closer to the
    reference than ``bad``."""
    import numpy as np

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(1000, d))
    arrays, rows = {}, []
    base = rng.normal(size=(n, d))
    arrays["unet__fp__fp__FP32"] = {"features": base, "images": np.zeros((n, 1, 8, 8))}
    rows.append(dict(backbone="unet", family="fp", variant="fp", setting="FP32", fid=0.1, accuracy=0.9,
                     clip_score=1.0, hps=None, bitops_g=1.0, model_bytes=1, sec_per_image=0.1, n_samples=n))
    for v, shift, psnr in (("good", 0.2, 30.0), ("bad", 1.0, 20.0)):
        for seed in range(3):
            f = base + shift + 0.05 * rng.normal(size=(n, d))
            arrays[f"unet__fam__{v}__W4A4__seed{seed}"] = {"features": f, "psnr": psnr + rng.normal(size=n),
                                                            "ssim": np.full(n, 0.5), "feat_dist": np.full(n, shift)}
            rows.append(dict(backbone="unet", family="fam", variant=v, setting="W4A4", seed=seed, fid=shift,
                             accuracy=0.8, clip_score=1.0, hps=None, bitops_g=1.0, model_bytes=1,
                             sec_per_image=0.1, n_samples=n, psnr=psnr))
    return rows, arrays, ref


def test_aggregate_means_over_seeds_with_intervals_and_claim_verdicts(tmp_path):
    from pipeline.methods import Claim, Table

    rows, arrays, ref = _seeded()
    df = report.results_frame(rows)
    agg, stats = report.aggregate(df, arrays.__getitem__, ref, replicates=100, seed=0)
    good = agg[agg.variant == "good"].iloc[0]
    assert good.n_seeds == 3 and good.seeds == "0,1,2"
    assert good.fid_lo <= stats.point("unet/fam/good/W4A4", "fid") <= good.fid_hi
    assert good.psnr_lo < good.psnr < good.psnr_hi
    table = {**Table(title="T", backbone="unet", claims=(
        Claim("fam/good", "fam/bad", source="paper"), Claim("fam/bad", "fam/good"),
        Claim("fam/good", "fam/missing"))).as_dict("fam"), "settings": ["W4A4"]}
    claims = report.evaluate_claims(agg, stats, [table])
    assert claims[0]["metrics"]["fid"]["verdict"] == "holds"
    assert claims[0]["metrics"]["psnr"]["verdict"] == "holds"
    assert claims[1]["metrics"]["fid"]["verdict"] == "does not hold"
    assert claims[2]["status"].startswith("not run")
    assert claims[0]["n_seeds"] == [3, 3]
    s = report.summary(agg, claims, {"seed": {"unet": {"fid": 0.2}}, "real": {}})
    assert s["claims/unet/W4A4/fam/good<fam/bad/fid"]["verdict"] == "holds"
    assert "fid_lo" in s["unet/fam/good/W4A4"] and s["noise_floor/unet/fp_other_noise"]["fid"] == 0.2
    md = report.markdown_report(agg, tables=[table], claims=claims, floor={"seed": {"unet": {"fid": 0.2}}})
    assert "**holds**" in md and "## Noise floor" in md and "## Paper claims" in md
    assert "| 3 / 3 | fid |" in md and "⚠" not in report.claims_markdown(claims)
    assert report.plot_claims(claims, tmp_path / "c.png") and (tmp_path / "c.png").stat().st_size > 1000


def test_claims_mark_a_single_seed_row():
    """A claim whose row has one method seed says so (its interval holds sample noise only)."""
    from pipeline.methods import Claim, Table

    rows, arrays, ref = _seeded()
    keep = [r for r in rows if not (r["variant"] == "bad" and r.get("seed", 0) > 0)]
    df = report.results_frame(keep)
    agg, stats = report.aggregate(df, arrays.__getitem__, ref, replicates=100, seed=0)
    table = {**Table(title="T", backbone="unet", claims=(Claim("fam/good", "fam/bad"),)).as_dict("fam"),
             "settings": ["W4A4"]}
    claims = report.evaluate_claims(agg, stats, [table])
    assert claims[0]["n_seeds"] == [3, 1]
    md = report.claims_markdown(claims)
    assert "| 3 / 1 ⚠ | fid |" in md and "| 3 / 1 ⚠ | psnr |" in md


def test_aggregate_is_deterministic():
    rows, arrays, ref = _seeded(n=100)
    df = report.results_frame(rows)
    a, _ = report.aggregate(df, arrays.__getitem__, ref, replicates=50, seed=3)
    b, _ = report.aggregate(df, arrays.__getitem__, ref, replicates=50, seed=3)
    assert report.summary(a) == report.summary(b)
