"""TMPQ-DM: timestep groups, subsequence sampling, the super-network's switching, BitOPs of a candidate,
and the Optuna search (resume after a kill, two workers, nested MLflow runs)."""
import copy
import math

import pytest
import torch

from pipeline.api import quantize
from pipeline.config import DiffusionConfig, SamplingConfig, SearchConfig, SearchProxyConfig, TrackingConfig, \
    from_dict
from pipeline.methods.tmpq import (Candidate, CostModel, SuperNet, build_uniform, candidate_spec, choose,
                                   group_default_timesteps, per_image_macs, timestep_groups)
from pipeline.quant.cost import bitops
from pipeline.quant.surgery import quant_layers


def _cfg(**kw):
    base = dict(w_bits=[4, 8], a_bits=[4, 8], n_groups=3, population_size=4, n_trials=6, batch_size=2,
                n_workers=1, calib_batches=1, proxy=SearchProxyConfig(n_samples=4, holdout_samples=6))
    base.update(kw)
    return SearchConfig(**base)


@pytest.fixture(scope="module")
def saved(tiny_calibrated, tmp_path_factory):
    """The tiny UNet and its calibration set saved as the stages would (the search loads from disk)."""
    from pipeline.calibration import save_calibration
    from pipeline.models import save_backbone

    fp, calib = tiny_calibrated["unet"]
    root = tmp_path_factory.mktemp("tmpq")
    save_backbone(fp, root / "fp")
    save_calibration(calib, root / "calib")
    return fp, calib, root


# ---------------------------------------------------------------------------------------------------
def test_group_boundaries_match_the_formula():
    for t_total, k in ((1000, 10), (1000, 4), (500, 6)):
        groups = timestep_groups(t_total, k)
        bounds = [int((i * math.sqrt(0.8 * t_total) / (k - 1)) ** 2) for i in range(k)]
        assert [lo for lo, _ in groups] == bounds
        assert [hi for _, hi in groups] == bounds[1:] + [t_total]
        widths = [hi - lo for lo, hi in groups[:-1]]
        assert widths == sorted(widths)  # dense near t = 0
    assert timestep_groups(1000, 10)[1] == (9, 39)
    assert group_default_timesteps(timestep_groups(1000, 10))[0] == 999
    with pytest.raises(ValueError, match="at least 2"):
        timestep_groups(1000, 1)
    with pytest.raises(ValueError, match="too many"):
        timestep_groups(10, 9)


def test_subsequence_sampling_equals_sampler_with_those_timesteps(tiny_calibrated):
    from pipeline.sampling import eval_labels, initial_noise, sample, timestep_values

    fp, _ = tiny_calibrated["unet"]
    diff = DiffusionConfig()
    noise, labels = initial_noise(3, fp.sample_shape, 0), eval_labels(3, fp.num_classes)
    # step counts dividing T: diffusers' DDIM steps to t - T // steps, which is the next trailing timestep
    # only then (for 7 steps it steps 856 -> 714 while the schedule's next timestep is 713)
    for steps, eta in ((20, 0.0), (10, 0.0), (5, 0.3)):
        samp = SamplingConfig(steps=steps, eta=eta)
        ref = sample(fp, noise, labels, diff, samp, seed=2)
        sub = sample(fp, noise, labels, diff, SamplingConfig(steps=3, eta=eta), seed=2,
                     timesteps=timestep_values(diff, samp))
        assert torch.equal(ref, sub), (steps, eta)
    other = sample(fp, noise, labels, diff, SamplingConfig(), timesteps=[999, 500, 37, 3])
    assert not torch.equal(other, sample(fp, noise, labels, diff, SamplingConfig()))
    for bad, msg in (([5, 9], "strictly decreasing"), ([1000, 3], "outside"), ([], "at least one")):
        with pytest.raises(ValueError, match=msg):
            sample(fp, noise, labels, diff, SamplingConfig(), timesteps=bad)
    with pytest.raises(ValueError, match="ddim"):
        sample(fp, noise, labels, diff, SamplingConfig(scheduler="dpm"), timesteps=[999, 3])


def _random_candidate(sn, cfg, gen, timesteps):
    pick = lambda bits: bits[int(torch.randint(len(bits), (1,), generator=gen))]  # noqa: E731
    return Candidate(w={n: pick(cfg.w_bits) for n in sn.w_slots}, a={n: pick(cfg.a_bits) for n in sn.a_slots},
                     timesteps=timesteps, attention=frozenset(sn.attention))


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_switching_bits_equals_a_freshly_calibrated_quantizer(tiny_calibrated, kind):
    fp, calib = tiny_calibrated[kind]
    cfg = _cfg()
    sn = SuperNet(fp, calib, cfg)
    assert sn.attention and sn.w_slots and len(sn.a_slots) == len(sn.layers) + len(sn.attention)
    x, t, y = next(iter(calib.batches(4, "cpu")))
    for b in (4, 8):  # switching everything to width b == the uniform W<b>A<b> network built from scratch
        sn.apply(sn.uniform(b, b, [999]))
        fresh = build_uniform(fp, calib, b, b, cfg, "cpu")
        with torch.no_grad():
            assert torch.equal(sn.backbone(x, t, y), fresh(x, t, y))
    # one layer switched: its quantizers equal those of a fresh calibration at that width
    sn.apply(sn.uniform(8, 8, [999]))
    name = sn.w_slots[1]
    sn.apply(Candidate(w={name: 4}, a={name: 4}, timesteps=[999]))
    fresh4 = dict(quant_layers(build_uniform(fp, calib, 4, 4, cfg, "cpu").net))[name]
    layer = sn.layers[name]
    with torch.no_grad():
        assert torch.equal(layer.quantized_weight(), fresh4.quantized_weight())
    assert torch.equal(layer.act_quantizer.quantizer.scale, fresh4.act_quantizer.quantizer.scale)
    # a mixed candidate on the super-network == the model exported from its spec and calibrated from scratch
    from pipeline.methods.tmpq import calibrate_fp_ranges
    from pipeline.quant.surgery import quantize_model

    cand = _random_candidate(sn, cfg, torch.Generator().manual_seed(0), [999, 500])
    sn.apply(cand)
    exported = copy.deepcopy(fp)
    quantize_model(exported.net, candidate_spec(cand, keep_bits=cfg.keep_first_last_bits))
    calibrate_fp_ranges(exported, calib, cfg.calib_batches, cfg.seed, "cpu")
    with torch.no_grad():
        assert torch.equal(sn.backbone(x, t, y), exported(x, t, y))
    with pytest.raises(ValueError, match="not one of"):
        sn.apply(Candidate(w={name: 6}, a={}, timesteps=[1]))


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_bitops_of_a_candidate_is_the_sum_over_its_timesteps_of_the_layer_costs(tiny_calibrated, kind):
    fp, calib = tiny_calibrated[kind]
    cfg = _cfg()
    sn = SuperNet(fp, calib, cfg)
    macs = per_image_macs(sn.backbone)
    cost = CostModel(sn, macs)
    gen = torch.Generator().manual_seed(1)
    for ts in ([999], [999, 400, 3], list(range(999, 0, -100))):
        cand = _random_candidate(sn, cfg, gen, ts)
        sn.apply(cand)
        # independent: the cost module on the switched network, one call, times the steps
        assert cost.bitops(cand) == pytest.approx(bitops(sn.backbone.net, macs, 1) * len(ts), rel=1e-12)
    lo, hi = sn.uniform(4, 4, [999, 3]), sn.uniform(8, 8, [999, 3])
    assert cost.bitops(lo) < cost.bitops(hi)


def test_choose_picks_the_best_point_within_the_budget():
    front = {"front": [{"bitops": 1e9, "holdout_mean": 0.3, "trial": 1}, {"bitops": 2e9, "holdout_mean": 0.1, "trial": 2},
                       {"bitops": 3e9, "holdout_mean": 0.05, "trial": 3}]}
    assert choose(front, 2.5e9)["trial"] == 2
    with pytest.raises(ValueError, match="no searched configuration"):
        choose(front, 0.5e9)


def test_search_config_errors_name_the_key():
    from pipeline.config import ConfigError

    for bad, msg in (({"w_bits": [4, 4]}, "search.w_bits"), ({"n_groups": 1}, "search.n_groups"),
                     ({"sampler": "grid"}, "search.sampler"), ({"budget_bitops": -1}, "search.budget_bitops")):
        with pytest.raises(ConfigError, match=msg):
            from_dict(SearchConfig, bad, "search")


# ---------------------------------------------------------------------------------------------------
def _run(saved, out, cfg, **kw):
    from pipeline.search import run_search

    _, _, root = saved
    return run_search("unet", cfg, DiffusionConfig(), SamplingConfig(steps=4), TrackingConfig(), root / "fp",
                      root / "calib", out, **kw)


def test_search_logs_nested_trials_and_two_workers_give_the_same_study(saved, tmp_path):
    import mlflow

    cfg = _cfg()
    # uninterrupted, one process
    doc1 = _run(saved, tmp_path / "one", cfg)
    assert doc1["n_trials"] == cfg.n_trials and doc1["front"] and doc1["comparisons"]
    assert all(p["feasible"] for p in doc1["front"])
    assert (tmp_path / "one" / "front.png").stat().st_size > 0 and (tmp_path / "one" / "front.md").exists()
    # the trials are nested under the study's parent run
    client = mlflow.tracking.MlflowClient()
    exp = client.get_experiment_by_name(TrackingConfig().experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'search-trial'")
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs}
    parent_runs = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'search'")
    assert len(runs) >= cfg.n_trials and None not in parents and parents <= {r.info.run_id for r in parent_runs}
    # the finished study is exported to an Optuna journal (for optuna-dashboard)
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = next((tmp_path / "one").glob("study-*.journal"))
    trials = optuna.load_study(study_name=doc1["study"],
                               storage=JournalStorage(JournalFileBackend(str(journal)))).get_trials()
    assert [t.values for t in trials] == [[p["proxy"], p["bitops"] / 1e9] for p in doc1["trials"]]
    # a rerun with nothing changed replays the study from the score cache: nothing scored, same bytes
    before = {f: (tmp_path / "one" / f).read_bytes() for f in ("front.json", "trials.csv")}
    doc_again = _run(saved, tmp_path / "one", cfg)
    assert doc_again["cached_scores"] >= cfg.n_trials
    assert {f: (tmp_path / "one" / f).read_bytes() for f in before} == before

    # two worker processes: the same trials as one
    doc4 = _run(saved, tmp_path / "two", _cfg(n_workers=2))
    key = lambda d: [(t["proxy"], t["bitops"]) for t in d["trials"]]  # noqa: E731
    assert doc4["n_trials"] == cfg.n_trials
    assert key(doc4) == key(doc1)


# the scaled-down default search (24 trials in rounds of 4) run in its own process, as the stage runs it
_KILL_CFG = dict(n_trials=24, batch_size=4, population_size=8)
_SEARCH_PROC = r"""
import json, sys
import pipeline
from pipeline.config import DiffusionConfig, SamplingConfig, SearchConfig, SearchProxyConfig, TrackingConfig, from_dict
from pipeline.search import run_search
root, out, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cfg = from_dict(SearchConfig, opts, "search")
doc = run_search("unet", cfg, DiffusionConfig(), SamplingConfig(steps=4), TrackingConfig(), root + "/fp",
                 root + "/calib", out, progress=True)
print("DONE", doc["n_trials"], doc["cached_scores"])
"""


def _opts(**kw):
    from pipeline.config import to_dict

    return to_dict(_cfg(**{**_KILL_CFG, **kw}))


def _search_process(saved, out, opts, fault=None, timeout=600):
    """Run the search in a fresh process (its own session); returns (returncode, stdout + stderr). With
    ``fault`` the process SIGKILLs itself at that point (pipeline.search._fault); its orphaned workers are
    killed with the session."""
    import json
    import os
    import signal
    import subprocess
    import sys

    _, _, root = saved
    env = dict(os.environ)
    env.pop("PIPELINE_SEARCH_FAULT", None)
    if fault:
        env["PIPELINE_SEARCH_FAULT"] = fault
    proc = subprocess.Popen([sys.executable, "-c", _SEARCH_PROC, str(root), str(out), json.dumps(opts)], env=env,
                            cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, text


def _outputs(d):
    return {f: (d / f).read_bytes() for f in ("front.json", "trials.csv", "front.md")}


def test_a_killed_search_resumes_into_the_uninterrupted_study(saved, tmp_path):
    """Real kills of a search process (SIGKILL at a point the fault hook names): between rounds, mid-round
    while two workers score, and during the held-out re-scoring; each rerun replays the study and the
    outputs equal an uninterrupted run byte for byte (which also ran with one worker instead of two)."""
    import signal

    straight = tmp_path / "straight"
    straight.mkdir()
    rc, text = _search_process(saved, straight / "unet", _opts(n_workers=1))
    assert rc == 0, text[-3000:]
    want = _outputs(straight / "unet")

    root = tmp_path / "killed"
    root.mkdir()
    out = root / "unet"
    for fault, workers in (("round1", 1),       # between rounds: rounds 0-1 told, nothing of round 2 asked
                           ("score7", 2),       # mid-round: a worker starts its 7th candidate, the other busy
                           ("holdout2", 2)):    # during the held-out re-scoring of the front
        rc, text = _search_process(saved, out, _opts(n_workers=workers), fault=fault)
        assert rc == -signal.SIGKILL, (fault, text[-3000:])
        assert not (out / "front.json").exists()  # killed before any result was written
    rc, text = _search_process(saved, out, _opts(n_workers=2))
    assert rc == 0, text[-3000:]
    cached = int(text.strip().splitlines()[-1].split()[-1])
    assert cached > 24  # every search score and the held-out ones finished before the last kill came back
    assert _outputs(out) == want


def test_an_extended_search_equals_the_longer_search_run_from_the_start(saved, tmp_path):
    """n_trials 22 (its last round of 4 asked only 2) raised to 24: the same study as 24 from the start."""
    full = _run(saved, tmp_path / "a" / "unet", _cfg(**_KILL_CFG))
    short = _run(saved, tmp_path / "b" / "unet", _cfg(**{**_KILL_CFG, "n_trials": 22}))
    assert [t["proxy"] for t in short["trials"]] == [t["proxy"] for t in full["trials"][:22]]
    extended = _run(saved, tmp_path / "b" / "unet", _cfg(**_KILL_CFG))
    assert extended["cached_scores"] >= 22
    assert _outputs(tmp_path / "b" / "unet") == _outputs(tmp_path / "a" / "unet")


def test_family_rows_come_from_the_front(saved, tmp_path):
    """``tmpq`` rebuilds the chosen front point from its spec (same outputs as the super-network with it
    switched in) and records its timesteps for the evaluate stage; ``uniform`` samples the full schedule."""
    from pipeline.config import parse_setting
    from pipeline.io import read_json
    from pipeline.methods import MethodContext, get_family
    from pipeline.methods.tmpq import TMPQConfig

    fp, calib, _ = saved
    cfg = _cfg()
    doc = _run(saved, tmp_path / "search" / "unet", cfg)
    fam = get_family("tmpq")
    budget_setting = parse_setting("W8A8")
    x, t, y = next(iter(calib.batches(4, "cpu")))
    for variant in ("tmpq", "uniform"):
        work = tmp_path / variant
        work.mkdir()
        ctx = MethodContext(device="cpu", diffusion=DiffusionConfig(), sampling=SamplingConfig(steps=4),
                            backbone_name="unet", workdir=work)
        cfg_v = fam.config_for(variant, TMPQConfig(search_dir=str(tmp_path / "search")))
        res = fam.quantize(copy.deepcopy(fp), calib, budget_setting, cfg_v, ctx)
        # the Python API runs the same row (no runner): the same model
        api = quantize(fp, "tmpq", "W8A8", calib, variant=variant, search_dir=str(tmp_path / "search"),
                                device="cpu", sampling=SamplingConfig(steps=4), workdir=tmp_path / f"api-{variant}")
        with torch.no_grad():
            assert torch.equal(api.backbone(x, t, y), res.backbone(x, t, y))
        if variant == "tmpq":
            point = choose(doc, doc["uniform_cost_per_step"]["W8A8"] * 4)
            cand = Candidate.from_dict(point["candidate"])
            assert read_json(work / "sampling.json")["timesteps"] == cand.timesteps
            assert res.info["trial"] == point["trial"] and len(cand.timesteps) == cfg.n_groups
            sn = SuperNet(fp, calib, cfg)
            sn.apply(cand)
            with torch.no_grad():
                assert torch.equal(res.backbone(x, t, y), sn.backbone(x, t, y))
        else:
            assert not (work / "sampling.json").exists() and res.info["n_steps"] == 4
    with pytest.raises(ValueError, match="did not price"):
        fam.quantize(copy.deepcopy(fp), calib, parse_setting("W6A6"), TMPQConfig(search_dir=str(tmp_path / "search")),
                     ctx)
    with pytest.raises(FileNotFoundError, match="search@unet"):
        fam.quantize(copy.deepcopy(fp), calib, budget_setting, TMPQConfig(search_dir=str(tmp_path / "none")), ctx)


def test_a_budget_no_candidate_meets_fails_before_the_study(saved, tmp_path):
    with pytest.raises(ValueError, match="exceeds the budget"):
        _run(saved, tmp_path / "s", _cfg(budget_bitops=1e-6))
    assert not list((tmp_path / "s").glob("study-*"))
