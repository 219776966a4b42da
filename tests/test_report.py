"""The results table: FID ratios against the matching FP model, DVC metrics keys, plots."""
import math

import pytest

from pipeline import report


def _rows():
    rows = []
    for b, fp_fid in [("unet", 2.0), ("dit", 4.0)]:
        rows.append(dict(backbone=b, method="fp", setting="FP32", fid=fp_fid, accuracy=0.95, clip_score=30.0,
                         hps=None, bitops_g=100.0, model_bytes=2**20, sec_per_image=0.01))
        for s, mult in [("W8A8", 1.1), ("W4A8", 2.0), ("W4A4", 10.0)]:
            rows.append(dict(backbone=b, method="naive", setting=s, fid=fp_fid * mult, accuracy=0.9 / mult,
                             clip_score=29.0, hps=None, bitops_g=10.0 / mult, model_bytes=2**18,
                             sec_per_image=0.012))
    return rows


def test_fid_ratio_is_relative_to_same_backbone_fp():
    df = report.results_frame(_rows())
    r = df[(df.backbone == "dit") & (df.setting == "W4A4")].iloc[0]
    assert math.isclose(r.fid_ratio, 10.0)
    assert (df[df.method == "fp"].fid_ratio == 1.0).all()
    assert df.iloc[0].method == "fp"  # FP rows first


def test_summary_keys_and_markdown():
    df = report.results_frame(_rows())
    s = report.summary(df)
    assert set(s) >= {"unet/fp/FP32", "dit/naive/W4A4"}
    assert s["unet/naive/W4A8"]["fid_ratio"] == pytest.approx(2.0)
    assert "hps" not in s["unet/naive/W4A8"]  # skipped metrics are absent, not zero
    md = report.markdown_report(df)
    assert "### unet" in md and "### dit" in md and "| naive | W4A4 |" in md


def test_focused_table_lists_rows_in_order_and_missing_ones():
    from pipeline.config import ReportTable

    df = report.results_frame(_rows())
    t = ReportTable(title="Ablation", backbone="unet", methods=["naive", "magic"], settings=["W4A4", "W8A8"],
                    columns=["fid_ratio", "accuracy"])
    md = report.focused_table(df, t)
    lines = [l for l in md.splitlines() if l.startswith("| ")]
    assert [l.split("|")[1:3] for l in lines[1:]] == [[" fp ", " FP32 "], [" naive ", " W4A4 "], [" naive ", " W8A8 "]]
    assert "Not in this run: magic W4A4, magic W8A8." in md


def test_plots_are_written(tmp_path):
    df = report.results_frame(_rows())
    report.plot_fid_vs_wbits(df, tmp_path / "a.png")
    report.plot_fid_vs_bitops(df, tmp_path / "b.png")
    assert (tmp_path / "a.png").stat().st_size > 1000 and (tmp_path / "b.png").stat().st_size > 1000


def test_empty_results_is_a_clear_error():
    with pytest.raises(ValueError, match="no evaluation results"):
        report.results_frame([])
