#!/usr/bin/env python
"""FP4DiT comparison table for one backbone (default: the DiT of the embedded default), from the
evaluation summary (``reports/summary.json``) and the quantize stages' ``info.json`` files (calibration
time). Run after `dvc repro`:

    python bench/fp4dit_compare.py [--backbone dit] [--markdown reports/fp4dit_comparison.md]
    python bench/fp4dit_compare.py --diagnose data/fp/dit      # why FP does / does not beat INT here

Rows: FP, FP4DiT at each setting, the INT baselines at the same bits (naive INT PTQ from the ``quantize``
section; INT with the same AdaRound reconstruction, and INT round-to-nearest, from the ``fp4dit``
section), and the FP4DiT ablations (no AdaRound; static activations; E2M1 in the FFN). Columns:
FID_q / FID_fp, conditional accuracy, CLIP score, BitOPs, stored bytes, calibration time. Ends with the
paper's claim (FP beats INT at W4A6 and W4A8) checked on these numbers.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ROWS = [  # (method, what it is)
    ("fp4dit", "FP4DiT (FP E2M1/E3M0 group-128, FP AdaRound, online FP act.)"),
    ("naive", "INT naive PTQ (per-channel W, static per-tensor A)"),
    ("int_no_adaround", "INT group-128 W, per-token INT A, round to nearest"),
    ("int_adaround", "INT group-128 W, per-token INT A, same AdaRound"),
    ("fp4dit_no_adaround", "FP4DiT - AdaRound (round to nearest)"),
    ("fp4dit_static_act", "FP4DiT - online act. (static per-tensor FP)"),
    ("fp4dit_ffn_e2m1", "FP4DiT - E3M0 FFN-1 (E2M1 everywhere)"),
]
INT_BASELINES = ("naive", "int_adaround")


def calibration_seconds(quant_root: Path, method: str, setting: str, backbone: str):
    info = quant_root / method / setting / backbone / "info.json"
    if not info.exists():
        return None
    return json.loads(info.read_text()).get("quantize_seconds")


def table(summary: dict, quant_root: Path, backbone: str, settings: list) -> tuple[list, list]:
    header = ["setting", "method", "FID_q/FID_fp", "accuracy", "CLIP", "BitOPs (G)", "stored bytes", "calib. s"]
    lines = []
    fp = summary.get(f"{backbone}/fp/FP32")
    if fp:
        lines.append(["FP32", "fp", 1.0, fp.get("accuracy"), fp.get("clip_score"), fp.get("bitops_g"),
                      fp.get("model_mb", 0) * 2**20, None])
    for s in settings:
        for method, _ in ROWS:
            r = summary.get(f"{backbone}/{method}/{s}")
            if r is None:
                continue
            lines.append([s, method, r.get("fid_ratio"), r.get("accuracy"), r.get("clip_score"), r.get("bitops_g"),
                          r.get("model_mb", 0) * 2**20, calibration_seconds(quant_root, method, s, backbone)])
    return header, lines


def fmt(v, col):
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    if col == "stored bytes":
        return f"{int(round(v)):,}"
    if col in ("calib. s",):
        return f"{v:.1f}"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def verdict(summary: dict, backbone: str, settings: list) -> list:
    out = []
    for s in settings:
        f = summary.get(f"{backbone}/fp4dit/{s}")
        if f is None:
            out.append(f"{s}: fp4dit not evaluated")
            continue
        parts = []
        for b in INT_BASELINES:
            r = summary.get(f"{backbone}/{b}/{s}")
            if r is None:
                parts.append(f"{b}: not evaluated")
                continue
            better = f["fid_ratio"] < r["fid_ratio"]
            parts.append(f"vs {b}: FID ratio {f['fid_ratio']:.3f} vs {r['fid_ratio']:.3f} -> "
                         f"{'FP better' if better else 'INT better or equal'}")
        out.append(f"{s}: " + "; ".join(parts))
    return out


def diagnose(fp_dir: str) -> str:
    """Weight-shape diagnosis: per-group kurtosis of the weights FP4DiT quantizes, and the relative
    weight MSE of the 4-bit grids (FP E2M1 / E3M0 / E1M2 with group absmax, INT4 asymmetric min-max and
    symmetric absmax, all per group of 128) on this model and on reference distributions."""
    import torch

    from pipeline.methods.fp4dit import DEFAULT_EXCLUDE, _matches_any
    from pipeline.models import load_backbone
    from pipeline.quant.primitives import FPQuantizer, IntQuantizer

    grids = {"FP E2M1": lambda: FPQuantizer(2, 1, granularity="group"),
             "FP E3M0": lambda: FPQuantizer(3, 0, granularity="group"),
             "FP E1M2": lambda: FPQuantizer(1, 2, granularity="group"),
             "INT4 asym": lambda: IntQuantizer(4, symmetric=False, granularity="group"),
             "INT4 sym": lambda: IntQuantizer(4, symmetric=True, granularity="group")}

    def rel_mse(make, w):
        q = make()
        q.calibrate(w)
        return float((q(w) - w).pow(2).sum() / w.pow(2).sum())

    def kurtosis(w):
        rows = w.reshape(w.shape[0], -1)
        z = (rows - rows.mean(1, keepdim=True)) / rows.std(1, keepdim=True).clamp_min(1e-12)
        return float(z.pow(4).mean())

    bb = load_backbone(fp_dir)
    weights = {n: m.weight.detach().float() for n, m in bb.net.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not _matches_any(DEFAULT_EXCLUDE, n)}
    if not weights:
        return f"{fp_dir}: no layer that FP4DiT quantizes"
    g = torch.Generator().manual_seed(0)
    ref = {"uniform": torch.rand(1024, 128, generator=g) * 2 - 1, "gaussian": torch.randn(1024, 128, generator=g),
           "laplace": torch.distributions.Laplace(0.0, 1.0).sample((1024, 128)),
           "student-t(3)": torch.distributions.StudentT(3.0).sample((1024, 128))}
    cols = list(grids)
    lines = [f"Weight-shape diagnosis of {fp_dir} ({len(weights)} quantized layers)", "",
             "| weights | kurtosis | " + " | ".join(f"rel. MSE {c}" for c in cols) + " |",
             "|---|---|" + "|".join("---" for _ in cols) + "|"]
    model_k = sum(kurtosis(w) for w in weights.values()) / len(weights)
    model_err = [sum(rel_mse(grids[c], w) * w.numel() for w in weights.values())
                 / sum(w.numel() for w in weights.values()) for c in cols]
    lines.append(f"| this model (mean) | {model_k:.2f} | " + " | ".join(f"{e:.4f}" for e in model_err) + " |")
    for name, w in ref.items():
        lines.append(f"| {name} | {kurtosis(w):.2f} | " + " | ".join(f"{rel_mse(grids[c], w):.4f}" for c in cols) + " |")
    lines += ["", "Kurtosis 1.8 = uniform, 3 = Gaussian, > 3 = heavy tails. FP grids (finer near 0, coarse at the "
              "top) win on heavy-tailed weights; INT4 with an asymmetric min-max range wins on uniform-like ones."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--summary", default=str(ROOT / "reports" / "summary.json"))
    p.add_argument("--quantized", default=str(ROOT / "data" / "quantized"))
    p.add_argument("--backbone", default="dit")
    p.add_argument("--settings", default="W4A6,W4A8")
    p.add_argument("--markdown", default=None, help="also write the table to this Markdown file")
    p.add_argument("--diagnose", default=None, metavar="FP_DIR",
                   help="print the weight-shape diagnosis of the FP backbone in FP_DIR and exit")
    a = p.parse_args()
    if a.diagnose:
        sys.path.insert(0, str(ROOT))
        print(diagnose(a.diagnose))
        return
    path = Path(a.summary)
    if not path.exists():
        sys.exit(f"{path} not found: run `dvc repro` (stages evaluate and report) first")
    summary = json.loads(path.read_text())
    settings = [s.strip().upper() for s in a.settings.split(",") if s.strip()]
    header, lines = table(summary, Path(a.quantized), a.backbone, settings)
    if len(lines) <= 1:
        sys.exit(f"no FP4DiT / INT rows for backbone {a.backbone!r} at {settings} in {path}: add the `fp4dit` "
                 "section to params.yaml and run `dvc repro`")
    md = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    md += ["| " + " | ".join(fmt(v, c) for v, c in zip(row, header)) + " |" for row in lines]
    text = "\n".join(md + [""] + ["Paper claim (FP beats INT at W4A6 / W4A8), on these numbers:"]
                     + [f"- {v}" for v in verdict(summary, a.backbone, settings)])
    legend = "\n".join(f"- `{m}`: {d}" for m, d in ROWS)
    print(text)
    print("\n" + legend)
    if a.markdown:
        Path(a.markdown).write_text(f"# FP4DiT comparison ({a.backbone})\n\n{text}\n\n{legend}\n")


if __name__ == "__main__":
    main()
