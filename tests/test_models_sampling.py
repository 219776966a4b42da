"""pipeline.models (build / save / load backbones) and pipeline.sampling (the one sampling loop)."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline import models, sampling
from pipeline.config import BackboneModel, DiffusionConfig, SamplingConfig

SIZE, CH, NCLS = 8, 1, 3
KINDS = ("unet", "dit", "pixart")


def inputs(b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, CH, SIZE, SIZE, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    y = torch.arange(b) % NCLS
    return x, t, y


@pytest.mark.parametrize("kind", KINDS)
def test_build_forward_shapes(tiny_backbone, kind):
    bb = tiny_backbone(kind, classes=NCLS, randomise=True)
    assert bb.kind == kind and bb.num_classes == NCLS and bb.sample_shape == (CH, SIZE, SIZE)
    assert type(bb.net).__name__ == models.CLASS_FOR_KIND[kind]
    assert (bb.caption_table is not None) == (kind == "pixart")
    x, t, y = inputs()
    out = bb(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_timesteps_match_per_sample_calls(tiny_backbone, kind):
    bb = tiny_backbone(kind, classes=NCLS, randomise=True)
    x, _, y = inputs()
    t = torch.tensor([999, 500, 20, 0])
    with torch.no_grad():
        together = bb(x, t, y)
        apart = torch.cat([bb(x[i : i + 1], t[i : i + 1], y[i : i + 1]) for i in range(4)])
        scalar = bb(x, 500, y)
        full = bb(x, torch.full((4,), 500), y)
    torch.testing.assert_close(together, apart, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scalar, full)
    assert not torch.allclose(together[1], bb(x[1:2], torch.tensor([20]), y[1:2])[0])


@pytest.mark.parametrize("kind", KINDS)
def test_labels_change_the_prediction(tiny_backbone, kind):
    bb = tiny_backbone(kind, classes=NCLS, randomise=True)
    x, t, _ = inputs()
    with torch.no_grad():
        a = bb(x, t, torch.zeros(4, dtype=torch.long))
        b = bb(x, t, torch.ones(4, dtype=torch.long))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(tiny_backbone, kind, tmp_path):
    bb = tiny_backbone(kind, classes=NCLS, randomise=True)
    models.save_backbone(bb, tmp_path / "m")
    assert (tmp_path / "m" / "net" / "config.json").exists()
    meta = json.loads((tmp_path / "m" / "backbone.json").read_text())
    assert meta["kind"] == kind and meta["num_classes"] == NCLS and meta["sample_shape"] == [CH, SIZE, SIZE]
    assert (tmp_path / "m" / "conditioning.safetensors").exists() == (kind == "pixart")
    loaded = models.load_backbone(tmp_path / "m")
    assert loaded.kind == kind and loaded.sample_shape == bb.sample_shape and not loaded.training
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(bb(x, t, y), loaded(x, t, y))


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_load_plain_diffusers_directory(tiny_backbone, kind, tmp_path):
    bb = tiny_backbone(kind, classes=NCLS, randomise=True)
    bb.net.save_pretrained(str(tmp_path))
    loaded = models.load_backbone(tmp_path)
    assert loaded.kind == kind and loaded.num_classes == NCLS and loaded.sample_shape == (CH, SIZE, SIZE)
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(bb(x, t, y), loaded(x, t, y))


def test_plain_pixart_needs_caption_embeddings(tiny_backbone, tmp_path):
    bb = tiny_backbone("pixart", classes=NCLS, randomise=True)
    bb.net.save_pretrained(str(tmp_path))
    loaded = models.load_backbone(tmp_path)
    assert loaded.kind == "pixart" and loaded.caption_table is None
    x, t, y = inputs()
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        loaded(x, t, y)
    emb = bb.caption_embeddings(y)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, encoder_hidden_states=emb), bb(x, t, y))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        models.load_backbone(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="neither a saved backbone"):
        models.load_backbone(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    with pytest.raises(ValueError, match="'VQModel'.*UNet2DModel, DiTTransformer2DModel, PixArtTransformer2DModel"):
        models.load_backbone(tmp_path)


def test_build_errors():
    with pytest.raises(ValueError, match="kind.*unet, dit, pixart"):
        models.build_backbone("vae", BackboneModel(), SIZE, CH, NCLS)
    cfg = BackboneModel()
    cfg.dit.patch_size = 3
    with pytest.raises(ValueError, match="patch_size"):
        models.build_backbone("dit", cfg, SIZE, CH, NCLS)


def test_learned_sigma_output_is_cut():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    net = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=CH, out_channels=2 * CH,
                                num_layers=1, sample_size=SIZE, patch_size=2, num_embeds_ada_norm=NCLS)
    bb = models.DiffusionBackbone(net, "dit", NCLS, (CH, SIZE, SIZE)).eval()
    x, t, y = inputs()
    with torch.no_grad():
        full = net(x, timestep=t, class_labels=y).sample
        assert full.shape[1] == 2 * CH
        assert torch.equal(bb(x, t, y), full[:, :CH])


# ---------------------------------------------------------------------------------------------- sampling
def test_noise_and_labels():
    a = sampling.initial_noise(6, (CH, SIZE, SIZE), seed=5)
    assert a.shape == (6, CH, SIZE, SIZE) and a.device.type == "cpu"
    assert torch.equal(a, sampling.initial_noise(6, (CH, SIZE, SIZE), seed=5))
    assert not torch.equal(a, sampling.initial_noise(6, (CH, SIZE, SIZE), seed=6))
    # a longer draw starts with the shorter one: sample i has the same x_T whatever n is
    assert torch.equal(sampling.initial_noise(10, (CH, SIZE, SIZE), seed=5)[:6], a)
    assert sampling.eval_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_timestep_values_and_scheduler():
    d, s = DiffusionConfig(), SamplingConfig(steps=10)
    ts = sampling.timestep_values(d, s)
    assert len(ts) == 10 and ts[0] == 999 and ts == sorted(ts, reverse=True)
    sched = sampling.make_scheduler(d, s)
    assert [int(t) for t in sched.timesteps] == ts
    assert sched.config.beta_schedule == d.beta_schedule
    with pytest.raises(ValueError, match="sampling.scheduler.*ddim, ddpm, dpm"):
        sampling.make_scheduler(d, SamplingConfig(scheduler="euler"))
    with pytest.raises(ValueError, match="sampling.steps"):
        sampling.make_scheduler(d, SamplingConfig(steps=5000))


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_sample_is_deterministic_and_in_range(tiny_backbone, kind):
    bb = tiny_backbone(kind, classes=NCLS, randomise=True)
    bb.train()
    d, s = DiffusionConfig(), SamplingConfig(steps=4)
    noise = sampling.initial_noise(5, bb.sample_shape, 0)
    labels = sampling.eval_labels(5, NCLS)
    a = sampling.sample(bb, noise, labels, d, s)
    b = sampling.sample(bb, noise.clone(), labels, d, s)
    assert bb.training, "sample() must restore the module's mode"
    assert a.shape == noise.shape and torch.equal(a, b)
    assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
    c = sampling.sample(bb, sampling.initial_noise(5, bb.sample_shape, 1), labels, d, s)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("scheduler", ["ddpm", "dpm"])
def test_other_samplers_run_and_repeat(tiny_backbone, scheduler):
    bb = tiny_backbone("unet", classes=NCLS, randomise=True)
    d, s = DiffusionConfig(), SamplingConfig(scheduler=scheduler, steps=3)
    noise = sampling.initial_noise(3, bb.sample_shape, 0)
    labels = sampling.eval_labels(3, NCLS)
    a = sampling.sample(bb, noise, labels, d, s, seed=1)
    assert torch.isfinite(a).all() and torch.equal(a, sampling.sample(bb, noise, labels, d, s, seed=1))


def test_step_hook_sees_every_step(tiny_backbone):
    bb = tiny_backbone("dit", classes=NCLS, randomise=True)
    d, s = DiffusionConfig(), SamplingConfig(steps=5)
    noise = sampling.initial_noise(3, bb.sample_shape, 0)
    labels = sampling.eval_labels(3, NCLS)
    calls = []

    def hook(i, t, x_t, y):
        calls.append((i, t.clone(), x_t.clone(), y.clone()))
        # a hook may run its own differentiable computation (QAT does)
        with torch.enable_grad():
            w = torch.ones((), requires_grad=True)
            (w * x_t.sum()).backward()
            assert w.grad is not None

    out = sampling.sample(bb, noise, labels, d, s, step_hook=hook)
    expected = sampling.timestep_values(d, s)
    assert [c[0] for c in calls] == list(range(5))
    for (_i, t, x_t, y), tv in zip(calls, expected):
        assert t.shape == (3,) and t.dtype == torch.long and bool((t == tv).all())
        assert x_t.shape == noise.shape and torch.equal(y, labels)
    assert torch.equal(calls[0][2], noise)  # the first input is x_T itself
    # x_t recorded by the hook replays the loop: the model's prediction at that input drives the next state
    assert not torch.equal(calls[1][2], calls[0][2])
    assert torch.equal(out, sampling.sample(bb, noise, labels, d, s))
