"""FID, conditional accuracy, CLIPScore, HPSv2 and the FID Inception (pipeline.metrics)."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import data as D
from pipeline.train import classifier as C
from pipeline.train import tiny_clip as T


@pytest.fixture(scope="module")
def digits(digits_split):
    return digits_split(seed=1)


@pytest.fixture(scope="module")
def classifier(digits):
    x, y, _, _ = digits
    return C.train_classifier(x, y, 10, steps=200, batch_size=128, lr=3e-3, seed=0, holdout_fraction=0.0)


@pytest.fixture(scope="module")
def fid(classifier, digits):
    from pipeline.metrics import FIDMetric

    m = FIDMetric(classifier)
    m.set_reference(digits[2])
    return m


# ---------------------------------------------------------------------------------------------- FID
def _frechet_reference(f1: np.ndarray, f2: np.ndarray) -> float:
    """Textbook FID with scipy's matrix square root (independent of torchmetrics)."""
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_of_the_reference_set_is_zero(fid, digits):
    assert abs(fid.compute(digits[2])) < 1e-3


def test_fid_matches_scipy_reference(fid, digits):
    x = digits[0][:300]
    expected = _frechet_reference(fid.features(digits[2]).double().numpy(), fid.features(x).double().numpy())
    assert fid.compute(x) == pytest.approx(expected, rel=1e-3, abs=1e-3)


def test_fid_grows_with_noise(fid, digits):
    g = torch.Generator().manual_seed(0)
    x = digits[0][:400]
    noise = torch.randn(x.shape, generator=g)
    scores = [fid.compute((x + s * noise).clamp(-1, 1)) for s in (0.1, 0.4, 1.0)]
    assert scores[0] < scores[1] < scores[2], scores
    assert scores[0] > 0


def test_fid_image_conventions(fid, digits):
    x = digits[0][:100]
    u8 = torch.round((x + 1) * 127.5).to(torch.uint8)
    value = fid.compute(x)
    assert fid.compute(u8) == pytest.approx(value, rel=1e-6)
    assert fid.compute(x.repeat(1, 3, 1, 1)) == pytest.approx(value, rel=1e-5)  # gray as RGB: same pixels
    with pytest.raises(ValueError, match="image size"):
        fid.compute(torch.zeros(4, 1, 12, 12))
    with pytest.raises(ValueError, match="at least 2"):
        fid.compute(x[:1])


def test_fid_bad_arguments(classifier):
    from pipeline.metrics import FIDMetric

    with pytest.raises(ValueError, match="backend: 'pytorch-fid' is not allowed"):
        FIDMetric(classifier, backend="pytorch-fid")
    with pytest.raises(ValueError, match="give a classifier, inception_weights or a feature_extractor"):
        FIDMetric()
    with pytest.raises(RuntimeError, match="set_reference"):
        FIDMetric(classifier).compute(torch.zeros(4, 1, 8, 8))
    with pytest.raises(FileNotFoundError):
        FIDMetric(inception_weights="/nonexistent/pt_inception.pth")


def test_cleanfid_missing_gives_install_hint(classifier, monkeypatch):
    from pipeline.metrics import FIDMetric

    monkeypatch.setitem(sys.modules, "cleanfid", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "cleanfid.fid", None)
    with pytest.raises(RuntimeError, match=r"torchvision.*pip install -c constraints.txt '\.\[cleanfid\]'"):
        FIDMetric(classifier, backend="clean-fid")


# ---------------------------------------------------------------------------------------- accuracy
def test_conditional_accuracy_correct_vs_shuffled_labels(classifier, digits):
    from pipeline.metrics import conditional_accuracy

    _, _, xr, yr = digits
    assert conditional_accuracy(classifier, xr, yr) > 0.9
    assert conditional_accuracy(classifier, xr, (yr + 1) % 10) < 0.1
    with pytest.raises(ValueError, match="labels"):
        conditional_accuracy(classifier, xr, yr[:-1])
    with pytest.raises(ValueError, match=r"0\.\.9"):
        conditional_accuracy(classifier, xr[:3], torch.tensor([0, 1, 10]))


# ---------------------------------------------------------------------------------------- CLIPScore
@pytest.fixture(scope="module")
def clip_dir(digits, tmp_path_factory):
    x, y, _, _ = digits
    model, tok, proc = T.train_clip(x, y, D.DIGIT_NAMES, steps=120, batch_size=64, lr=1e-3, seed=0,
                                    holdout_fraction=0.0)
    out = tmp_path_factory.mktemp("clip")
    T.save_clip(model, tok, proc, out)
    return out


def test_clipscore_prefers_matching_captions(clip_dir, digits):
    from pipeline.metrics import CLIPScoreMetric

    metric = CLIPScoreMetric(clip_dir)
    _, _, xr, yr = digits
    xr, yr = xr[:200], yr[:200]
    right = [T.caption_text(D.DIGIT_NAMES[i]) for i in yr.tolist()]
    wrong = [T.caption_text(D.DIGIT_NAMES[(i + 5) % 10]) for i in yr.tolist()]
    s_right, s_wrong = metric.pair_scores(xr, right), metric.pair_scores(xr, wrong)
    assert s_right.mean() > s_wrong.mean() + 1.0
    # torchmetrics' CLIPScore = max(mean of 100 cos, 0) over the same pairs
    assert metric.compute(xr, right) == pytest.approx(max(float(s_right.mean()), 0.0), abs=1e-3)
    with pytest.raises(ValueError, match="captions"):
        metric.compute(xr, right[:-1])


def test_clipscore_missing_model_dir(tmp_path):
    from pipeline.metrics import CLIPScoreMetric

    with pytest.raises(FileNotFoundError, match="eval.clip.model_dir"):
        CLIPScoreMetric(tmp_path / "none")


# ---------------------------------------------------------------------------------------- HPSv2
def _openclip_state(tok_vocab: int, ctx: int = 12, width: int = 32, heads: int = 2, proj: int = 16,
                    patch: int = 4, image: int = 8, layers: int = 2, seed: int = 0) -> dict:
    """Random tensors under OpenCLIP's key names (tiny dims)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    sd = {}
    for prefix in ("visual.transformer.resblocks.", "transformer.resblocks."):
        for i in range(layers):
            p = f"{prefix}{i}."
            sd.update({p + "ln_1.weight": 1 + r(width, s=0.1), p + "ln_1.bias": r(width, s=0.1),
                       p + "attn.in_proj_weight": r(3 * width, width), p + "attn.in_proj_bias": r(3 * width),
                       p + "attn.out_proj.weight": r(width, width), p + "attn.out_proj.bias": r(width),
                       p + "ln_2.weight": 1 + r(width, s=0.1), p + "ln_2.bias": r(width, s=0.1),
                       p + "mlp.c_fc.weight": r(4 * width, width), p + "mlp.c_fc.bias": r(4 * width),
                       p + "mlp.c_proj.weight": r(width, 4 * width), p + "mlp.c_proj.bias": r(width)})
    grid = image // patch
    sd.update({"visual.conv1.weight": r(width, 3, patch, patch), "visual.class_embedding": r(width),
               "visual.positional_embedding": r(grid * grid + 1, width),
               "visual.ln_pre.weight": 1 + r(width, s=0.1), "visual.ln_pre.bias": r(width, s=0.1),
               "visual.ln_post.weight": 1 + r(width, s=0.1), "visual.ln_post.bias": r(width, s=0.1),
               "visual.proj": r(width, proj),
               "token_embedding.weight": r(tok_vocab, width), "positional_embedding": r(ctx, width),
               "ln_final.weight": 1 + r(width, s=0.1), "ln_final.bias": r(width, s=0.1),
               "text_projection": r(width, proj), "logit_scale": torch.tensor(math.log(1 / 0.07))})
    return sd


def _ref_block(x, sd, p, heads, causal):
    """OpenCLIP residual attention block written out from the raw tensors."""
    n, t, w = x.shape
    h = F.layer_norm(x, (w,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps=1e-5)
    qkv = h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]
    q, k, v = (z.reshape(n, t, heads, w // heads).transpose(1, 2) for z in qkv.split(w, dim=-1))
    att = (q @ k.transpose(-1, -2)) / math.sqrt(w // heads)
    if causal:
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    o = (att.softmax(-1) @ v).transpose(1, 2).reshape(n, t, w)
    x = x + o @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    h = F.layer_norm(x, (w,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps=1e-5)
    h = F.gelu(h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
    return x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]


def _ref_encode_image(sd, pixels, heads, layers, patch):
    w = sd["visual.class_embedding"].shape[0]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, w), x], 1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (w,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], eps=1e-5)
    for i in range(layers):
        x = _ref_block(x, sd, f"visual.transformer.resblocks.{i}.", heads, causal=False)
    x = F.layer_norm(x[:, 0], (w,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], eps=1e-5)
    return x @ sd["visual.proj"]


def _ref_encode_text(sd, ids, heads, layers):
    w = sd["token_embedding.weight"].shape[1]
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    for i in range(layers):
        x = _ref_block(x, sd, f"transformer.resblocks.{i}.", heads, causal=True)
    x = F.layer_norm(x, (w,), sd["ln_final.weight"], sd["ln_final.bias"], eps=1e-5)
    return x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]  # OpenCLIP: EOT = max id


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tok = T.build_clip_tokenizer([T.caption_text(n) for n in D.DIGIT_NAMES])
    out = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(str(out))
    return out, tok


def test_hps_openclip_conversion_matches_independent_forward(tokenizer_dir, tmp_path):
    from pipeline.metrics import HPSv2Metric

    tok_path, tok = tokenizer_dir
    ctx, heads, layers, patch = 12, 2, 2, 4
    sd = _openclip_state(len(tok), ctx=ctx, heads=heads, layers=layers, patch=patch)
    ckpt = tmp_path / "HPS_v2_tiny.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, ckpt)
    metric = HPSv2Metric(ckpt, tok_path, vision_heads=heads, text_heads=heads)

    g = torch.Generator().manual_seed(5)
    images = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    prompts = ["a handwritten digit one", "a handwritten digit seven", "a digit"]
    # reference preprocessing: 8-bit rounding, gray -> RGB, OpenAI CLIP mean / std (no resize at 8x8)
    u8 = torch.round((images + 1) * 127.5).repeat(1, 3, 1, 1) / 255.0
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    ref_img = _ref_encode_image(sd, (u8 - mean) / std, heads, layers, patch)
    # OpenCLIP tokenisation: <sot> tokens <eot>, zero padding to the context length
    ids = torch.zeros(3, ctx, dtype=torch.long)
    for i, p in enumerate(prompts):
        t = tok(p)["input_ids"]
        ids[i, : len(t)] = torch.tensor(t)
    ref_txt = _ref_encode_text(sd, ids, heads, layers)

    assert torch.allclose(metric.image_embeddings(images), ref_img, atol=1e-4)
    assert torch.allclose(metric.text_embeddings(prompts), ref_txt, atol=1e-4)
    expected = 100 * F.cosine_similarity(ref_img, ref_txt, dim=-1).mean()
    assert metric.compute(images, prompts) == pytest.approx(float(expected), abs=1e-3)
    assert metric.model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_hps_errors(tokenizer_dir, tmp_path):
    from pipeline.metrics import HPSv2Metric

    tok_path, tok = tokenizer_dir
    with pytest.raises(FileNotFoundError, match="HPSv2 checkpoint not found"):
        HPSv2Metric(tmp_path / "missing.pt", tok_path)
    sd = _openclip_state(len(tok))
    sd["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(32)  # layer scale: not a CLIP ViT-H
    torch.save(sd, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="ls_1"):
        HPSv2Metric(tmp_path / "odd.pt", tok_path, vision_heads=2, text_heads=2)
    torch.save(_openclip_state(len(tok) + 7), tmp_path / "vocab.pt")
    with pytest.raises(ValueError, match="tokenizer_dir: .* token_embedding has"):
        HPSv2Metric(tmp_path / "vocab.pt", tok_path, vision_heads=2, text_heads=2)


# ---------------------------------------------------------------------------------------- Inception
def _random_inception_state(seed: int = 0) -> dict:
    """He-initialised random weights in the pytorch-fid layout, so features are not constant."""
    from pipeline.metrics.inception import FIDInceptionV3

    g = torch.Generator().manual_seed(seed)
    sd = FIDInceptionV3().state_dict()
    for k, v in sd.items():
        if k.endswith("conv.weight"):
            sd[k] = torch.randn(v.shape, generator=g) * math.sqrt(2.0 / v[0].numel())
        elif k.endswith("bn.running_mean") or k.endswith("bn.bias"):
            sd[k] = torch.zeros_like(v)
        elif k.endswith("bn.running_var") or k.endswith("bn.weight"):
            sd[k] = torch.ones_like(v)
    return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}


def test_fid_inception_loads_pytorch_fid_layout(tmp_path):
    from safetensors.torch import save_file

    from pipeline.metrics import FIDMetric
    from pipeline.metrics.inception import load_fid_inception

    sd = _random_inception_state()
    torch.save(sd, tmp_path / "pt_inception-2015-12-05-random.pth")
    save_file(sd, str(tmp_path / "inception.safetensors"))
    net = load_fid_inception(tmp_path / "pt_inception-2015-12-05-random.pth")
    # torchvision documents 27,161,264 parameters for inception_v3 (1000 classes, with the aux
    # classifier of 3,326,696); the FID variant drops the aux head and has a 1008-way fc
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696 + 8 * 2049
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    feats = net(x)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    assert (feats[0] - feats[1]).abs().max() > 0
    net2 = load_fid_inception(tmp_path / "inception.safetensors")
    for (k, a), (_, b) in zip(net.state_dict().items(), net2.state_dict().items()):
        assert torch.equal(a, b), k
    # the FID metric picks it up (feature size read from the module, no dummy forward)
    metric = FIDMetric(classifier=C.DigitClassifier(), inception_weights=tmp_path / "inception.safetensors")
    assert metric.feature_source == "inception" and metric.features_module.num_features == 2048
    assert FIDMetric(classifier=C.DigitClassifier(), inception_weights=None).feature_source == "classifier"


def test_fid_inception_rejects_other_layouts(tmp_path):
    from pipeline.metrics.inception import load_fid_inception

    sd = _random_inception_state()
    sd["Mixed_8a.conv.weight"] = torch.zeros(1)
    del sd["Mixed_7c.branch_pool.conv.weight"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing keys.*Mixed_7c.branch_pool.conv.weight.*unexpected keys.*Mixed_8a"):
        load_fid_inception(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError):
        load_fid_inception(tmp_path / "nope.pth")
