"""Diffusers pipeline directories as sources (pipeline.hub): tiny random-weight pipelines of the five kinds the
field quantizes, saved with diffusers' own ``save_pretrained``. The reference is each diffusers pipeline's own
output for the same noise and prompt; then every kind goes through calibrate -> quantize (naive and the
families that support its denoiser) -> sampling with decoded images."""
import json
import math
import shutil

import pytest
import torch

from pipeline.config import CalibrateConfig, DiffusionConfig, SamplingConfig

KINDS = ("ddpm", "ldm", "dit", "pixart", "sd")
PIPELINE_CLASS = {"ddpm": "DDPMPipeline", "ldm": "LDMPipeline", "dit": "DiTPipeline",
                  "pixart": "PixArtAlphaPipeline", "sd": "StableDiffusionPipeline"}
GUIDANCE = {"ddpm": 1.0, "ldm": 1.0, "dit": 4.0, "pixart": 4.5, "sd": 7.5}
OWN = SamplingConfig(scheduler="own", steps=4)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    from pipeline import tiny_pipelines

    root = tmp_path_factory.mktemp("pipes")
    for kind in KINDS:
        tiny_pipelines.save(kind, root / kind)
    tiny_pipelines.write_prompts(root / "prompts.txt")
    return root


def _load(pipes, kind, **kw):
    from pipeline.hub import load_pipeline

    kw.setdefault("guidance_scale", GUIDANCE[kind])
    return load_pipeline(pipes / kind, prompts=pipes / "prompts.txt", **kw)


def _reference(pipes, kind, labels, steps, seed):
    """The diffusers pipeline's own images in [-1, 1] for ``labels`` (class labels / prompt line indices)."""
    import diffusers

    from pipeline.tiny_pipelines import PROMPTS

    pipe = getattr(diffusers, PIPELINE_CLASS[kind]).from_pretrained(str(pipes / kind))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    common = dict(generator=g, num_inference_steps=steps, output_type="np")
    if kind in ("ddpm", "ldm"):
        out = pipe(batch_size=len(labels), **common).images
    elif kind == "dit":
        out = pipe(class_labels=labels, guidance_scale=GUIDANCE[kind], **common).images
    else:
        extra = {"clean_caption": False, "use_resolution_binning": False} if kind == "pixart" else {}
        out = pipe(prompt=[PROMPTS[i] for i in labels], guidance_scale=GUIDANCE[kind], height=16, width=16,
                   **common, **extra).images
    return torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_equals_the_diffusers_pipeline(pipes, kind):
    from pipeline.sampling import sample

    bb = _load(pipes, kind)
    labels = [1, 2] if kind == "dit" else [0, 2]
    ref = _reference(pipes, kind, labels, 4, seed=0)
    g = torch.Generator().manual_seed(0)  # the pipeline draws x_T, then the step noise, from one generator
    noise = torch.randn((2, *bb.sample_shape), generator=g)
    out = sample(bb, noise, torch.tensor(labels), DiffusionConfig(), OWN, generator=g)
    assert out.shape == ref.shape == (2, *bb.image_shape())
    # the pipelines' postprocess rounds through float32 [0, 1]; DiT batches the guided pair differently
    assert (out - ref).abs().max() < 1e-5


def test_guidance_changes_the_images_and_one_means_none(pipes):
    from pipeline.sampling import sample

    bb = _load(pipes, "sd", guidance_scale=1.0)
    noise, labels = torch.randn(2, *bb.sample_shape, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1])
    plain = sample(bb, noise, labels, DiffusionConfig(), OWN)
    with torch.no_grad():
        x, t = noise, torch.tensor([500, 500])
        assert torch.equal(bb(x, t, labels), bb.net(x, t, encoder_hidden_states=bb.caption_embeddings(labels)).sample)
    guided = sample(bb.set_guidance(3.0), noise, labels, DiffusionConfig(), OWN)
    assert (plain - guided).abs().max() > 1e-3


def test_prediction_type_and_schedule_come_from_the_directory(pipes, tmp_path):
    from diffusers import DDPMScheduler

    from pipeline.sampling import make_scheduler

    d = tmp_path / "vpred"
    shutil.copytree(pipes / "ddpm", d)
    cfg_file = d / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2", num_train_timesteps=500)
    cfg_file.write_text(json.dumps(cfg))
    from pipeline.hub import load_pipeline

    bb = load_pipeline(d)
    want = DDPMScheduler(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2", num_train_timesteps=500)
    for name in ("own", "ddim", "dpm"):  # another sampler keeps the model's schedule and prediction type
        s = make_scheduler(DiffusionConfig(), SamplingConfig(scheduler=name, steps=5), bb.scheduler_config)
        assert s.config.prediction_type == "v_prediction" and s.config.num_train_timesteps == 500
        assert torch.allclose(s.alphas_cumprod, want.alphas_cumprod)
    assert type(make_scheduler(DiffusionConfig(), SamplingConfig(scheduler="own", steps=5),
                               bb.scheduler_config)).__name__ == "DDPMScheduler"
    with pytest.raises(ValueError, match=r"sampling.steps: must be in 1..500"):
        make_scheduler(DiffusionConfig(), SamplingConfig(scheduler="own", steps=600), bb.scheduler_config)
    with pytest.raises(ValueError, match="sampling.scheduler: 'own'"):
        make_scheduler(DiffusionConfig(), SamplingConfig(scheduler="own", steps=5))


@pytest.mark.parametrize("kind", KINDS)
def test_saved_backbone_round_trips(pipes, kind, tmp_path):
    from pipeline.models import load_backbone, save_backbone
    from pipeline.sampling import sample

    bb = _load(pipes, kind)
    save_backbone(bb, tmp_path / "fp")
    back = load_backbone(tmp_path / "fp")
    assert (back.conditioning, back.guidance_scale, back.num_classes, back.sample_shape) == \
        (bb.conditioning, bb.guidance_scale, bb.num_classes, bb.sample_shape)
    assert (back.codec is None) == (bb.codec is None) and back.scheduler_config == bb.scheduler_config
    noise, labels = torch.randn(2, *bb.sample_shape, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1])
    assert torch.equal(sample(bb, noise, labels, DiffusionConfig(), OWN), sample(back, noise, labels,
                                                                                DiffusionConfig(), OWN))
    if bb.conditioning == "text":  # prompts stored once each (plus the null prompt), frozen
        assert back.caption_table.weight.shape[0] == 5 and not back.caption_table.weight.requires_grad
        from pipeline.tiny_pipelines import PROMPTS

        assert back.prompts == bb.prompts == list(PROMPTS)


def test_evaluation_scores_prompts_classes_or_nothing(pipes):
    """CLIP / HPSv2 score a text model's image against its prompt, a class model's against its class caption
    (and only then is conditional accuracy measured), an unconditional model's against nothing."""
    from types import SimpleNamespace

    from pipeline.evaluation import Evaluator

    ev = SimpleNamespace(class_names=["zero", "one"])
    labels = torch.tensor([0, 1])
    captions, by_class = Evaluator.captions(ev, _load(pipes, "sd"), labels)
    assert captions == ["a handwritten seven", "a photo of a cat"] and not by_class
    assert Evaluator.captions(ev, _load(pipes, "ddpm"), labels) == (None, False)
    dit = _load(pipes, "dit")  # 1000 classes: not the dataset's two
    assert Evaluator.captions(ev, dit, labels) == (None, False)
    dit.num_classes = 2
    captions, by_class = Evaluator.captions(ev, dit, labels)
    assert by_class and len(captions) == 2


def test_autoencoder_and_text_encoder_stay_out_of_the_quantized_tree(pipes):
    import copy

    bb = _load(pipes, "pixart")
    names = [n for n, _ in bb.named_modules()]
    assert not any("vae" in n or "text_encoder" in n for n in names)
    assert copy.deepcopy(bb).codec is bb.codec  # shared, never duplicated


# -------------------------------------------------------------------------------------------------
# calibrate -> quantize -> sample, every kind; every family on at least one kind
# -------------------------------------------------------------------------------------------------
FAST = {
    "naive": ("W8A8", None, {"calib_batches": 1}),
    "qdiff": ("W4A8", "qdiff", {"calib_batches": 1, "recon": {"iters": 2, "batch_size": 4},
                                "act_recon": {"iters": 2, "batch_size": 4}}),
    "dilatequant": ("W4A8", "dilatequant_no_tpq", {"calib_batches": 1, "bkd": {"iters": 2, "batch_size": 4}}),
    "mpq": ("W4A8", "mpqdm2", {"lora_rank": 2, "calib_inputs": 8, "act_calib_batches": 1, "weight_init": "minmax",
                               "act_init": "minmax", "qat": {"epochs": 1, "batch_size": 2, "check_samples": 0}}),
    "fp4dit": ("W4A8", "fp4dit", {"recon": {"iters": 2, "batch_size": 4}}),
    "peers": ("W8A8", "torchao", {}),
}
ROUTES = [("ddpm", "naive"), ("ddpm", "qdiff"), ("ldm", "naive"), ("ldm", "dilatequant"), ("dit", "naive"),
          ("dit", "fp4dit"), ("dit", "peers"), ("pixart", "naive"), ("pixart", "fp4dit"), ("sd", "naive"),
          ("sd", "mpq")]


@pytest.fixture(scope="module")
def calibrated(pipes):
    from pipeline.calibration import collect_calibration

    out = {}
    for kind in KINDS:
        bb = _load(pipes, kind)
        out[kind] = (bb, collect_calibration(bb, CalibrateConfig(n_samples=4, n_timesteps=2, batch_size=4),
                                             DiffusionConfig(), OWN))
    return out


def test_calibration_of_an_unconditional_model(calibrated):
    bb, calib = calibrated["ddpm"]
    assert bb.conditioning == "none" and bb.num_classes == 1
    assert len(calib) == 8 and calib.x.shape[1:] == bb.sample_shape and int(calib.labels.max()) == 0
    _, latent = calibrated["ldm"]
    assert latent.x.shape[1:] == (3, 8, 8)  # latents, not pixels


def test_every_family_has_a_route():
    from pipeline.methods import families

    ours = {n for n, f in families().items() if f.quantize.__module__.startswith("pipeline.methods.")}
    assert ours - {"tmpq"} == {fam for _, fam in ROUTES}  # tmpq needs a search front (tests/methods/test_tmpq)


@pytest.mark.parametrize("kind,family", ROUTES)
def test_calibrate_quantize_sample(calibrated, kind, family):
    from pipeline.api import quantize
    from pipeline.sampling import sample

    fp, calib = calibrated[kind]
    setting, variant, overrides = FAST[family]
    res = quantize(fp, family, setting, calib, variant=variant, device="cpu", sampling=OWN, **overrides)
    noise, labels = torch.randn(2, *fp.sample_shape, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 1])
    ref = sample(fp, noise, labels, DiffusionConfig(), OWN)
    out = sample(res.backbone, noise, labels, DiffusionConfig(), OWN)
    assert out.shape == ref.shape == (2, *fp.image_shape()) and torch.isfinite(out).all()
    assert res.backbone.codec is fp.codec
    psnr = 10 * math.log10(4.0 / float(((out - ref) ** 2).mean().clamp_min(1e-12)))
    assert psnr > (25.0 if setting == "W8A8" else 10.0), psnr


# -------------------------------------------------------------------------------------------------
# bad input: one clear error naming the key or the piece, before any weights are read
# -------------------------------------------------------------------------------------------------
def _edit_index(src, dst, drop=(), **set_):
    shutil.copytree(src, dst)
    index = json.loads((dst / "model_index.json").read_text())
    for k in drop:
        index.pop(k)
    index.update(set_)
    (dst / "model_index.json").write_text(json.dumps(index))
    return dst


def test_bad_pipeline_directories(pipes, tmp_path):
    from pipeline.hub import check_pipeline_dir

    prompts = pipes / "prompts.txt"
    with pytest.raises(ValueError, match=r"model.pixart.source: .*lists no tokenizer"):
        check_pipeline_dir(_edit_index(pipes / "pixart", tmp_path / "a", drop=["tokenizer"]), prompts,
                           prefix="model.pixart")
    with pytest.raises(ValueError, match=r"source: a DiTPipeline samples latents.*no autoencoder"):
        check_pipeline_dir(_edit_index(pipes / "dit", tmp_path / "b", drop=["vae"]))
    with pytest.raises(ValueError, match=r"source: the denoiser transformer/ is a SD3Transformer2DModel"):
        check_pipeline_dir(_edit_index(pipes / "dit", tmp_path / "c", transformer=["diffusers",
                                                                                  "SD3Transformer2DModel"]))
    with pytest.raises(ValueError, match=r"model.sd.prompts: .*needs a prompt file"):
        check_pipeline_dir(pipes / "sd", None, prefix="model.sd")
    with pytest.raises(FileNotFoundError, match=r"prompts: prompt file not found"):
        check_pipeline_dir(pipes / "sd", tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"prompts: .*holds no prompt"):
        check_pipeline_dir(pipes / "sd", tmp_path / "empty.txt")
    with pytest.raises(ValueError, match=r"guidance_scale: must be a finite number >= 1"):
        check_pipeline_dir(pipes / "dit", guidance_scale=0.5)
    with pytest.raises(ValueError, match=r"guidance_scale: 3.0 needs a null condition"):
        check_pipeline_dir(pipes / "ddpm", guidance_scale=3.0)
    d = tmp_path / "d"
    shutil.copytree(pipes / "ldm", d)
    cfg = json.loads((d / "vqvae" / "config.json").read_text())
    cfg["latent_channels"] = 4
    (d / "vqvae" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"autoencoder decodes 4-channel latents but the denoiser samples 3"):
        check_pipeline_dir(d)
    with pytest.raises(ValueError, match=r"guidance_scale: 2.0 needs a null condition"):
        _load(pipes, "ldm", guidance_scale=2.0)


def test_model_folders_still_load_and_a_text_unet_folder_points_to_its_pipeline(pipes):
    from pipeline.models import load_backbone

    bb = load_backbone(pipes / "ddpm" / "unet")  # a plain model directory (config.json) keeps working
    assert bb.kind == "unet" and bb.conditioning == "none" and bb.num_classes == 1
    with torch.no_grad():
        assert bb(torch.zeros(1, 3, 16, 16), 10).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="UNet2DConditionModel: point at its pipeline directory"):
        load_backbone(pipes / "sd" / "unet")


def test_validate_refuses_a_source_of_the_wrong_kind_before_compute(pipes):
    from pipeline.config import ConfigError
    from pipeline.validation import _check_sources

    model = {"backbones": ["dit"], "dit": {"source": str(pipes / "sd"), "prompts": str(pipes / "prompts.txt"),
                                           "guidance_scale": 1.0}}
    with pytest.raises(ConfigError, match=r"model.dit.source: .* holds a UNet2DConditionModel, a 'unet' backbone"):
        _check_sources(model)
    model = {"backbones": ["unet"], "unet": {"source": str(pipes / "sd"), "prompts": None, "guidance_scale": 1.0}}
    with pytest.raises(ConfigError, match=r"model.unet.prompts: .*needs a prompt file"):
        _check_sources(model)
    model = {"backbones": ["unet"], "unet": {"source": None, "prompts": None, "guidance_scale": 2.0}}
    with pytest.raises(ConfigError, match=r"model.unet.guidance_scale: the embedded UNet has no null class"):
        _check_sources(model)
    model["unet"].update(source=str(pipes / "nowhere"), guidance_scale=1.0)
    with pytest.raises(ConfigError, match=r"model.unet.source: .*nowhere not found"):
        _check_sources(model)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_names_from_json_alone_equal_the_loaded_denoisers(pipes, kind, tmp_path):
    """What validation matches layer patterns against (built on the meta device from the JSON files) is what
    the quantization rules see on the loaded model, for a pipeline directory and for a saved backbone."""
    from pipeline.config import BackboneModel
    from pipeline.models import save_backbone
    from pipeline.validation import layer_names
    from pipeline.quant.surgery import attention_modules, quantizable_layers

    bb = _load(pipes, kind)
    want = ([n for n, _ in quantizable_layers(bb.net)], [n for n, _ in attention_modules(bb.net)])
    slot = bb.kind
    src = BackboneModel(source=str(pipes / kind), prompts=str(pipes / "prompts.txt"), guidance_scale=GUIDANCE[kind])
    assert layer_names(slot, src, 8) == want and want[0]
    save_backbone(bb, tmp_path / "fp")
    assert layer_names(slot, BackboneModel(source=str(tmp_path / "fp")), 8) == want
