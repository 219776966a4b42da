#!/usr/bin/env python
"""Benchmark of the default run: wall time of each stage (from the MLflow runs of the latest
execution of each stage) and FID_quantized / FID_fp of naive PTQ at W8A8, W4A8 and W4A4 on both
backbones (from reports/summary.json). Run after `make repro`."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import mlflow

    from pipeline.tracking import tracking_uri

    client = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri())
    exp = client.get_experiment_by_name("diffusion-quant")
    if exp is None:
        sys.exit("no MLflow experiment 'diffusion-quant' yet: run `make repro` first")
    latest: dict[str, tuple[int, float]] = {}
    for r in client.search_runs([exp.experiment_id], max_results=5000, order_by=["attributes.start_time ASC"]):
        if "stage_seconds" not in r.data.metrics or r.data.tags.get("mlflow.parentRunId"):
            continue
        latest[r.info.run_name] = (r.info.start_time, r.data.metrics["stage_seconds"])
    print("stage wall time (latest execution, seconds; excludes ~10 s of Python imports per process)")
    total = 0.0
    for name, (_, sec) in sorted(latest.items(), key=lambda kv: kv[1][0]):
        print(f"  {name:40s} {sec:8.1f}")
        total += sec
    print(f"  {'total':40s} {total:8.1f}")

    summary = json.loads((ROOT / "reports" / "summary.json").read_text())
    print("\nnaive PTQ: FID_quantized / FID_fp")
    for b in ("unet", "dit"):
        cells = []
        for s in ("W8A8", "W4A8", "W4A4"):
            row = summary.get(f"{b}/naive/naive/{s}")
            cells.append(f"{s} {row['fid_ratio']:.2f}" if row else f"{s} (not run)")
        print(f"  {b:5s} " + "   ".join(cells))


if __name__ == "__main__":
    main()
