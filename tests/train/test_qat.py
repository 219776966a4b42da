"""QAT by trajectory distillation: relation losses (TRD, memory queue), feature taps, the teacher cache,
parameter groups, config validation, and a short QAT run that lowers the distillation loss."""
import copy

import pytest
import torch

from pipeline.config import (BitSetting, ConfigError, DiffusionConfig, SamplingConfig, from_dict)
from pipeline.train import relation as rel
from pipeline.train.qat import (CachedTeacher, QATConfig, distillation_error, find_feature_module,
                                lora_step_match, parameter_groups, run_qat)


def _feats(seed, shape=(2, 6, 4, 4)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# relation losses
# ------------------------------------------------------------------------------------------------
def test_relation_loss_zero_for_identical_positive_otherwise_with_gradient():
    ft = _feats(0)
    assert rel.relation_loss(ft, ft.clone()).item() == pytest.approx(0.0, abs=1e-6)
    fs = _feats(1).requires_grad_(True)
    loss = rel.relation_loss(ft, fs)
    assert loss.item() > 0
    loss.backward()
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    # independent reference: explicit cosine-similarity matrix and KL per row
    pt = torch.nn.functional.normalize(ft.flatten(2), dim=1).transpose(1, 2)
    ps = torch.nn.functional.normalize(fs.detach().flatten(2), dim=1).transpose(1, 2)
    p = torch.softmax(pt @ pt.transpose(1, 2), -1)
    q = torch.softmax(ps @ ps.transpose(1, 2), -1)
    ref = (p * (p.log() - q.log())).sum(-1).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    # token features [B, N, D] are pixels too
    tok = torch.randn(2, 5, 7)
    assert rel.relation_loss(tok, tok).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        rel.relation_loss(ft, _feats(2, (2, 6, 2, 2)))
    with pytest.raises(ValueError, match="expected"):
        rel.relation_loss(torch.randn(4, 4), torch.randn(4, 4))


def test_trd_averages_a_window_and_trains_the_current_student_step():
    trd = rel.TimeSmoothedRelationLoss(window=2)
    f1t, f2t = _feats(0), _feats(1)
    f1s, f2s = _feats(2).requires_grad_(True), _feats(3).requires_grad_(True)
    assert trd(900, f1t, f1s) is None  # first step of the window
    loss = trd(800, f2t, f2s)
    ref = rel.relation_loss((f1t + f2t) / 2, (f1s.detach() + f2s.detach()) / 2)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6) and loss.item() > 0
    loss.backward()
    assert f2s.grad is not None and f2s.grad.abs().sum() > 0
    assert f1s.grad is None  # the earlier step's parameters have been updated since: constant
    assert trd(700, f1t, f1t.clone()) is None
    assert trd(600, f2t, f2t.clone()).item() == pytest.approx(0.0, abs=1e-6)
    # a new trajectory (timestep goes up) restarts the window
    assert trd(500, f1t, f1s) is None
    assert trd(950, f1t, f1s) is None
    with pytest.raises(ValueError, match="window"):
        rel.TimeSmoothedRelationLoss(window=0)


def _mem_reference(ft, fs, memory, tau=1.0, decay=1.0):
    """Independent MTRD reference for one sample: ft, fs [C, H, W]; memory: list of [P, C] teacher
    embeddings (oldest first). Per entry: KL of row-softmax(query · keysᵀ / τ), weighted decay^age."""
    qt = torch.nn.functional.normalize(ft.flatten(1), dim=0).T  # [P, C]
    qs = torch.nn.functional.normalize(fs.flatten(1), dim=0).T

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1).mean()

    total = kl(torch.softmax(qt @ qt.T / tau, -1), torch.softmax(qs @ qs.T / tau, -1))
    norm = 1.0
    for age, m in enumerate(reversed(memory), start=1):
        w = decay ** age
        total = total + w * kl(torch.softmax(qt @ m.T / tau, -1), torch.softmax(qs @ m.T / tau, -1))
        norm += w
    return total / norm


def test_memory_buckets_hold_teacher_embeddings_fifo_per_timestep_across_trajectories():
    m = rel.MemoryRelationLoss(memory_length=2)
    steps = [999, 499]
    feats = {}
    for traj in range(3):  # three trajectories (3 batches of 2 images) over the same two timesteps
        m.start_trajectory()  # a new trajectory keeps the memory
        for j, t in enumerate(steps):
            ft, fs = _feats(10 * traj + j), _feats(100 + 10 * traj + j).requires_grad_(True)
            feats[(traj, t)] = ft
            loss = m(torch.full((2,), t), ft, fs)
            loss.backward()
            assert fs.grad.abs().sum() > 0  # the student's current features get gradient
    assert m.timesteps == [499, 999]
    for t in steps:
        bucket = m.bucket(t)
        # FIFO of length 2 per bucket: the two images of the latest trajectory, teacher side, in sample order
        expect = rel.normalized_pixels(feats[(2, t)])
        assert len(bucket) == 2
        for e, ref in zip(bucket, expect):
            assert torch.equal(e, ref) and not e.requires_grad
    # memory_length 3: the oldest entry (an image of the previous trajectory) is kept, oldest first
    m3 = rel.MemoryRelationLoss(memory_length=3)
    for traj in range(2):
        m3(torch.full((2,), 999), feats[(traj, 999)], feats[(traj, 999)].clone())
    b = m3.bucket(999)
    assert torch.equal(b[0], rel.normalized_pixels(feats[(0, 999)])[1])
    assert torch.equal(b[1], rel.normalized_pixels(feats[(1, 999)])[0])
    # the loss against the memory equals the independent reference (mean over samples)
    ft, fs = _feats(7), _feats(8)
    mem = m.bucket(999)
    loss = m(torch.full((2,), 999), ft, fs)
    ref = torch.stack([_mem_reference(ft[i], fs[i], mem) for i in range(2)]).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    # reset empties everything; M = 0: the single-step relation loss, nothing stored
    m.reset()
    assert m.timesteps == []
    z = rel.MemoryRelationLoss(0)
    assert z(5, _feats(1), _feats(2)).item() == pytest.approx(rel.relation_loss(_feats(1), _feats(2)).item(), rel=1e-6)
    assert z.timesteps == []
    with pytest.raises(ValueError, match="memory_length"):
        rel.MemoryRelationLoss(-1)
    with pytest.raises(ValueError, match="one timestep per sample"):
        m(torch.tensor([1, 2, 3]), _feats(1), _feats(2))
    with pytest.raises(ValueError, match="relation kind"):
        rel.build_relation_loss("l2")


def test_memory_mixed_timestep_batch_uses_each_samples_bucket():
    m = rel.MemoryRelationLoss(memory_length=2, decay=0.5)
    # fill bucket 999 and bucket 499 with different images
    m(torch.tensor([999, 999]), _feats(1), _feats(1))
    m(torch.tensor([499, 499]), _feats(2), _feats(2))
    m(torch.tensor([499]), _feats(3, (1, 6, 4, 4)), _feats(3, (1, 6, 4, 4)))
    mem999, mem499 = m.bucket(999), m.bucket(499)
    assert len(mem999) == 2 and len(mem499) == 2
    ft, fs = _feats(4, (3, 6, 4, 4)), _feats(5, (3, 6, 4, 4))
    t = torch.tensor([999, 499, 200])  # 200: an empty bucket -> only the in-image relation
    loss = m(t, ft, fs)
    ref = torch.stack([_mem_reference(ft[0], fs[0], mem999, decay=0.5), _mem_reference(ft[1], fs[1], mem499, decay=0.5),
                       _mem_reference(ft[2], fs[2], [], decay=0.5)]).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    # and each sample was enqueued into its own bucket
    assert torch.equal(m.bucket(200)[0], rel.normalized_pixels(ft)[2])
    assert torch.equal(m.bucket(999)[-1], rel.normalized_pixels(ft)[0])
    assert torch.equal(m.bucket(499)[-1], rel.normalized_pixels(ft)[1])
    # the memory matters: same current features, different history -> different loss
    a, b = rel.MemoryRelationLoss(2), rel.MemoryRelationLoss(2)
    a(900, _feats(0), _feats(0))
    b(900, _feats(9), _feats(9))
    assert a(900, _feats(1), _feats(2)).item() != pytest.approx(b(900, _feats(1), _feats(2)).item())


def test_memory_loss_is_deterministic():
    def run():
        torch.manual_seed(0)
        m = rel.MemoryRelationLoss(memory_length=3, decay=0.9)
        out = []
        for i, t in enumerate([999, 499, 999, 499, 999]):
            out.append(m(torch.tensor([t, 499]), _feats(i), _feats(50 + i)))
        return torch.stack(out)

    assert torch.equal(run(), run())


# ------------------------------------------------------------------------------------------------
# config, features, teacher cache, groups
# ------------------------------------------------------------------------------------------------
def test_qat_config_errors_name_the_key():
    assert from_dict(QATConfig, {"epochs": 3, "lora_lr": None}, "qat").epochs == 3
    with pytest.raises(ConfigError, match=r"qat\.epochs: must be >= 1"):
        from_dict(QATConfig, {"epochs": 0}, "qat")
    with pytest.raises(ConfigError, match=r"qat\.memory_decay"):
        from_dict(QATConfig, {"memory_decay": 0.0}, "qat")
    with pytest.raises(ConfigError, match=r"qat\.lr: unknown key"):
        from_dict(QATConfig, {"lr": 0.1}, "qat")


@pytest.fixture(scope="module")
def tiny(tiny_calibrated):
    """{kind: (fp, MPQ-DMv2 W2A4 student)} on the shared tiny models, with their diffusion and sampling config."""
    from pipeline.methods import MethodContext, get_family
    from pipeline.methods.mpqdm import quantize

    diff, samp = DiffusionConfig(), SamplingConfig(steps=3)
    out = {}
    for kind, (fp, calib) in tiny_calibrated.items():
        student = copy.deepcopy(fp)
        torch.manual_seed(0)
        cfg = get_family("mpq").config_for("mpqdm2", lora_rank=4, calib_inputs=8, act_calib_batches=1,
                                           act_init="minmax", weight_init="minmax")
        quantize(student, calib, BitSetting(2, 4), cfg, MethodContext())
        out[kind] = (fp, student)
    return out, diff, samp


def test_feature_module_found_by_name(tiny):
    models, _, _ = tiny
    unet, dit = models["unet"][1].net, models["dit"][1].net
    assert find_feature_module(unet) == "up_blocks.1"
    assert find_feature_module(dit) == "transformer_blocks.0"
    assert find_feature_module(unet, "mid_block") == "mid_block"
    with pytest.raises(ValueError, match="feature_module"):
        find_feature_module(unet, "nope")
    with pytest.raises(ValueError, match="feature_module"):
        find_feature_module(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_cached_teacher_runs_the_teacher_once_per_step(tiny):
    models, _, _ = tiny
    fp = models["unet"][0]
    calls = []
    h = fp.register_forward_hook(lambda *a: calls.append(1))
    try:
        cached = CachedTeacher(fp)
        x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 5]), torch.tensor([1, 2])
        eps = fp(x, t, y)
        cached.cache = (x, t, eps)
        assert cached(x, t, y) is eps and len(calls) == 1
        other = cached(x + 1, t, y)  # not the cached input: runs the teacher
        assert len(calls) == 2 and not torch.equal(other, eps)
    finally:
        h.remove()


def test_parameter_groups_have_three_kinds_with_their_rates(tiny):
    from pipeline.quant.surgery import quant_layers

    models, _, _ = tiny
    student = copy.deepcopy(models["unet"][1])
    cfg = QATConfig(lora_lr=None, lora_lr_scale=0.5, weight_quant_lr=1e-5, act_quant_lr=2e-3, match_lora_step=False)
    groups, summary = parameter_groups(student.net, cfg)
    kinds = {g["name"] for g in groups}
    assert kinds == {"lora", "weight_quant", "act_quant"}
    assert summary["lora_params"] > 0 and summary["weight_quant_params"] > 0 and summary["act_quant_params"] > 0
    layer = next(l for _, l in quant_layers(student.net) if l.lora_A is not None)
    g = next(g for g in groups if g["params"][0] is layer.lora_A)
    mean_step = torch.cat([q.scale.detach()[q.channel_mask] if q.channel_mask is not None else q.scale.detach()
                           for q in layer.weight_quantizers]).mean().item()
    assert g["lr"] == pytest.approx(0.5 * mean_step, rel=1e-5)
    assert next(g for g in groups if g["name"] == "act_quant")["lr"] == 2e-3
    trainable = {id(p) for p in student.net.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in groups for p in g["params"]}
    assert not any(l.weight.requires_grad for _, l in quant_layers(student.net))
    # SVD-initialised factors (non-zero B) get a smaller rate, matched to the Kaiming / zero-B start
    f = lora_step_match(layer)
    assert 0 < f < 1
    matched, _ = parameter_groups(student.net, QATConfig(lora_lr=1e-3))
    assert next(g for g in matched if g["params"][0] is layer.lora_A)["lr"] == pytest.approx(1e-3 * f)
    with torch.no_grad():
        layer.lora_B.zero_()
    assert lora_step_match(layer) == 1.0


@pytest.mark.parametrize("relation", ["memory", "trd"])
def test_short_qat_lowers_the_distillation_loss(tiny, relation):
    models, diff, samp = tiny
    fp, student0 = models["unet"]
    student = copy.deepcopy(student0)
    before = distillation_error(student, fp, diff, samp, n=8)
    cfg = QATConfig(epochs=2, batch_size=8, lora_lr=2e-3, weight_quant_lr=1e-4, act_quant_lr=2e-3,
                    relation_weight=1.0, memory_length=2)
    summary = run_qat(student, fp, diff, samp, cfg, relation=relation, progress=False)
    after = distillation_error(student, fp, diff, samp, n=8)
    assert summary["updates"] == 2 * samp.steps
    assert after < 0.95 * before
    rels = [h["relation"] for h in summary["history"]]
    if relation == "trd":  # every 2nd step completes a window
        assert rels[0] != rels[0] and rels[1] == rels[1]
    else:
        assert all(r == r and r >= 0 for r in rels)
    assert not any(p.requires_grad for p in student.parameters())


def test_qat_runs_on_the_dit_and_moves_the_lora(tiny):
    from pipeline.quant.surgery import quant_layers

    models, diff, samp = tiny
    fp, student0 = models["dit"]
    student = copy.deepcopy(student0)
    summary = run_qat(student, fp, diff, samp, QATConfig(epochs=1, batch_size=4, lora_lr=1e-3), relation="memory",
                      progress=False)
    assert summary["feature_module"] == "transformer_blocks.0" and summary["updates"] == samp.steps
    assert all(h["eps_mse"] == h["eps_mse"] and h["relation"] >= 0 for h in summary["history"])
    moved = [not torch.equal(a.lora_B, b.lora_B) for (_, a), (_, b) in
             zip(quant_layers(student.net), quant_layers(student0.net)) if a.lora_B is not None]
    assert moved and all(moved)


def test_heldout_curve_is_logged_and_does_not_change_training(tiny, tmp_path):
    from lightning.pytorch.loggers import MLFlowLogger
    import mlflow

    models, diff, samp = tiny
    fp, student0 = models["unet"]
    cfg = dict(epochs=2, batch_size=4, lora_lr=2e-3, relation_weight=1.0, memory_length=2)
    off, default, on = copy.deepcopy(student0), copy.deepcopy(student0), copy.deepcopy(student0)
    s_off = run_qat(off, fp, diff, samp, QATConfig(**cfg, curve_every=0), relation="memory", progress=False)
    run_qat(default, fp, diff, samp, QATConfig(**cfg), relation="memory", progress=False)
    uri = f"sqlite:///{tmp_path}/m.db"
    logger = MLFlowLogger(experiment_name="curve", tracking_uri=uri)
    s_on = run_qat(on, fp, diff, samp, QATConfig(**cfg, curve_every=2, curve_samples=4), relation="memory",
                   logger=logger, progress=False)
    assert "curve" not in s_off
    assert [n for n, _ in s_on["curve"]] == [0, 2, 4, 6]  # 2 epochs x 3 steps, every 2 updates
    assert all(v == v and v >= 0 for _, v in s_on["curve"])
    assert s_on["curve"][-1][1] < s_on["curve"][0][1]
    assert s_on["curve"][-1][1] == pytest.approx(distillation_error(on, fp, diff, samp, n=4))
    for a, b, c in zip(off.state_dict().values(), default.state_dict().values(), on.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)  # option off = no option; the check is read-only
    hist = mlflow.tracking.MlflowClient(tracking_uri=uri).get_metric_history(logger.run_id, "qat/heldout_eps_mse")
    assert sorted(m.step for m in hist) == [0, 2, 4, 6]
