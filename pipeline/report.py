"""The results table: one pandas frame over every evaluation, rendered as DVC metrics, Markdown and plots."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

COLUMNS = ["backbone", "family", "variant", "setting", "fid", "fid_ratio", "accuracy", "clip_score", "hps",
           "bitops_g", "model_mb", "sec_per_image", "method_seconds"]


def _bits(setting: str) -> tuple[float, float]:
    if setting.upper().startswith("FP"):
        return 32.0, 32.0
    w, a = setting.upper()[1:].split("A")
    return float(w), float(a)


def results_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per evaluated model, with FID relative to the FP model of the same backbone."""
    if not rows:
        raise ValueError("no evaluation results to report (did the evaluate stage run?)")
    df = pd.DataFrame(rows)
    for col in ("hps", "method_seconds"):
        if col not in df:
            df[col] = None
    df["wbits"], df["abits"] = zip(*df["setting"].map(_bits))
    fp = df[df["family"] == "fp"].set_index("backbone")["fid"]
    df["fid_ratio"] = df.apply(lambda r: r["fid"] / fp[r["backbone"]] if r["backbone"] in fp else float("nan"),
                               axis=1)
    df["model_mb"] = df["model_bytes"] / 2**20
    df["_fp_first"] = (df["family"] != "fp").astype(int)
    df = df.sort_values(["backbone", "_fp_first", "family", "variant", "wbits", "abits"],
                        ascending=[True, True, True, True, False, False])
    return df.drop(columns="_fp_first").reset_index(drop=True)


def row_key(r) -> str:
    """The unique key of a row: ``backbone/family/variant/setting``."""
    return f"{r['backbone']}/{r['family']}/{r['variant']}/{r['setting']}"


def row_label(r) -> str:
    """Short label for plots: the variant, prefixed by its family when they differ."""
    return r["variant"] if r["variant"] == r["family"] or r["family"] == "fp" else f"{r['family']}:{r['variant']}"


# wall-clock columns: they differ between identical reruns, so they stay out of summary.json (which two
# runs of the same params and seeds reproduce byte for byte) and go to timings.json
TIMING_COLUMNS = ("sec_per_image", "method_seconds")
METRIC_COLUMNS = ("fid", "fid_ratio", "accuracy", "clip_score", "hps", "bitops_g", "model_mb")


def _keyed(df: pd.DataFrame, columns) -> dict[str, dict[str, float]]:
    out = {}
    for _, r in df.iterrows():
        vals = {}
        for c in columns:
            v = r.get(c)
            if v is not None and v == v:
                vals[c] = round(float(v), 6)
        out[row_key(r)] = vals
    return out


def summary(df: pd.DataFrame) -> dict[str, dict[str, float]]:
    """DVC metrics: ``{"<backbone>/<family>/<variant>/<setting>": {metric: value}}`` — results only, no
    timings, so the same params and seeds give a byte-identical file."""
    return _keyed(df, METRIC_COLUMNS)


def timings(df: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Wall-clock per row (seconds per image, method seconds): machine- and load-dependent."""
    return _keyed(df, TIMING_COLUMNS)


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown_table(df: pd.DataFrame, columns: list[str] | None = None) -> str:
    cols = columns or [c for c in COLUMNS if c in df]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_fmt(r[c], 4 if c in ("sec_per_image",) else 3) for c in cols) + " |")
    return "\n".join(lines)


def focused_table(df: pd.DataFrame, table: dict) -> str:
    """A comparison table declared by a family (``pipeline.methods.Table``, as its manifest carries it):
    the FP row of the backbone, then per bit setting the baseline rows and the family's variants, in the
    declared order; combinations that did not run are listed as such."""
    sub = df[df["backbone"] == table["backbone"]]
    rows, missing = [], []
    fp = sub[sub["family"] == "fp"]
    if len(fp):
        rows.append(fp.iloc[0])
    wanted = [tuple(b.split("/", 1)) for b in table.get("baselines", [])]
    wanted += [(table["family"], v) for v in table.get("variants", [])]
    for s in table.get("settings", []):
        for fam, var in wanted:
            hit = sub[(sub["family"] == fam) & (sub["variant"] == var) & (sub["setting"] == s)]
            if len(hit):
                rows.append(hit.iloc[0])
            else:
                missing.append(f"{fam}/{var} {s}")
    out = [f"### {table['title']}", ""]
    if table.get("note"):
        out += [table["note"], ""]
    if rows:
        out.append(markdown_table(pd.DataFrame(rows), ["family", "variant", "setting", *table["columns"]]))
    if missing:
        out += ["", f"Not in this run: {', '.join(missing)}."]
    return "\n".join(out)


def markdown_report(df: pd.DataFrame, notes: list[str] | None = None, tables: list | None = None,
                    failed: list | None = None) -> str:
    parts = ["# Results", "",
             "Generated by the `report` stage from `data/eval/results.json`. FID uses the domain feature "
             "extractor of the embedded default unless configured otherwise; `fid_ratio` = FID / FID of the FP "
             "model of the same backbone. BitOPs are summed over all sampling steps (G = 1e9). Sample grids: "
             "`reports/plots/samples_<backbone>.png` (one column per class, one row per model). `method_seconds` is the "
             "wall time of the method itself (calibration / reconstruction / QAT), `model_mb` the size on disk.", ""]
    if failed:
        parts += ["## Failed jobs", "", "| backbone | family | variant | setting | error |", "|---|---|---|---|---|"]
        parts += [f"| {f['backbone']} | {f['family']} | {f['variant']} | {f['setting']} | "
                  f"{str(f.get('error', '')).replace('|', '/')[:300]} |" for f in failed]
        parts.append("")
    if tables:
        parts += ["## Comparisons", ""]
        for t in tables:
            parts += [focused_table(df, t), ""]
    parts += ["## All results", ""]
    for b, sub in df.groupby("backbone", sort=True):
        parts += [f"### {b}", "", markdown_table(sub), ""]
    if "hps_skipped" in df and df["hps"].isna().all():
        reasons = df["hps_skipped"].dropna().unique()
        if len(reasons):
            parts += [f"HPSv2 not computed: {reasons[0]}.", ""]
    for n in notes or []:
        parts += [n, ""]
    return "\n".join(parts)


def plot_fid_vs_wbits(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = sorted(df["backbone"].unique())
    fig, axes = plt.subplots(1, len(backbones), figsize=(5 * len(backbones), 4), squeeze=False)
    for ax, b in zip(axes[0], backbones):
        sub = df[df["backbone"] == b]
        fp = sub[sub["family"] == "fp"]
        for (_, _, a), g in sub[sub["family"] != "fp"].groupby(["family", "variant", "abits"]):
            g = g.sort_values("wbits")
            ax.plot(g["wbits"], g["fid"], marker="o", label=f"{row_label(g.iloc[0])} A{int(a)}")
        if len(fp):
            ax.axhline(float(fp["fid"].iloc[0]), color="k", ls="--", lw=1, label="FP")
        ax.set_xlabel("weight bits")
        ax.set_ylabel("FID (lower is better)")
        ax.set_yscale("log")
        ax.set_title(b)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fid_vs_bitops(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = sorted(df["backbone"].unique())
    fig, axes = plt.subplots(1, len(backbones), figsize=(5 * len(backbones), 4), squeeze=False)
    for ax, b in zip(axes[0], backbones):
        sub = df[df["backbone"] == b]
        for (fam, _), g in sub.groupby(["family", "variant"]):
            ax.scatter(g["bitops_g"], g["fid"], label=row_label(g.iloc[0]), marker="*" if fam == "fp" else "o")
            for _, r in g.iterrows():
                ax.annotate(r["setting"], (r["bitops_g"], r["fid"]), fontsize=6, xytext=(2, 2),
                            textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("BitOPs over all sampling steps (G)")
        ax.set_ylabel("FID (lower is better)")
        ax.set_title(b)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_montage(df: pd.DataFrame, grids_dir: Path, backbone: str, path: Path, n_classes: int = 10) -> None:
    """First row of every model's sample grid (same noise, one column per class), one row per model,
    labelled: the quickest way to see what quantization did to the samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    sub = df[df["backbone"] == backbone]
    rows = []
    for _, r in sub.iterrows():
        f = grids_dir / f"{r['backbone']}__{r['family']}__{r['variant']}__{r['setting']}.png"
        if f.exists():
            rows.append((f"{row_label(r)} {r['setting']}", Image.open(f)))
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), 1, figsize=(6, 0.75 * len(rows) + 0.3), squeeze=False)
    for ax, (label, img) in zip(axes[:, 0], rows):
        w, h = img.size
        cell = w // n_classes if n_classes else w
        ax.imshow(img.crop((0, 0, w, min(h, cell))), cmap="gray", interpolation="nearest")
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(f"{backbone}: samples from the same noise (one column per class)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
