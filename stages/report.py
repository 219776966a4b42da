#!/usr/bin/env python
"""report: one table over all evaluations -> reports/summary.json (DVC metrics, keyed by
backbone/family/variant/setting: means over method seeds with bootstrap intervals, the verdict of every
declared paper claim and the noise floor; no timings: those go to reports/timings.json, which is not a DVC
output, so two clean runs write the same dvc.lock), the comparison
tables the families declare, reports/results.md, reports/results.csv (one line per evaluated model),
reports/claims.json and plots (FID vs weight bits, FID vs BitOPs, claims, sample montages), all logged
to MLflow; with the export stage's rows, the executes column, a deployed-fidelity table, and the speed and
memory (wall clock) in reports/deploy_timings.json and reports/plots/deploy_speed.timing.png."""
from _common import log_path, main, parser, require


def run(args):
    from pipeline.config import ReportConfig, TrackingConfig, load_section, to_dict

    cfg = load_section("report", ReportConfig, args.params)
    trk = load_section("tracking", TrackingConfig, args.params)
    results = require(f"{args.eval}/results.json", "evaluation results (stage evaluate)")
    require(f"{args.eval}/reference.safetensors", "reference features (stage evaluate)")

    from pathlib import Path

    from pipeline.report import write_reports
    from pipeline.tracking import stage_run

    with stage_run("report", params=to_dict(cfg), experiment=trk.experiment, uri=trk.uri,
                   inputs=[results], log_file=log_path("report")) as run_:
        write_reports(results, Path(args.eval), Path(args.search), Path(args.out), cfg, run_, Path(args.export))


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--eval", default="data/eval")
    p.add_argument("--search", default="data/search", help="TMPQ-DM search outputs (optional)")
    p.add_argument("--export", default="data/export", help="the export stage's rows (optional)")
    p.add_argument("--out", default="reports")
    main(run, p)
