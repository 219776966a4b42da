"""The TMPQ-DM search front as Markdown: written by the search stage (``front.md``) and by the report.

Its own module, imported by both, so that editing the report changes neither the search's import closure nor
its study key (:mod:`pipeline.codedeps`)."""
from __future__ import annotations


def front_markdown(doc: dict) -> str:
    """The Pareto table, the uniform references and the dominance verdicts (Markdown)."""
    lines = [f"### TMPQ-DM search on {doc['backbone']}: {doc['n_trials']} trials ({doc['sampler']}), "
             f"budget {doc['budget'] / 1e9:.3f} GBitOPs/image",
             "",
             f"Proxy: pixel MSE to the FP images of the same noise at {doc['full_steps']} steps; search sample "
             f"{doc['proxy']['n_samples']} images, held-out {doc['proxy']['holdout_samples']} fresh images "
             "(95 % bootstrap CI over samples).", "",
             "| point | GBitOPs | steps | mean W bits | mean A bits | search MSE | held-out MSE [95 % CI] |",
             "|---|---|---|---|---|---|---|"]
    for p in doc["front"] + doc["uniform"]:
        c = p["candidate"]
        w = sum(c["w"].values()) / max(len(c["w"]), 1)
        a = sum(c["a"].values()) / max(len(c["a"]), 1)
        name = p.get("label") or f"trial {p['trial']}"
        lo, hi = p["holdout_ci"]
        lines.append(f"| {name} | {p['bitops'] / 1e9:.3f} | {len(c['timesteps'])} | {w:.2f} | {a:.2f} | "
                     f"{p['proxy']:.5f} | {p['holdout_mean']:.5f} [{lo:.5f}, {hi:.5f}] |")
    lines += ["", "Searched front vs uniform bits at equal or lower BitOPs (held-out paired MSE difference, "
              "searched − uniform; < 0 = the searched point is better):", "",
              "| uniform | its GBitOPs | best searched point within it | its GBitOPs | Δ MSE [95 % CI] | verdict |",
              "|---|---|---|---|---|---|"]
    for c in doc["comparisons"]:
        if "diff" not in c:
            lines.append(f"| {c['uniform']} | | | | | {c['verdict']} |")
            continue
        lines.append(f"| {c['uniform']} | {c['uniform_bitops'] / 1e9:.3f} | trial {c['searched_trial']} | "
                     f"{c['searched_bitops'] / 1e9:.3f} | {c['diff']:+.5f} [{c['diff_ci'][0]:+.5f}, "
                     f"{c['diff_ci'][1]:+.5f}] | {c['verdict']} |")
    return "\n".join(lines) + "\n"
