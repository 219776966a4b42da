#!/usr/bin/env python
"""report: one table over all evaluations -> reports/summary.json (DVC metrics, keyed by
backbone/family/variant/setting; no timings: those go to reports/timings.json), the comparison tables the families declare, reports/results.md, reports/results.csv and plots (FID vs weight bits,
FID vs BitOPs, sample montages), all logged to MLflow."""
from _common import log_path, main, parser, require


def run(args):
    from pipeline.config import ReportConfig, TrackingConfig, load_section, to_dict

    cfg = load_section("report", ReportConfig, args.params)
    trk = load_section("tracking", TrackingConfig, args.params)
    results = require(f"{args.eval}/results.json", "evaluation results (stage evaluate)")

    import logging
    import shutil
    from pathlib import Path

    from pipeline import report
    from pipeline.io import atomic_file, read_json, write_json
    from pipeline.tracking import stage_run

    log = logging.getLogger("pipeline")
    out = Path(args.out)
    with stage_run("report", params=to_dict(cfg), experiment=trk.experiment, uri=trk.uri,
                   inputs=[results], log_file=log_path("report")) as run_:
        res = read_json(results, "evaluation results")
        df = report.results_frame(res["rows"])
        # plots first (into a scratch folder), then the metric files, each replaced atomically
        scratch = out / ".plots-tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        report.plot_fid_vs_wbits(df, scratch / "fid_vs_wbits.png")
        report.plot_fid_vs_bitops(df, scratch / "fid_vs_bitops.png")
        for b in sorted(df["backbone"].unique()):
            report.sample_montage(df, Path(args.eval) / "grids", b, scratch / f"samples_{b}.png")
        plots = out / "plots"
        if plots.exists():
            shutil.rmtree(plots)
        scratch.rename(plots)
        write_json(out / "summary.json", report.summary(df))
        write_json(out / "timings.json", report.timings(df))
        with atomic_file(out / "results.md") as fh:
            fh.write(report.markdown_report(df, tables=res.get("tables"), failed=res.get("failed")))
        with atomic_file(out / "results.csv") as fh:
            df[[c for c in report.COLUMNS + ["wbits", "abits", "macs_m", "model_bytes"] if c in df]].to_csv(
                fh, index=False)
        for f in [out / "summary.json", out / "timings.json", out / "results.md", out / "results.csv"]:
            run_.log_artifact(f)
        run_.log_artifact(plots, "plots")
        log.info("report: %d rows\n%s", len(df), report.markdown_table(df))


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--eval", default="data/eval")
    p.add_argument("--out", default="reports")
    main(run, p)
