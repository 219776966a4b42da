#!/usr/bin/env python
"""report: one table over all evaluations -> reports/summary.json (DVC metrics, keyed by
backbone/family/variant/setting: means over method seeds with bootstrap intervals, the verdict of every
declared paper claim and the noise floor; no timings: those go to reports/timings.json, which is not a DVC
output, so two clean runs write the same dvc.lock), the comparison
tables the families declare, reports/results.md, reports/results.csv (one line per evaluated model),
reports/claims.json and plots (FID vs weight bits, FID vs BitOPs, claims, sample montages), all logged
to MLflow."""
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
        timing_file = Path(args.eval) / "results.timing.json"  # untracked side file (wall clock)
        timing_rows = read_json(timing_file)["rows"] if timing_file.exists() else [{} for _ in res["rows"]]
        samples = Path(args.eval) / "samples"
        ref_file = require(f"{args.eval}/reference.safetensors", "reference features (stage evaluate)")

        from safetensors.numpy import load_file

        def load_arrays(slug):
            f = samples / f"{slug}.safetensors"
            if not f.exists():
                raise FileNotFoundError(f"{f} not found (stage evaluate writes one per model); rerun `dvc repro`")
            return load_file(str(f))

        log.info("report: bootstrap (%d replicates) over %d models", cfg.bootstrap, len(df))
        agg, stats = report.aggregate(df, load_arrays, load_file(str(ref_file))["features"], cfg.bootstrap,
                                      cfg.ci_level, cfg.seed)
        claims = report.evaluate_claims(agg, stats, res.get("tables"))
        floor = res.get("noise_floor")
        # plots first (into a scratch folder), then the metric files, each replaced atomically
        scratch = out / ".plots-tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        report.plot_fid_vs_wbits(agg, scratch / "fid_vs_wbits.png")
        report.plot_fid_vs_bitops(agg, scratch / "fid_vs_bitops.png")
        report.plot_claims(claims, scratch / "claims.png", cfg.ci_level)
        for b in sorted(agg["backbone"].unique()):
            report.sample_montage(agg, Path(args.eval) / "grids", b, scratch / f"samples_{b}.png")
        searches = []
        for f in sorted(Path(args.search).glob("*/front.json")) if Path(args.search).exists() else []:
            searches.append(read_json(f, "search front"))
            if (f.parent / "front.png").exists():
                shutil.copyfile(f.parent / "front.png", scratch / f"search_{f.parent.name}.png")
        plots = out / "plots"
        if plots.exists():
            shutil.rmtree(plots)
        scratch.rename(plots)
        summ = report.summary(agg, claims, floor)
        if searches:
            for d in searches:  # the search's own held-out check, next to the rows of the full protocol
                summ[f"search/{d['backbone']}"] = {"n_trials": d["n_trials"], "front_size": len(d["front"]),
                                                   "budget_g": d["budget"] / 1e9, "comparisons": d["comparisons"]}
        write_json(out / "summary.json", summ)
        write_json(out / "timings.json",
                   report.timings(report.results_frame([{**r, **t} for r, t in zip(res["rows"], timing_rows)])))
        write_json(out / "claims.json", {"level": cfg.ci_level, "replicates": cfg.bootstrap, "claims": claims})
        with atomic_file(out / "results.md") as fh:
            fh.write(report.markdown_report(agg, tables=res.get("tables"), failed=res.get("failed"), claims=claims,
                                            floor=floor, protocol=res.get("protocol"), level=cfg.ci_level,
                                            searches=searches))
        with atomic_file(out / "results.csv") as fh:
            df[[c for c in report.COLUMNS + ["seed", "wbits", "abits", "macs_m", "model_bytes"] if c in df]].to_csv(
                fh, index=False)
        for f in [out / "summary.json", out / "timings.json", out / "claims.json", out / "results.md",
                  out / "results.csv"]:
            run_.log_artifact(f)
        run_.log_artifact(plots, "plots")
        held = {}
        for c in claims:
            for v in (c.get("metrics") or {}).values():
                held[v["verdict"]] = held.get(v["verdict"], 0) + 1
        run_.log_metrics({f"claims_{k.replace(' ', '_')}": float(v) for k, v in held.items()})
        log.info("report: %d rows, %d claims (%s)\n%s", len(agg), len(claims), held, report.markdown_table(agg))


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--eval", default="data/eval")
    p.add_argument("--search", default="data/search", help="TMPQ-DM search outputs (optional)")
    p.add_argument("--out", default="reports")
    main(run, p)
