"""Shared test settings: one torch thread (the tests use tiny tensors, where a second thread only
adds contention), and MLflow pointed at a per-session temporary database."""
import os

import pytest

import pipeline  # noqa: F401  (pins the CPU numerics before any kernel runs, as every stage does)


@pytest.fixture(scope="session", autouse=True)
def _single_thread_and_private_mlflow(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db")
    yield
    torch.set_num_threads(threads)
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


# ---------------------------------------------------------------------------------------------
# tiny models, built from config (never from a hub); shared by tests/quant, tests/methods, tests/train
# ---------------------------------------------------------------------------------------------
def _diffusers_model(kind: str, layers: int = 2, seed: int = 0):
    """A raw diffusers UNet2DModel / DiTTransformer2DModel / PixArtTransformer2DModel on 1x8x8 inputs."""
    import torch

    torch.manual_seed(seed)
    if kind == "unet":
        from diffusers import UNet2DModel

        return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                           layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8,
                           num_class_embeds=10).eval()
    if kind == "dit":
        from diffusers import DiTTransformer2DModel

        return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                     num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                     norm_num_groups=8).eval()
    if kind == "pixart":
        from diffusers import PixArtTransformer2DModel

        return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                        num_layers=layers, sample_size=8, patch_size=2, cross_attention_dim=16,
                                        caption_channels=12, norm_num_groups=8).eval()
    raise ValueError(f"unknown tiny diffusers model {kind!r}")


def _pipeline_backbone(kind: str, *, seed: int = 0, classes: int = 10, layers: int = 1, head_dim: int = 8,
                       patch: int = 2, caption_length: int = 2, unet_attention=(False, True), randomise: bool = False):
    """A pipeline DiffusionBackbone (models.build_backbone) on 1x8x8 images.

    ``randomise`` perturbs every parameter: diffusers zero-initialises some output layers (adaLN-Zero,
    PixArt's final layer), and equality checks should compare non-trivial functions."""
    import torch

    from pipeline import models
    from pipeline.config import BackboneModel, DiTArch, PixArtArch, UNetArch

    torch.manual_seed(seed)
    cfg = BackboneModel(
        unet=UNetArch(block_out_channels=[8, 16], attention_levels=list(unet_attention), norm_num_groups=4),
        dit=DiTArch(num_layers=layers, num_attention_heads=2, attention_head_dim=head_dim, patch_size=patch),
        pixart=PixArtArch(num_layers=layers, num_attention_heads=2, attention_head_dim=head_dim, patch_size=patch,
                          caption_channels=8, caption_length=caption_length))
    bb = models.build_backbone(kind, cfg, 8, 1, classes).eval()
    if randomise:
        with torch.no_grad():
            for p in bb.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return bb


@pytest.fixture(scope="session")
def diffusers_model():
    """Factory fixture: ``diffusers_model(kind, layers=2)`` builds a fresh tiny raw diffusers model."""
    return _diffusers_model


@pytest.fixture(scope="session")
def tiny_backbone():
    """Factory fixture: ``tiny_backbone(kind, seed=0, classes=10, layers=1, ...)`` builds a fresh tiny
    pipeline backbone (see ``_pipeline_backbone`` for the knobs)."""
    return _pipeline_backbone


@pytest.fixture(scope="module")
def tiny_calibrated():
    """{kind: (fp backbone, calibration set)} for a tiny UNet and DiT (8 samples x 3 timesteps), built once
    per test module; tests that modify a model deep-copy it first."""
    from pipeline.calibration import collect_calibration
    from pipeline.config import CalibrateConfig, DiffusionConfig, SamplingConfig

    diff, samp = DiffusionConfig(), SamplingConfig(steps=3)
    out = {}
    for kind in ("unet", "dit"):
        fp = _pipeline_backbone(kind, patch=4)
        calib = collect_calibration(fp, CalibrateConfig(n_samples=8, n_timesteps=3, batch_size=8), diff, samp)
        out[kind] = (fp, calib)
    return out


@pytest.fixture(scope="session")
def digits_split():
    """Factory fixture: ``digits_split(seed)`` -> (x_train, y_train, x_test, y_test), scikit-learn's 8x8
    digits in the project convention ([-1, 1], [N, 1, 8, 8]) split 75/25 by a permutation seeded ``seed``."""
    def split(seed: int):
        import torch
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0 * 2.0 - 1.0
        y = torch.tensor(d.target, dtype=torch.long)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        n = int(0.75 * len(y))
        return x[perm[:n]], y[perm[:n]], x[perm[n:]], y[perm[n:]]

    return split
