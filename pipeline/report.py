"""The results table: one pandas frame over every evaluation, rendered as DVC metrics, Markdown and plots.

Two frames: :func:`results_frame` has one row per evaluated model (a method seed of a variant is its
own model); :func:`aggregate` has one row per table row (backbone / family / variant / setting), the
mean over its method seeds, with bootstrap confidence intervals over samples and seeds when the
per-sample arrays of the evaluate stage are given (:mod:`pipeline.metrics.stats`). The families'
comparison tables declare claims (:class:`pipeline.methods.Claim`); :func:`evaluate_claims` gives each
its paired-bootstrap interval and verdict.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd

# results.md / results.csv columns: results only. Wall-clock columns (TIMING_COLUMNS) differ between identical
# reruns, so they go to reports/timings.json, which no DVC output hashes (two clean runs: the same dvc.lock)
COLUMNS = ["backbone", "family", "variant", "setting", "n_seeds", "fid", "fid_ratio", "psnr", "ssim", "feat_dist",
           "accuracy", "clip_score", "hps", "bitops_g", "model_mb", "coverage", "executes"]
ROW_KEYS = ["backbone", "family", "variant", "setting"]
# metrics with a bootstrap interval: FID from the features, the paired metrics from per-sample arrays
CI_METRICS = ("fid", "psnr", "ssim", "feat_dist")
LOWER_IS_BETTER = {"fid": True, "fid_ratio": True, "feat_dist": True, "psnr": False, "ssim": False}


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
    for col in ("hps", "method_seconds", "method_peak_mb", "coverage", "psnr", "ssim", "feat_dist"):
        if col not in df:
            df[col] = None
    if "seed" not in df:
        df["seed"] = 0
    df["seed"] = df["seed"].fillna(0).astype(int)
    df["wbits"], df["abits"] = zip(*df["setting"].map(_bits))
    fp = df[df["family"] == "fp"].set_index("backbone")["fid"]
    df["fid_ratio"] = df.apply(lambda r: r["fid"] / fp[r["backbone"]] if r["backbone"] in fp else float("nan"),
                               axis=1)
    df["model_mb"] = df["model_bytes"] / 2**20
    df["_fp_first"] = (df["family"] != "fp").astype(int)
    df = df.sort_values(["backbone", "_fp_first", "family", "variant", "wbits", "abits", "seed"],
                        ascending=[True, True, True, True, False, False, True])
    return df.drop(columns="_fp_first").reset_index(drop=True)


def slug(r, seed: Optional[int] = None) -> str:
    """File stem of a model's arrays / grid (``pipeline.evaluation.ModelEntry.slug``)."""
    base = f"{r['backbone']}__{r['family']}__{r['variant']}__{r['setting']}"
    return base if r["family"] == "fp" else f"{base}__seed{int(r['seed'] if seed is None else seed)}"


class RowStats:
    """Per table row: the per-seed arrays and the bootstrap replicates of every CI metric (shared
    resampling plan, so two rows' replicates can be subtracted: a paired comparison)."""

    def __init__(self, boot, reference, level: float):
        self.boot, self.reference, self.level = boot, reference, level
        self.arrays: dict[str, list[dict]] = {}
        self.replicates: dict[tuple[str, str], np.ndarray] = {}
        self.points: dict[tuple[str, str], float] = {}

    @staticmethod
    def array_name(metric: str) -> str:
        """The per-sample array a metric is computed from: FID from the features, the others from themselves."""
        return "features" if metric == "fid" else metric

    def has(self, key: str, metric: str) -> bool:
        arrs = self.arrays.get(key) or []
        name = self.array_name(metric)
        return bool(arrs) and all(name in a for a in arrs) and (metric != "fid" or self.reference is not None)

    def point(self, key: str, metric: str) -> float:
        from .metrics.stats import point_stat

        if (key, metric) not in self.points:
            self.points[key, metric] = point_stat(metric, self.reference, self._per_seed(key, metric))
        return self.points[key, metric]

    def reps(self, key: str, metric: str) -> np.ndarray:
        from .metrics.stats import replicate_stat

        if (key, metric) not in self.replicates:
            self.replicates[key, metric] = replicate_stat(self.boot, metric, self.reference,
                                                          self._per_seed(key, metric))
        return self.replicates[key, metric]

    def interval(self, key: str, metric: str) -> tuple[float, float]:
        from .metrics.stats import interval

        return interval(self.point(key, metric), self.reps(key, metric), self.level)

    def _per_seed(self, key: str, metric: str) -> list[np.ndarray]:
        return [a[self.array_name(metric)] for a in self.arrays[key]]


def aggregate(df: pd.DataFrame, load_arrays: Optional[Callable[[str], dict]] = None, reference_features=None,
              replicates: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[pd.DataFrame, Optional[RowStats]]:
    """One row per ``backbone/family/variant/setting``: the mean over its method seeds of every numeric
    column, ``n_seeds``, the across-seed standard deviation of FID (``fid_sd``), and — when
    ``load_arrays(slug)`` gives the evaluate stage's per-sample arrays — ``<metric>_lo`` / ``_hi``: the
    bootstrap interval (samples x seeds, :mod:`pipeline.metrics.stats`) of FID and the paired metrics, and
    of ``fid_ratio`` (the row's FID interval over the FP model's FID point). Returns the frame and the
    :class:`RowStats` (None without arrays) for :func:`evaluate_claims`."""
    numeric = [c for c in df.columns if c not in (*ROW_KEYS, "seed") and pd.api.types.is_numeric_dtype(df[c])]
    out = []
    for _, g in df.groupby(ROW_KEYS, sort=False):
        r = g.iloc[0].copy()
        for c in numeric:
            vals = pd.to_numeric(g[c], errors="coerce")
            r[c] = float(vals.mean()) if vals.notna().any() else None
        r["n_seeds"] = int(len(g))
        r["seeds"] = ",".join(str(int(s)) for s in g["seed"])
        r["fid_sd"] = float(g["fid"].std(ddof=1)) if len(g) > 1 else None
        out.append(r)
    agg = pd.DataFrame(out).drop(columns=["seed"]).reset_index(drop=True)
    fp = agg[agg["family"] == "fp"].set_index("backbone")["fid"]
    agg["fid_ratio"] = agg.apply(lambda r: r["fid"] / fp[r["backbone"]] if r["backbone"] in fp else float("nan"),
                                 axis=1)
    if load_arrays is None:
        return agg, None
    from .metrics.stats import Bootstrap, Reference

    n = int(df["n_samples"].iloc[0]) if "n_samples" in df else None
    ref = Reference.from_features(np.asarray(reference_features, dtype=np.float64)) \
        if reference_features is not None else None
    if n is None:  # only older results lack n_samples: read it off the first model's arrays
        n = int(np.asarray(load_arrays(slug(df.iloc[0]))["features"]).shape[0])
    stats = RowStats(Bootstrap(n, replicates, seed, max_seeds=max(16, int(agg["n_seeds"].max()))), ref, level)
    for _, g in df.groupby(ROW_KEYS, sort=False):
        stats.arrays[row_key(g.iloc[0])] = [{k: np.asarray(v, dtype=np.float64) for k, v in load_arrays(slug(r)).items()
                                             if k != "images"} for _, r in g.iterrows()]
    for m in CI_METRICS:
        agg[f"{m}_lo"], agg[f"{m}_hi"] = None, None
    agg["fid_ratio_lo"], agg["fid_ratio_hi"] = None, None
    for i, r in agg.iterrows():
        key = row_key(r)
        for m in CI_METRICS:
            if stats.has(key, m) and not (m != "fid" and r["family"] == "fp"):
                lo, hi = stats.interval(key, m)
                agg.at[i, f"{m}_lo"], agg.at[i, f"{m}_hi"] = lo, hi
        if agg.at[i, "fid_lo"] is not None and r["backbone"] in fp:
            agg.at[i, "fid_ratio_lo"] = agg.at[i, "fid_lo"] / fp[r["backbone"]]
            agg.at[i, "fid_ratio_hi"] = agg.at[i, "fid_hi"] / fp[r["backbone"]]
    return agg, stats


def claim_rows(tables: list) -> list[dict]:
    """The claims of the families' tables, one per (claim, setting the table ran)."""
    out = []
    for t in tables or []:
        for c in t.get("claims", []):
            for s in c.get("settings") or t.get("settings", []):
                out.append({"backbone": t["backbone"], "setting": s, "better": c["better"], "worse": c["worse"],
                            "metrics": list(c.get("metrics") or ("fid", "psnr")), "source": c.get("source", ""),
                            "table": t["title"]})
    return out


def evaluate_claims(agg: pd.DataFrame, stats: Optional[RowStats], tables: list) -> list[dict]:
    """Every declared claim "``better`` beats ``worse``" at each setting: per metric the two rows'
    points, the paired-bootstrap interval of their difference (better − worse) and the verdict
    (:func:`pipeline.metrics.stats.verdict`). A claim whose rows did not run is listed as such."""
    from .metrics.stats import interval, verdict

    keys = set(agg.apply(row_key, axis=1)) if len(agg) else set()
    seeds = dict(zip(agg.apply(row_key, axis=1), agg["n_seeds"])) if len(agg) and "n_seeds" in agg else {}
    out = []
    for c in claim_rows(tables):
        kb, kw = f"{c['backbone']}/{c['better']}/{c['setting']}", f"{c['backbone']}/{c['worse']}/{c['setting']}"
        item = {k: c[k] for k in ("backbone", "setting", "better", "worse", "source", "table")}
        if kb not in keys or kw not in keys:
            item["status"] = "not run: " + ", ".join(k for k in (kb, kw) if k not in keys)
            out.append(item)
            continue
        item["status"] = "ok"
        item["n_seeds"] = [int(seeds.get(kb, 1)), int(seeds.get(kw, 1))]
        item["metrics"] = {}
        for m in c["metrics"]:
            if stats is None or not (stats.has(kb, m) and stats.has(kw, m)):
                continue
            pb, pw = stats.point(kb, m), stats.point(kw, m)
            diff = stats.reps(kb, m) - stats.reps(kw, m)
            lo, hi = interval(pb - pw, diff, stats.level)
            item["metrics"][m] = {"better": pb, "worse": pw, "diff": pb - pw, "lo": lo, "hi": hi,
                                  "verdict": verdict(lo, hi, LOWER_IS_BETTER[m])}
        out.append(item)
    return out


def row_key(r) -> str:
    """The unique key of a row: ``backbone/family/variant/setting``."""
    return f"{r['backbone']}/{r['family']}/{r['variant']}/{r['setting']}"


def row_label(r) -> str:
    """Short label for plots: the variant, prefixed by its family when they differ."""
    return r["variant"] if r["variant"] == r["family"] or r["family"] == "fp" else f"{r['family']}:{r['variant']}"


# wall-clock columns: they differ between identical reruns, so they stay out of summary.json, results.md and
# results.csv (which two runs of the same params and seeds reproduce byte for byte) and go to timings.json
TIMING_COLUMNS = ("sec_per_image", "method_seconds", "method_peak_mb")  # peak memory of the method (MB)
METRIC_COLUMNS = ("n_seeds", "fid", "fid_lo", "fid_hi", "fid_sd", "fid_ratio", "fid_ratio_lo", "fid_ratio_hi",
                  "psnr", "psnr_lo", "psnr_hi", "ssim", "ssim_lo", "ssim_hi", "feat_dist", "feat_dist_lo",
                  "feat_dist_hi", "accuracy", "clip_score", "hps", "bitops_g", "model_mb", "coverage")


def _keyed(df: pd.DataFrame, columns, key=None) -> dict[str, dict[str, float]]:
    out = {}
    for _, r in df.iterrows():
        vals = {}
        for c in columns:
            v = r.get(c)
            if v is not None and v == v:
                vals[c] = round(float(v), 6)
        out[(key or row_key)(r)] = vals
    return out


def seed_key(r) -> str:
    """``backbone/family/variant/setting#seed<s>`` (the FP model has no method seed)."""
    return row_key(r) if r["family"] == "fp" else f"{row_key(r)}#seed{int(r['seed'])}"


def summary(agg: pd.DataFrame, claims: Optional[list] = None, floor: Optional[dict] = None,
            deployed: Optional[list] = None) -> dict:
    """DVC metrics: ``{"<backbone>/<family>/<variant>/<setting>": {metric: value}}`` over the aggregated
    rows (means over method seeds, with their intervals), plus ``claims/<n>`` (difference, interval,
    verdict), ``noise_floor/<backbone>`` and ``deploy/<export row>`` (the export stage's fidelity, bytes and
    executes shares; :func:`read_export_index`) — results only, no timings, so the same params and seeds
    give a byte-identical file."""
    out: dict[str, Any] = _keyed(agg, METRIC_COLUMNS)
    for c in claims or []:
        for m, v in (c.get("metrics") or {}).items():
            out[f"claims/{claim_label(c)}/{m}"] = {"diff": round(v["diff"], 6), "lo": round(v["lo"], 6),
                                                   "hi": round(v["hi"], 6), "verdict": v["verdict"]}
    for b, v in ((floor or {}).get("seed") or {}).items():
        out[f"noise_floor/{b}/fp_other_noise"] = {k: round(float(x), 6) for k, x in v.items()}
    real = (floor or {}).get("real") or {}
    if real:
        out["noise_floor/real_vs_real"] = {k: round(float(x), 6) for k, x in real.items()}
    for d in deployed or []:
        f = d["fidelity"]
        out[f"deploy/{d['row']}"] = {
            "psnr_vs_fake_quant_db": round(f["psnr_mean_db"], 6), "psnr_min_db": round(f["psnr_min_db"], 6),
            "denoiser_max_abs": round(f["denoiser_max_abs"], 6), "fid_deployed": round(f["deployed"]["fid"], 6),
            "bytes_vs_fp32_graph": round(d["bytes"]["deployed"] / d["bytes"]["ort_fp32"], 6),
            **{f"executes_{k}": round(v, 6) for k, v in d["executes"].items()}}
    return out


def timings(df: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Wall-clock per evaluated model (seconds per image, method seconds): machine- and load-dependent."""
    return _keyed(df, TIMING_COLUMNS, seed_key)


def claim_label(c: dict) -> str:
    return f"{c['backbone']}/{c['setting']}/{c['better']}<{c['worse']}"


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    if isinstance(v, (float, np.floating)):
        return f"{v:.{nd}f}"
    return str(v)


def _cell(r, c: str) -> str:
    nd = 4 if c in ("sec_per_image", "ssim", "feat_dist") else 3
    v = _fmt(r.get(c), nd)
    lo, hi = r.get(f"{c}_lo"), r.get(f"{c}_hi")
    if v != "–" and lo is not None and hi is not None and lo == lo and hi == hi:
        v += f" [{_fmt(lo, nd)}, {_fmt(hi, nd)}]"
    return v


def markdown_table(df: pd.DataFrame, columns: list[str] | None = None) -> str:
    cols = columns or [c for c in COLUMNS if c in df]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_cell(r, c) for c in cols) + " |")
    return "\n".join(lines)


def table_columns(table: dict) -> list[str]:
    """A declared table's columns with the protocol's always-on ones: seeds, FID with its interval and
    the paired metrics next to ``fid_ratio``."""
    cols = ["n_seeds", "fid"]
    for c in table["columns"]:
        if c in TIMING_COLUMNS:  # per model in reports/timings.json, not in the reproducible tables
            continue
        if c not in cols:
            cols.append(c)
        if c == "fid_ratio":
            cols += [m for m in ("psnr", "ssim", "feat_dist") if m not in table["columns"]]
    return cols


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
        out.append(markdown_table(pd.DataFrame(rows), ["family", "variant", "setting", *table_columns(table)]))
    if missing:
        out += ["", f"Not in this run: {', '.join(missing)}."]
    return "\n".join(out)


def claims_markdown(claims: list, level: float = 0.95) -> str:
    """One line per claim and metric: both rows' values, the difference with its interval, the verdict."""
    if not claims:
        return ""
    pct = int(round(level * 100))
    lines = [f"| backbone | setting | claim | seeds | metric | better | worse | difference [{pct} % CI] | verdict | "
             "source |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in claims:
        claim = f"{c['better']} beats {c['worse']}"
        if c["status"] != "ok" or not c.get("metrics"):
            lines.append(f"| {c['backbone']} | {c['setting']} | {claim} | – | – | – | – | – | "
                         f"{c['status'] if c['status'] != 'ok' else 'no per-sample arrays'} | {c['source']} |")
            continue
        ns = c.get("n_seeds", [1, 1])
        seeds = f"{ns[0]} / {ns[1]}" + (" ⚠" if min(ns) < 2 else "")
        for m, v in c["metrics"].items():
            nd = 4 if m in ("ssim", "feat_dist") else 3
            lines.append(f"| {c['backbone']} | {c['setting']} | {claim} | {seeds} | {m} | {_fmt(v['better'], nd)} | "
                         f"{_fmt(v['worse'], nd)} | {_fmt(v['diff'], nd)} [{_fmt(v['lo'], nd)}, {_fmt(v['hi'], nd)}] | "
                         f"**{v['verdict']}** | {c['source']} |")
    return "\n".join(lines)


def floor_markdown(agg: pd.DataFrame, floor: Optional[dict], protocol: Optional[dict]) -> str:
    if not floor:
        return ""
    p = protocol or {}
    lines = [f"Every model draws N = {p.get('n_samples', '?')} images from the noise of eval seed "
             f"{p.get('seed', '?')}; FID's reference statistics: {p.get('fid_reference', '?')} real images. "
             "What FID and the paired metrics read when nothing is quantized:", "",
             "| backbone | FP FID [95 % CI] | FP, other noise (seed "
             f"{p.get('floor_seed', '?')}): FID | FID between the two FP sample sets | PSNR / SSIM / feat_dist "
             "FP vs FP other noise |", "|---|---|---|---|---|"]
    for b, v in sorted((floor.get("seed") or {}).items()):
        fp = agg[(agg["backbone"] == b) & (agg["family"] == "fp")]
        cell = _cell(fp.iloc[0], "fid") if len(fp) else "–"
        lines.append(f"| {b} | {cell} | {_fmt(v.get('fid'))} | {_fmt(v.get('fid_to_fp'))} | "
                     f"{_fmt(v.get('psnr'), 2)} dB / {_fmt(v.get('ssim'), 4)} / {_fmt(v.get('feat_dist'), 4)} |")
    real = floor.get("real") or {}
    if real:
        lines += ["", f"Real vs real: {real['n']} real images against the statistics of the other {real['rest']} "
                  f"real images, {real['splits']} random splits: FID {_fmt(real['fid_mean'])} "
                  f"(min {_fmt(real['fid_min'])}, max {_fmt(real['fid_max'])})."]
    lines += ["", "Paired metrics of a quantized model compare its image i with the FP model's image i of the "
              "same noise; the FP-vs-other-noise column is what two unrelated draws score (the far end, not the "
              "floor: a model identical to FP has PSNR = 100 dB, SSIM = 1, feat_dist = 0)."]
    return "\n".join(lines)


def markdown_report(df: pd.DataFrame, notes: list[str] | None = None, tables: list | None = None,
                    failed: list | None = None, claims: list | None = None, floor: Optional[dict] = None,
                    protocol: Optional[dict] = None, level: float = 0.95, searches: Optional[list] = None,
                    deployed: Optional[list] = None) -> str:
    """``df``: the aggregated frame (:func:`aggregate`); ``searches``: the TMPQ-DM search fronts
    (``data/search/<backbone>/front.json``); ``deployed``: the export stage's rows."""
    pct = int(round(level * 100))
    parts = ["# Results", "",
             "Generated by the `report` stage from `data/eval`. One row per backbone / family / variant / setting: "
             "the mean over its method seeds (`n_seeds`); `value [lo, hi]` is the "
             f"{pct} % bootstrap interval over samples and method seeds (`pipeline/metrics/stats.py`). FID uses the "
             "domain feature extractor of the embedded default unless configured otherwise; `fid_ratio` = FID / "
             "FID of the FP model of the same backbone. `psnr` (dB), `ssim` and `feat_dist` compare each image "
             "with the FP model's image from the same noise (`pipeline/metrics/paired.py`). BitOPs are summed over "
             "all sampling steps (G = 1e9). Sample grids: `reports/plots/samples_<backbone>.png`. "
             "`model_mb` is the size on disk, `coverage` the share of Linear/Conv weight parameters a family "
             "reports as stored quantized (where it measures it, e.g. the peer tools). Wall-clock figures are kept "
             "out of this file so that reruns reproduce it byte for byte: per model in `reports/timings.json` "
             "(`method_seconds`: wall time of the method itself, calibration / reconstruction / QAT; "
             "`method_peak_mb`: its peak memory, CUDA max allocated or the process's peak RSS on CPU; "
             "`sec_per_image`: sampling time in the evaluation).", ""]
    if failed:
        parts += ["## Failed jobs", "", "| backbone | family | variant | setting | seed | error |", "|---|---|---|---|---|---|"]
        parts += [f"| {f['backbone']} | {f['family']} | {f['variant']} | {f['setting']} | {f.get('seed', 0)} | "
                  f"{str(f.get('error', '')).replace('|', '/')[:300]} |" for f in failed]
        parts.append("")
    fl = floor_markdown(df, floor, protocol)
    if fl:
        parts += ["## Noise floor", "", fl, ""]
    if claims:
        parts += ["## Paper claims", "",
                  "Each claim \"A beats B\" at one setting, per metric: the difference A − B (lower is better "
                  "for FID and feat_dist, higher for PSNR and SSIM) with its paired bootstrap interval — the same "
                  "resampled samples and method seeds for both rows. *holds*: the whole interval favours A; *does "
                  "not hold*: it favours B; *not separable at this N*: it contains 0. `seeds`: method seeds of A / "
                  "B; ⚠ = a row with one method seed, whose interval holds sample noise only (no calibration-draw "
                  "or training-order variance), so its verdict is weaker than the others'. Every interval is "
                  "conditional on the one FP model of its backbone: the FP model's own training noise is not in "
                  "it (rerun the FP training with another `train_fp.<backbone>.seed` to see it). "
                  "Plot: `reports/plots/claims.png`.", "", claims_markdown(claims, level), ""]
    if tables:
        parts += ["## Comparisons", ""]
        for t in tables:
            parts += [focused_table(df, t), ""]
    if searches:
        parts += ["## TMPQ-DM search: Pareto front on the proxy", "",
                  "The search stage's own check (before the full protocol above): every point scored by the paired "
                  "pixel MSE to the FP images; plot: `reports/plots/search_<backbone>.png`.", ""]
        from .fronts import front_markdown

        parts += [front_markdown(d) for d in searches]
    if deployed:
        parts += ["## Running for real: exported to ONNX Runtime", "",
                  "The `export` stage's rows (`export.rows`, method seed 0): each quantized model exported from its "
                  "packed integer codes, scales and zero points (`pipeline/deploy`) and run with ONNX Runtime's "
                  "integer kernels. `executes`: share of the quantized layers' weights per class — `int8` (int8 "
                  "weights x uint8/int8 activations, integer accumulation), `int4-wo` (4-bit `MatMulNBits`, float "
                  "activations), `int8-wo` (int8 weights, activations emulated in float: per-token or FP "
                  "activation quantizers), `float` (decoded weight: FP ExMy codes, binary or mixed groups). "
                  "`graph MB`: model.onnx + its weights file, against the FP32 graph of the same backbone. "
                  "Fidelity: the deployed model's images of the evaluation noise (`eval.n_samples`, same labels "
                  "and sampler) against the fake-quant images scored above, and the denoiser's output on "
                  "calibration inputs. Speed and peak memory (wall clock, this machine) are in "
                  "`reports/deploy_timings.json` and `reports/plots/deploy_speed.timing.png`.", "",
                  deploy_markdown(deployed), ""]
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


def read_export_index(export_dir: Path) -> list[dict]:
    """The export stage's rows (``rows.json``, :mod:`pipeline.deploy.stage`) with each row's clock readings
    (``<key>/measure.timing.json``; empty when missing) under ``timing``; [] when the stage has not run."""
    from .deploy.layout import INDEX_FILE, MEASURE_FILE
    from .io import read_json

    export_dir = Path(export_dir)
    if not (export_dir / INDEX_FILE).exists():
        return []
    rows = read_json(export_dir / INDEX_FILE)["rows"]
    for r in rows:
        m = export_dir / r["key"] / MEASURE_FILE
        r["timing"] = read_json(m) if m.exists() else {}
    return rows


def with_executes(df: pd.DataFrame, deployed: Optional[list]) -> pd.DataFrame:
    """``df`` with the ``executes`` column: what the runtime executes for each exported row (by the model the
    export row resolved to; empty for the rows not exported)."""
    by_row = {d["model"].split("#")[0]: d["executes_label"] for d in deployed or []}
    df = df.copy()
    df["executes"] = [by_row.get(row_key(r)) for _, r in df.iterrows()]
    return df


def deploy_markdown(deployed: list) -> str:
    """The export stage's rows: what runs, artifact bytes and the deployed-vs-fake-quant fidelity."""
    lines = ["| export row | model | executes | graph MB | ÷ FP32 graph | PSNR vs fake-quant dB: mean [min] | "
             "max abs image diff | denoiser max abs diff (÷ max abs output) | FID deployed | FID fake-quant |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for d in deployed:
        f, b = d["fidelity"], d["bytes"]
        lines.append(
            f"| {d['row']} | {d['model']} | {d['executes_label']} | {b['deployed'] / 1e6:.3f} | "
            f"{b['deployed'] / b['ort_fp32']:.3f} | {f['psnr_mean_db']:.2f} [{f['psnr_min_db']:.2f}] | "
            f"{f['max_abs_image']:.2e} | {f['denoiser_max_abs']:.2e} ({f['denoiser_max_abs'] / max(f['denoiser_ref_max_abs'], 1e-12):.1e}) | "
            f"{_fmt(f['deployed']['fid'])} | {_fmt(f['fake_quant'].get('fid'))} |")
    return "\n".join(lines)


def plot_deploy_speed(deployed: list, path: Path) -> bool:
    """Speed vs quality of the exported rows: speed-up of the deployed graph over PyTorch float32 eager and
    over the same graph in float32 (ORT), at the largest timed batch, against the deployed images' FID.
    Wall clock: the file is a ``*.timing.png`` side file that no output hash includes. False when no row
    has timings."""
    rows = [d for d in deployed if d.get("timing", {}).get("speedup")]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    colors: dict[str, str] = {}
    for ax, key, what in ((axes[0], "vs_torch_fp32", "PyTorch float32 eager"),
                          (axes[1], "vs_ort_fp32", "the same graph in float32 (ORT)")):
        labelled: set[str] = set()
        for d in rows:
            bb = d["row"].split("/")[0]
            c = colors.setdefault(bb, f"C{len(colors)}")
            x, y = d["timing"]["speedup"][key], d["fidelity"]["deployed"]["fid"]
            ax.scatter([x], [y], color=c, label=None if bb in labelled else bb)
            labelled.add(bb)
            ax.annotate(f"{d['model'].split('#')[0].split('/', 1)[1]}\n{d['executes_label']}", (x, y), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        ax.axvline(1.0, color="k", ls=":", lw=1)
        batch = rows[0]["timing"]["speedup"]["batch"]
        ax.set_xlabel(f"speed-up of the deployed denoiser call over {what} (batch {batch})")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2gx"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].set_ylabel("FID of the deployed images (lower is better)")
    axes[0].legend(fontsize=8)
    threads = rows[0]["timing"].get("threads")
    fig.suptitle(f"Exported rows in ONNX Runtime: speed vs quality ({threads} threads; this machine's clock)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def deploy_timings(deployed: list) -> dict:
    """Per export row: seconds per call, sampling run, peak memory and the speed-ups (wall clock)."""
    return {d["row"]: d.get("timing", {}) for d in deployed}


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
            line, = ax.plot(g["wbits"], g["fid"], marker="o", label=f"{row_label(g.iloc[0])} A{int(a)}")
            if "fid_lo" in g and g["fid_lo"].notna().all():
                lo = (g["fid"] - g["fid_lo"].astype(float)).clip(lower=0)
                hi = (g["fid_hi"].astype(float) - g["fid"]).clip(lower=0)
                ax.errorbar(g["wbits"], g["fid"], yerr=[lo, hi], fmt="none", ecolor=line.get_color(), capsize=2,
                            lw=0.8)
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
        first_seed = int(str(r["seeds"]).split(",")[0]) if "seeds" in r and r["seeds"] == r["seeds"] else 0
        f = grids_dir / f"{slug(r, first_seed)}.png"
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


def plot_claims(claims: list, path: Path, level: float = 0.95) -> bool:
    """Forest plot: per claim (and metric FID / PSNR), the difference better − worse with its interval,
    oriented so that right of 0 = the claim's direction; colour = verdict. False when nothing to plot."""
    items = [(c, m, v) for c in claims or [] for m, v in (c.get("metrics") or {}).items()]
    if not items:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({m for _, m, _ in items}, key=lambda m: list(CI_METRICS).index(m) if m in CI_METRICS else 99)
    colours = {"holds": "tab:green", "does not hold": "tab:red", "not separable at this N": "tab:gray"}
    n = max(sum(1 for _, mm, _ in items if mm == m) for m in metrics)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 0.32 * n + 1.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        sel = [(c, v) for c, mm, v in items if mm == m]
        sign = -1.0 if LOWER_IS_BETTER.get(m, True) else 1.0
        for y, (_, v) in enumerate(sel):
            d = sign * v["diff"]
            lo, hi = sorted((sign * v["lo"], sign * v["hi"]))
            ax.plot([lo, hi], [y, y], color=colours[v["verdict"]], lw=2)
            ax.plot([d], [y], "o", color=colours[v["verdict"]])
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(sel)))
        ax.set_yticklabels([f"{c['backbone']} {c['setting']}: {c['better']} vs {c['worse']}" for c, _ in sel], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel(f"{m}: improvement of the claimed winner ({int(round(level * 100))} % CI; > 0 = claim holds)",
                      fontsize=7)
    handles = [plt.Line2D([], [], color=col, lw=2, label=k) for k, col in colours.items()]
    axes[0][-1].legend(handles=handles, fontsize=6, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------
# the stage's work
# ------------------------------------------------------------------------------------------------
def write_reports(results: Path, eval_dir: Path, search_dir: Path, out: Path, cfg, run_,
                  export_dir: Optional[Path] = None) -> None:
    """Everything the report stage writes, from the evaluate stage's outputs (``results`` =
    ``<eval_dir>/results.json``) and the search fronts: plots (made in a scratch folder, then swapped in),
    ``summary.json``, ``timings.json``, ``claims.json``, ``results.md`` and ``results.csv`` in ``out``, each
    written atomically and logged to the MLflow run ``run_``."""
    import logging
    import shutil

    from .io import atomic_file, read_json, write_json

    log = logging.getLogger("pipeline")
    eval_dir, search_dir, out = Path(eval_dir), Path(search_dir), Path(out)
    res = read_json(results, "evaluation results")
    df = results_frame(res["rows"])
    timing_file = eval_dir / "results.timing.json"  # untracked side file (wall clock)
    timing_rows = read_json(timing_file)["rows"] if timing_file.exists() else [{} for _ in res["rows"]]
    samples = eval_dir / "samples"
    ref_file = eval_dir / "reference.safetensors"  # the stage checked it exists (stages/_common.require)

    from safetensors.numpy import load_file

    def load_arrays(slug):
        f = samples / f"{slug}.safetensors"
        if not f.exists():
            raise FileNotFoundError(f"{f} not found (stage evaluate writes one per model); rerun `dvc repro`")
        return load_file(str(f))

    log.info("report: bootstrap (%d replicates) over %d models", cfg.bootstrap, len(df))
    agg, stats = aggregate(df, load_arrays, load_file(str(ref_file))["features"], cfg.bootstrap,
                                  cfg.ci_level, cfg.seed)
    claims = evaluate_claims(agg, stats, res.get("tables"))
    deployed = read_export_index(export_dir) if export_dir is not None else []
    agg, df = with_executes(agg, deployed), with_executes(df, deployed)
    floor = res.get("noise_floor")
    # plots first (into a scratch folder), then the metric files, each replaced atomically
    scratch = out / ".plots-tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    plot_fid_vs_wbits(agg, scratch / "fid_vs_wbits.png")
    plot_fid_vs_bitops(agg, scratch / "fid_vs_bitops.png")
    plot_claims(claims, scratch / "claims.png", cfg.ci_level)
    for b in sorted(agg["backbone"].unique()):
        sample_montage(agg, eval_dir / "grids", b, scratch / f"samples_{b}.png")
    plot_deploy_speed(deployed, scratch / "deploy_speed.timing.png")
    searches = []
    for f in sorted(search_dir.glob("*/front.json")) if search_dir.exists() else []:
        searches.append(read_json(f, "search front"))
        if (f.parent / "front.png").exists():
            shutil.copyfile(f.parent / "front.png", scratch / f"search_{f.parent.name}.png")
    plots = out / "plots"
    if plots.exists():
        shutil.rmtree(plots)
    scratch.rename(plots)
    summ = summary(agg, claims, floor, deployed)
    if searches:
        for d in searches:  # the search's own held-out check, next to the rows of the full protocol
            summ[f"search/{d['backbone']}"] = {"n_trials": d["n_trials"], "front_size": len(d["front"]),
                                               "budget_g": d["budget"] / 1e9, "comparisons": d["comparisons"]}
    write_json(out / "summary.json", summ)
    write_json(out / "timings.json",
               timings(results_frame([{**r, **t} for r, t in zip(res["rows"], timing_rows)])))
    write_json(out / "claims.json", {"level": cfg.ci_level, "replicates": cfg.bootstrap, "claims": claims})
    if deployed:
        write_json(out / "deploy_timings.json", deploy_timings(deployed))
    with atomic_file(out / "results.md") as fh:
        fh.write(markdown_report(agg, tables=res.get("tables"), failed=res.get("failed"), claims=claims,
                                        floor=floor, protocol=res.get("protocol"), level=cfg.ci_level,
                                        searches=searches, deployed=deployed))
    with atomic_file(out / "results.csv") as fh:
        df[[c for c in COLUMNS + ["seed", "wbits", "abits", "macs_m", "model_bytes"] if c in df]].to_csv(
            fh, index=False)
    for f in [out / "summary.json", out / "timings.json", out / "claims.json", out / "results.md",
              out / "results.csv"] + ([out / "deploy_timings.json"] if deployed else []):
        run_.log_artifact(f)
    run_.log_artifact(plots, "plots")
    held = {}
    for c in claims:
        for v in (c.get("metrics") or {}).values():
            held[v["verdict"]] = held.get(v["verdict"], 0) + 1
    run_.log_metrics({f"claims_{k.replace(' ', '_')}": float(v) for k, v in held.items()})
    log.info("report: %d rows, %d claims (%s)\n%s", len(agg), len(claims), held, markdown_table(agg))
