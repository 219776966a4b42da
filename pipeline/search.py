"""TMPQ-DM's search with Optuna: per-layer W/A widths and one timestep per group, under a BitOPs budget.

The super-network, the candidate and its cost are :mod:`pipeline.methods.tmpq`; this module runs the
study (the stage ``search@<backbone>`` calls :func:`run_search`):

- **Objectives**: (proxy, GBitOPs per image) — both minimised — with the constraint BitOPs ≤ budget
  (default: uniform ``W<budget_bits>A<budget_bits>`` at the full ``sampling.steps`` schedule). Sampler:
  NSGA-II (``search.sampler: nsga2``, population ``population_size``) or multi-objective TPE. The
  official code runs its own evolutionary search (population 50, 15–20 generations); NSGA-II is its
  closest Optuna counterpart. Round 0 holds the uniform widths at the groups' default timesteps (the
  official initial population starts from the uniform 6-bit candidate).
- **Determinism**: trials are asked in rounds of ``search.batch_size`` from a sampler seeded by
  (``search.seed``, first trial number of the round), and told in trial order, so the study is the same
  for any ``n_workers``; ``n_workers`` processes (spawned, one thread each) only score a round's
  candidates in parallel. Only this process writes the study, the score cache and MLflow.
- **Resume = replay**: every execution rebuilds the study from the start in memory, asking the same
  rounds with the same seeds; a candidate's score is a pure function of the candidate and the study's
  key, so it is looked up in a persistent score cache (``study-<key>.scores.jsonl``, one JSON line per
  scored candidate, appended as each result arrives) and computed only when missing. A search killed at
  any point (between rounds, mid-round with workers busy, during the held-out re-scoring) therefore
  resumes into exactly the study of an uninterrupted run, and a larger ``search.n_trials`` gives exactly
  the study run with that count from the start (the last round of the shorter run was asked with the
  same seed; its missing trials are asked now). The key covers everything a score depends on (options,
  FP model, calibration, code); a changed key drops the old cache. The finished study is also exported
  to an Optuna journal (``study-<key>.journal``, for ``optuna-dashboard``); both files are side files
  that DVC does not hash (``.dvcignore``), because they hold timestamps and append order.
- **Tracking**: one MLflow parent run per stage execution, every trial a nested child run (Optuna's
  MLflow callback alone would leave them flat).
- **Held-out check**: the search sample's best values are optimistically biased (they were selected on
  it); the Pareto front and the uniform references are re-scored on ``proxy.holdout_samples`` fresh
  noise draws, with 95 % bootstrap intervals, and for every uniform reference the best front point at
  equal or lower BitOPs is compared with it (paired difference, its interval, a verdict).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .metrics.stats import verdict
from .parallel import WorkerPool

log = logging.getLogger("pipeline")
FRONT_FILE = "front.json"


# ------------------------------------------------------------------------------------------------
# scoring (in this process or in a worker)
# ------------------------------------------------------------------------------------------------
class Scorer:
    """Per process: the super-network, its cost model, and the FP images the proxy compares with."""

    def __init__(self, fp_dir, calib_dir, cfg, diffusion, sampling, device="cpu") -> None:
        from .calibration import load_calibration
        from .methods.tmpq import CostModel, SuperNet, per_image_macs
        from .models import load_backbone

        self.cfg, self.diffusion, self.sampling, self.device = cfg, diffusion, sampling, device
        self.fp = load_backbone(fp_dir, device=device)
        self.supernet = SuperNet(self.fp, load_calibration(calib_dir), cfg, device)
        self.cost = CostModel(self.supernet, per_image_macs(self.supernet.backbone))
        self._ref: dict = {}

    def _images(self, backbone, n: int, seed: int, timesteps=None):
        import torch

        from .sampling import eval_labels, initial_noise, sample

        noise = initial_noise(n, backbone.sample_shape, seed)
        labels = eval_labels(n, backbone.num_classes)
        out = []
        for i in range(0, n, 256):
            out.append(sample(backbone, noise[i:i + 256].to(self.device), labels[i:i + 256].to(self.device),
                              self.diffusion, self.sampling, timesteps=timesteps).cpu())
        return torch.cat(out)

    def reference(self, which: str):
        if which not in self._ref:
            n, seed = self.sample_of(which)
            self._ref[which] = self._images(self.fp, n, seed)
        return self._ref[which]

    def sample_of(self, which: str) -> tuple[int, int]:
        p = self.cfg.proxy
        return (p.n_samples, p.seed) if which == "search" else (p.holdout_samples, p.holdout_seed)

    def score(self, cand, which: str = "search") -> np.ndarray:
        """Per-sample proxy (pixel MSE to the FP images of the same noise at the full schedule)."""
        self._calls = getattr(self, "_calls", {})
        self._calls[which] = self._calls.get(which, 0) + 1
        _fault(f"{'score' if which == 'search' else which}{self._calls[which]}")
        ref = self.reference(which)
        self.supernet.apply(cand)
        n, seed = self.sample_of(which)
        imgs = self._images(self.supernet.backbone, n, seed, cand.timesteps)
        return ((imgs - ref) ** 2).flatten(1).mean(1).double().numpy()


# ------------------------------------------------------------------------------------------------
# the search space in Optuna's terms
# ------------------------------------------------------------------------------------------------
def distributions(supernet, groups, cfg) -> dict:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    d: dict[str, Any] = {}
    for n in supernet.w_slots:
        d[f"w:{n}"] = CategoricalDistribution(list(cfg.w_bits))
    for n in supernet.a_slots:
        d[f"a:{n}"] = CategoricalDistribution(list(cfg.a_bits))
    for j, (lo, hi) in enumerate(groups):
        d[f"t{j}"] = IntDistribution(lo, hi - 1)
    return d


def decode(params: dict, supernet, groups):
    from .methods.tmpq import Candidate

    return Candidate(w={n: int(params[f"w:{n}"]) for n in supernet.w_slots},
                     a={n: int(params[f"a:{n}"]) for n in supernet.a_slots},
                     timesteps=sorted((int(params[f"t{j}"]) for j in range(len(groups))), reverse=True),
                     attention=frozenset(supernet.attention))


def encode(cand, groups) -> dict:
    params = {f"w:{n}": b for n, b in cand.w.items()}
    params.update({f"a:{n}": b for n, b in cand.a.items()})
    ts = sorted(cand.timesteps)
    for j, (lo, hi) in enumerate(groups):
        inside = [t for t in ts if lo <= t < hi]
        if len(inside) != 1:
            raise ValueError(f"candidate timesteps {cand.timesteps}: group {j} [{lo}, {hi}) needs exactly one")
        params[f"t{j}"] = inside[0]
    return params


def _constraint(trial) -> list:
    return [float(trial.user_attrs.get("constraint", 0.0))]


def make_sampler(cfg, seed: int):
    import optuna

    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constraints_func=_constraint,
                                          n_startup_trials=cfg.population_size)
    return optuna.samplers.NSGAIISampler(population_size=cfg.population_size, seed=seed,
                                         constraints_func=_constraint)


class ScoreCache:
    """Per-sample proxy scores of candidates, persisted as JSON lines (``{"which", "cand", "scores"}``).

    Lines are appended and flushed one by one as results arrive, so a kill loses at most the line being
    written; a torn last line is ignored on load. Floats are written with ``repr`` (JSON), which
    round-trips float64 exactly, so a cached score equals the computed one bit for bit."""

    def __init__(self, path: Path, holdout: str = "") -> None:
        import json

        self.path, self.holdout = Path(path), holdout
        self._data: dict[str, list] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    self._data[self._key(rec["which"], rec["cand"])] = rec["scores"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a kill
        self.hits = 0

    @staticmethod
    def _key(which: str, cand: dict) -> str:
        import json

        return json.dumps([which, cand], sort_keys=True)

    def get(self, which: str, cand) -> Any:
        v = self._data.get(self._key(which, cand.to_dict()))
        if v is not None:
            self.hits += 1
            return np.asarray(v, dtype=np.float64)
        return None

    def put(self, which: str, cand, scores) -> None:
        import json
        import os

        scores = [float(x) for x in np.asarray(scores, dtype=np.float64)]
        self._data[self._key(which, cand.to_dict())] = scores
        line = json.dumps({"which": which, "cand": cand.to_dict(), "scores": scores}, sort_keys=True)
        with open(self.path, "a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def __len__(self) -> int:
        return len(self._data)


def new_study(name: str, cfg):
    """A fresh in-memory study (the replay builds it from the start on every execution)."""
    import optuna

    return optuna.create_study(study_name=name, storage=optuna.storages.InMemoryStorage(),
                               directions=["minimize", "minimize"], sampler=make_sampler(cfg, cfg.seed))


def export_journal(study, path: Path) -> None:
    """Copy the finished study into an Optuna journal file at ``path`` (atomically), for optuna-dashboard."""
    import os

    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    optuna.copy_study(from_study_name=study.study_name, from_storage=study._storage,
                      to_storage=JournalStorage(JournalFileBackend(str(tmp))))
    os.replace(tmp, path)


def _fault(point: str) -> None:
    """Test hook: ``PIPELINE_SEARCH_FAULT=<point>`` SIGKILLs the search's main process (whose pid the stage
    puts in ``PIPELINE_SEARCH_PID``) when the search reaches ``point``: ``round<r>`` (after round r is
    told), ``score<n>`` (a worker about to score its n-th search candidate, other workers busy) or
    ``holdout<n>`` (the same in the held-out re-scoring). A real kill, used by the resume tests."""
    import os
    import signal

    if os.environ.get("PIPELINE_SEARCH_FAULT") == point and os.environ.get("PIPELINE_SEARCH_PID"):
        os.kill(int(os.environ["PIPELINE_SEARCH_PID"]), signal.SIGKILL)


def n_complete(study) -> int:
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE)


# ------------------------------------------------------------------------------------------------
# statistics of the held-out check
# ------------------------------------------------------------------------------------------------
def bootstrap_ci(x: np.ndarray, reps: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``x`` (resampling samples)."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float64)
    means = x[rng.integers(0, len(x), size=(reps, len(x)))].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def pareto_front(points: list[dict]) -> list[dict]:
    """Non-dominated points (both ``proxy`` and ``bitops`` minimised), sorted by BitOPs."""
    pts = sorted(points, key=lambda p: (p["bitops"], p["proxy"]))
    front, best = [], float("inf")
    for p in pts:
        if p["proxy"] < best:
            front.append(p)
            best = p["proxy"]
    return front


# ------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------
def study_key(backbone: str, cfg, diffusion, sampling, fp_dir, calib_dir) -> str:
    """The study's identity (its journal and score cache are named by it): the search space and proxy options
    (not ``n_trials``, ``n_workers`` or the held-out re-scoring, which extend or re-score the same study), the
    FP model and calibration set, the schedule and the code the search can run (this module's import closure,
    :func:`pipeline.codedeps.code_key`: the report or another family's module leave the study alone)."""
    from .codedeps import code_key
    from .config import to_dict
    from .io import data_hash, tree_hash

    space = {k: v for k, v in to_dict(cfg).items() if k not in ("n_trials", "n_workers", "backbones")}
    space.pop("proxy")
    space["proxy"] = {k: v for k, v in to_dict(cfg.proxy).items() if not k.startswith("holdout")}
    return data_hash({"space": space, "backbone": backbone, "fp": tree_hash(fp_dir), "calib": tree_hash(calib_dir),
                      "diffusion": to_dict(diffusion), "sampling": to_dict(sampling),
                      "code": code_key(__file__)})[:16]


def run_search(backbone: str, cfg, diffusion, sampling, tracking, fp_dir, calib_dir, out: Path,
               device: str = "cpu", progress: bool = True) -> dict:
    """Run (or resume) the study of ``backbone`` into ``out``; returns the front document."""
    import torch

    from .methods.tmpq import timestep_groups
    from .sampling import timestep_values

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    own = getattr(backbone, "scheduler_config", None)
    full = timestep_values(diffusion, sampling, own)
    groups = timestep_groups(int(own["num_train_timesteps"]) if own else diffusion.num_train_timesteps, cfg.n_groups)
    key = study_key(backbone, cfg, diffusion, sampling, fp_dir, calib_dir)
    journal, cache_file = out / f"study-{key}.journal", out / f"study-{key}.scores.jsonl"
    for old in list(out.glob("study-*.journal")) + list(out.glob("study-*.scores.jsonl")):
        if old not in (journal, cache_file):
            log.info("search: options, inputs or code changed; dropping the old study file %s", old.name)
            old.unlink()
    (out / "run.json").unlink(missing_ok=True)  # written by earlier versions (timings now in run.timing.json)

    # one intra-op thread, as every worker: with n_workers = 1 this process scores, and a second thread
    # changes the proxy in the 7th digit (the study must not depend on n_workers or the core count)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_search(backbone, cfg, diffusion, sampling, tracking, fp_dir, calib_dir, out, device, progress,
                           full, groups, key, journal, cache_file)
    finally:
        torch.set_num_threads(threads)


def _run_search(backbone, cfg, diffusion, sampling, tracking, fp_dir, calib_dir, out, device, progress, full, groups,
                key, journal, cache_file) -> dict:
    import torch

    from .config import to_dict
    from .io import TIMING_SUFFIX, write_json
    from .methods.tmpq import group_default_timesteps
    from .tracking import stage_run

    torch.manual_seed(cfg.seed)
    local = Scorer(fp_dir, calib_dir, cfg, diffusion, sampling, device)
    sn, cost = local.supernet, local.cost
    budget = (cfg.budget_bitops * 1e9 if cfg.budget_bitops is not None
              else cost.per_step(sn.uniform(cfg.budget_bits, cfg.budget_bits, full)) * len(full))
    cheapest = cost.bitops(sn.uniform(min(cfg.w_bits), min(cfg.a_bits), group_default_timesteps(groups)))
    if cheapest > budget * (1 + 1e-9):
        raise ValueError(f"search: even the cheapest candidate (W{min(cfg.w_bits)}A{min(cfg.a_bits)} at "
                         f"{cfg.n_groups} steps, {cheapest / 1e9:.3f} GBitOPs) exceeds the budget {budget / 1e9:.3f} "
                         "GBitOPs; raise search.budget_bitops / budget_bits or add lower widths")
    dists = distributions(sn, groups, cfg)
    cache = ScoreCache(cache_file, holdout=f"{cfg.proxy.holdout_samples}@{cfg.proxy.holdout_seed}")
    study = new_study(f"tmpq-{backbone}-{key}", cfg)
    for b in sorted(set(cfg.w_bits) & set(cfg.a_bits)):  # round 0: uniform widths at the default steps
        study.enqueue_trial(encode(sn.uniform(b, b, group_default_timesteps(groups)), groups),
                            user_attrs={"seeded": f"uniform W{b}A{b}"})
    if len(cache):
        log.info("search: %d cached scores of study %s: replaying it, scoring only what is missing",
                 len(cache), key)
    kwargs = dict(fp_dir=str(fp_dir), calib_dir=str(calib_dir), cfg=cfg, diffusion=diffusion, sampling=sampling,
                  device=device)
    params = {"search": to_dict(cfg), "sampling": to_dict(sampling), "diffusion": to_dict(diffusion)}
    tags = {"backbone": backbone, "method": "tmpq-search", "sampler": cfg.sampler, "study": study.study_name}
    t0 = time.time()
    os.environ["PIPELINE_SEARCH_PID"] = str(os.getpid())  # for the resume tests' fault hook (_fault)
    with stage_run("search", params=params, tags=tags, experiment=tracking.experiment, uri=tracking.uri,
                   run_name=f"search@{backbone}", log_file=Path("data") / "logs" / f"search@{backbone}.log",
                   inputs=[fp_dir, calib_dir]) as run_:
        with WorkerPool(cfg.n_workers, Scorer, kwargs=kwargs, local=lambda: local) as pool:
            _optimise(study, dists, sn, groups, cost, budget, pool, cache, cfg, run_, progress)
            doc = _summarise(study, sn, groups, cost, budget, full, pool, cache, cfg, key)
        doc["backbone"] = backbone
        write_json(out / FRONT_FILE, doc)  # results only: a rerun that changes nothing rewrites the same bytes
        export_journal(study, journal)
        run_info = {"seconds": time.time() - t0, "cached_scores": cache.hits, "n_workers": cfg.n_workers}
        write_json(out / f"run{TIMING_SUFFIX}", run_info)  # an untracked side file: it holds the wall clock
        doc.update(run_info)
        _write_tables(doc, out)
        _plot(doc, out / "front.png")
        run_.log_metrics({"n_trials": doc["n_trials"], "front_size": len(doc["front"]), "budget_g": budget / 1e9,
                          "search_seconds": doc["seconds"], "cached_scores": cache.hits})
        for f in (FRONT_FILE, "front.md", "front.png", "trials.csv"):
            run_.log_artifact(out / f)
    return doc


def _score(pool: WorkerPool, cache: ScoreCache, cands: list, which: str) -> list:
    """Per-sample proxy of every candidate (Scorer.score), in order: from the cache where present, the rest
    scored by the pool and appended to the cache as each result arrives."""
    tag = which if which == "search" else f"{which}:{cache.holdout}"  # the study key leaves holdout_* out
    out = [cache.get(tag, c) for c in cands]
    missing = [i for i, v in enumerate(out) if v is None]
    for i, scores in zip(missing, pool.imap("score", [(cands[i], which) for i in missing])):
        cache.put(tag, cands[i], scores)
        out[i] = np.asarray(scores, dtype=np.float64)
    return out


def _optimise(study, dists, sn, groups, cost, budget, pool, cache, cfg, run_, progress) -> None:
    import mlflow

    total, rnd = cfg.n_trials, 0
    while n_complete(study) < total:
        done = n_complete(study)
        k = min(cfg.batch_size, total - done)
        study.sampler = make_sampler(cfg, cfg.seed * 1_000_003 + len(study.trials))
        trials = [study.ask(dists) for _ in range(k)]
        cands = [decode(t.params, sn, groups) for t in trials]
        t0, hits = time.time(), cache.hits
        scores = _score(pool, cache, cands, "search")
        for trial, cand, s in zip(trials, cands, scores):
            c = cost.bitops(cand)
            trial.set_user_attr("constraint", c - budget)
            trial.set_user_attr("mean_w_bits", cand.mean_w_bits)
            trial.set_user_attr("mean_a_bits", cand.mean_a_bits)
            trial.set_user_attr("timesteps", list(cand.timesteps))
            value = float(np.mean(s))
            study.tell(trial, [value, c / 1e9])
            with mlflow.start_run(run_name=f"trial {trial.number}", nested=True,
                                  tags={"stage": "search-trial", "study": study.study_name,
                                        "mlflow.parentRunId": run_.run_id}):
                mlflow.log_params({"number": trial.number, "timesteps": " ".join(map(str, cand.timesteps)),
                                   "mean_w_bits": round(cand.mean_w_bits, 3), "mean_a_bits": round(cand.mean_a_bits, 3)})
                mlflow.log_metrics({"proxy_mse": value, "bitops_g": c / 1e9, "feasible": float(c <= budget)})
                mlflow.log_dict(cand.to_dict(), "candidate.json")
        if progress:
            log.info("search: %d/%d trials (%.1f s/round, %d of %d from the score cache)", n_complete(study), total,
                     time.time() - t0, cache.hits - hits, k)
        _fault(f"round{rnd}")
        rnd += 1


def _summarise(study, sn, groups, cost, budget, full, pool, cache, cfg, key) -> dict:
    from optuna.trial import TrialState

    from .methods.tmpq import group_default_timesteps

    trials = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    cands = {t.number: decode(t.params, sn, groups) for t in trials}
    points = [{"trial": t.number, "proxy": t.values[0], "bitops": t.values[1] * 1e9,
               "feasible": t.values[1] * 1e9 <= budget * (1 + 1e-9),
               "candidate": cands[t.number].to_dict()} for t in trials]
    front = pareto_front([p for p in points if p["feasible"]])
    widths = sorted(set(cfg.w_bits) & set(cfg.a_bits))
    refs, ref_cands = [], []
    for b in widths:
        for label, ts in (("full", full), ("groups", group_default_timesteps(groups))):
            cand = sn.uniform(b, b, ts)
            refs.append({"label": f"uniform W{b}A{b} @ {len(ts)} steps", "bits": b, "schedule": label,
                         "bitops": cost.bitops(cand), "candidate": cand.to_dict()})
            ref_cands.append(cand)
    search_scores = _score(pool, cache, ref_cands, "search")
    log.info("search: re-scoring the front (%d points) and %d uniform references on held-out noise",
             len(front), len(ref_cands))
    holdout = _score(pool, cache, [cands[p["trial"]] for p in front] + ref_cands, "holdout")
    for p, h in zip(front + refs, holdout):
        p["holdout_mean"] = float(np.mean(h))
        p["holdout_ci"] = list(bootstrap_ci(h, seed=cfg.seed))
        p["_h"] = np.asarray(h)
    for r, s in zip(refs, search_scores):
        r["proxy"] = float(np.mean(s))
    comparisons = []
    for r in refs:
        if r["schedule"] != "full":
            continue
        cheaper = [p for p in front if p["bitops"] <= r["bitops"] * (1 + 1e-9)]
        if not cheaper:
            comparisons.append({"uniform": r["label"], "verdict": "no searched point at equal or lower BitOPs"})
            continue
        best = min(cheaper, key=lambda p: p["holdout_mean"])
        diff = best["_h"] - r["_h"]
        ci = bootstrap_ci(diff, seed=cfg.seed)
        comparisons.append({"uniform": r["label"], "uniform_bitops": r["bitops"], "uniform_mse": r["holdout_mean"],
                            "searched_trial": best["trial"], "searched_bitops": best["bitops"],
                            "searched_mse": best["holdout_mean"], "diff": float(diff.mean()), "diff_ci": list(ci),
                            "verdict": verdict(*ci, lower_is_better=True)})
    for p in front + refs:
        p.pop("_h")
    uniform_cost = {f"W{w}A{a}": cost.per_step(sn.uniform(w, a, full)) for w in cfg.w_bits for a in cfg.a_bits}
    return {"version": 1, "key": key, "study": study.study_name, "budget": budget, "n_trials": len(trials),
            "n_groups": cfg.n_groups, "groups": [list(g) for g in groups], "full_steps": len(full),
            "sampler": cfg.sampler, "proxy": {"metric": cfg.proxy.metric, "n_samples": cfg.proxy.n_samples,
                                              "holdout_samples": cfg.proxy.holdout_samples},
            "supernet": {"w_bits": list(cfg.w_bits), "a_bits": list(cfg.a_bits), "weight_init": cfg.weight_init,
                         "act_init": cfg.act_init, "keep_first_last_bits": cfg.keep_first_last_bits,
                         "calib_batches": cfg.calib_batches, "seed": cfg.seed},
            "uniform_cost_per_step": uniform_cost, "front": front, "uniform": refs, "comparisons": comparisons,
            "trials": [{k: v for k, v in p.items() if k != "candidate"} |
                       {"mean_w_bits": cands[p["trial"]].mean_w_bits, "mean_a_bits": cands[p["trial"]].mean_a_bits,
                        "n_steps": len(cands[p["trial"]].timesteps)} for p in points]}


def _write_tables(doc: dict, out: Path) -> None:
    import pandas as pd

    from .fronts import front_markdown
    from .io import atomic_file

    with atomic_file(out / "front.md") as fh:
        fh.write(front_markdown(doc))
    with atomic_file(out / "trials.csv") as fh:
        pd.DataFrame(doc["trials"]).to_csv(fh, index=False)


def _plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_file

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    tr = doc["trials"]
    ax.scatter([t["bitops"] / 1e9 for t in tr], [t["proxy"] for t in tr], s=10, c="0.7", label="trials (search MSE)")
    f = doc["front"]
    ax.errorbar([p["bitops"] / 1e9 for p in f], [p["holdout_mean"] for p in f],
                yerr=np.array([[p["holdout_mean"] - p["holdout_ci"][0], p["holdout_ci"][1] - p["holdout_mean"]]
                               for p in f]).T, fmt="o-", color="C3", ms=4, label="Pareto front (held-out)")
    for sched, marker in (("full", "s"), ("groups", "^")):
        u = [r for r in doc["uniform"] if r["schedule"] == sched]
        ax.scatter([r["bitops"] / 1e9 for r in u], [r["holdout_mean"] for r in u], marker=marker, s=40,
                   color="C0" if sched == "full" else "C2", zorder=3,
                   label=f"uniform W=A, {u[0]['candidate']['timesteps'].__len__()} steps (held-out)" if u else None)
        for r in u:
            ax.annotate(f"W{r['bits']}A{r['bits']}", (r["bitops"] / 1e9, r["holdout_mean"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.axvline(doc["budget"] / 1e9, color="k", ls="--", lw=0.8, label="budget")
    ax.set_xlabel("GBitOPs per image (all sampling steps)")
    ax.set_ylabel("pixel MSE to FP images")
    ax.set_yscale("log")
    ax.set_title(f"TMPQ-DM search, {doc['backbone']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)
