#!/usr/bin/env python
"""The MPQ-DM / MPQ-DMv2 ablation table of one run: for each bit setting (W2A4, W3A4, W4A4 by default) and
backbone (unet by default), naive PTQ, ``mpqdm``, ``mpqdm2`` and each v2 ablation with FID_q / FID_fp,
conditional accuracy, CLIP score, stored size, BitOPs and QAT wall time, then the paper's ordering claim
(FID: MPQ-DMv2 < MPQ-DM < naive PTQ, gap widest at W2A4) checked on the measured numbers.

Quality numbers come from ``reports/summary.json`` (the report stage); QAT wall times from each QAT output's
``info.json`` (``data/qat/<method>/<setting>/<backbone>/``), or, when that is missing, from the MLflow runs of
stage ``qat``. Run after ``dvc repro`` (with the mpq / qat stages wired in)."""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ["naive", "mpqdm", "mpqdm2", "mpqdm2_no_residual", "mpqdm2_no_lora_init", "mpqdm2_no_memory"]


def qat_seconds_from_mlflow() -> dict:
    """{(method, setting, backbone): seconds} from the latest MLflow run of each qat item."""
    try:
        import mlflow

        from pipeline.tracking import tracking_uri
    except ImportError:
        return {}
    client = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri())
    out: dict = {}
    for exp in client.search_experiments():
        for r in client.search_runs([exp.experiment_id], "tags.stage = 'qat'", max_results=5000,
                                    order_by=["attributes.start_time ASC"]):
            key = (r.data.tags.get("method"), r.data.tags.get("setting"), r.data.tags.get("backbone"))
            if "qat_seconds" in r.data.metrics:
                out[key] = r.data.metrics["qat_seconds"]
    return out


def qat_info(qat_root: Path, method: str, setting: str, backbone: str):
    p = qat_root / method / setting / backbone / "info.json"
    return json.loads(p.read_text()) if p.exists() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summary", default=str(ROOT / "reports" / "summary.json"))
    ap.add_argument("--qat", default=str(ROOT / "data" / "qat"))
    ap.add_argument("--settings", default="W2A4,W3A4,W4A4")
    ap.add_argument("--backbones", default="unet")
    args = ap.parse_args()
    path = Path(args.summary)
    if not path.exists():
        sys.exit(f"{path} not found: run `dvc repro` (report stage) first")
    summary = json.loads(path.read_text())
    mlflow_times = None
    settings = args.settings.split(",")
    for b in args.backbones.split(","):
        fp = summary.get(f"{b}/fp/FP32", {})
        print(f"\n{b}: FP FID {fp.get('fid', float('nan')):.3f}, accuracy {fp.get('accuracy', float('nan')):.3f}")
        head = (f"{'setting':8s} {'method':22s} {'FID_q/FID_fp':>12s} {'accuracy':>9s} {'CLIP':>7s} {'stored KiB':>10s} "
                f"{'BitOPs G':>9s} {'avg W bits':>10s} {'QAT s':>7s} {'eps-MSE before->after':>22s}")
        print(head)
        print("-" * len(head))
        fids: dict = {}
        for s in settings:
            for m in METHODS:
                row = summary.get(f"{b}/{m}/{s}")
                if row is None:
                    continue
                info = qat_info(Path(args.qat), m, s, b) if m != "naive" else None
                qat_s = None
                if info is not None:
                    qat_s = info.get("qat", {}).get("qat_seconds")
                elif m != "naive":
                    if mlflow_times is None:
                        mlflow_times = qat_seconds_from_mlflow()
                    qat_s = mlflow_times.get((m, s, b))
                bits = info.get("init", {}).get("avg_weight_bits") if info else None
                mse = ""
                if info and info.get("eps_mse_before") is not None:
                    mse = f"{info['eps_mse_before']:.4f}->{info['eps_mse_after']:.4f}"
                fids[(s, m)] = row.get("fid_ratio")
                print(f"{s:8s} {m:22s} {row.get('fid_ratio', float('nan')):12.3f} {row.get('accuracy', float('nan')):9.3f} "
                      f"{row.get('clip_score', float('nan')):7.2f} {row.get('model_mb', float('nan')) * 1024:10.1f} "
                      f"{row.get('bitops_g', float('nan')):9.2f} {bits if bits is not None else float('nan'):10.3f} "
                      f"{qat_s if qat_s is not None else float('nan'):7.1f} {mse:>22s}")
        print("\npaper's claim FID: mpqdm2 < mpqdm < naive (gap widest at W2A4)")
        gaps = {}
        for s in settings:
            v2, v1, nv = fids.get((s, "mpqdm2")), fids.get((s, "mpqdm")), fids.get((s, "naive"))
            if None in (v2, v1, nv):
                print(f"  {s}: incomplete (mpqdm2 {v2}, mpqdm {v1}, naive {nv})")
                continue
            gaps[s] = nv - v2
            print(f"  {s}: mpqdm2 {v2:.3f}  mpqdm {v1:.3f}  naive {nv:.3f}  -> "
                  f"{'holds' if v2 < v1 < nv else 'does NOT hold'}")
        if gaps:
            widest = max(gaps, key=gaps.get)
            print(f"  widest naive - mpqdm2 gap at {widest} ({gaps[widest]:.3f} FID ratio)")


if __name__ == "__main__":
    main()
