"""Same params + same seeds -> bit-identical weights, calibration sets and quantized models on CPU: the
FP training, the calibration draw, PTQ, FP4DiT's reconstruction and MPQ-DM's QAT each run twice."""
import copy

import pytest
import torch

from pipeline import models
from pipeline.calibration import collect_calibration
from pipeline.config import (BackboneModel, CalibrateConfig, DiffusionConfig, SamplingConfig, TrainRun, UNetArch,
                             from_dict, parse_setting)
from pipeline.methods import MethodContext, get_family


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _train_once(seed: int):
    cfg = BackboneModel(unet=UNetArch(block_out_channels=[8, 16], attention_levels=[False, True], norm_num_groups=4))
    torch.manual_seed(1000 + seed)  # the global RNG state must not matter: build_backbone seeds itself
    bb = models.build_backbone("unet", cfg, 8, 1, 3, seed=seed)
    x = torch.linspace(-1, 1, 24 * 64).reshape(24, 1, 8, 8)
    y = torch.arange(24) % 3
    from pipeline.train.fp import train_backbone

    return train_backbone(bb, x, y, DiffusionConfig(), TrainRun(steps=4, batch_size=8, warmup_steps=0, seed=seed),
                          progress=False)


def _capability(env_extra: dict) -> str:
    """torch's CPU kernel capability in a fresh process that imports torch, then pipeline, then computes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pipeline

    env = {k: v for k, v in os.environ.items() if k not in pipeline.CPU_NUMERICS}
    env.update(env_extra)
    code = ("import torch, pipeline; torch.ones(64) @ torch.ones(64); "
            "print(torch.backends.cpu.get_cpu_capability())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(pipeline.__file__).resolve().parents[1], check=True)
    return out.stdout.strip().splitlines()[-1]


def test_cpu_numerics_are_pinned_on_import_and_an_explicit_choice_wins():
    """Importing pipeline pins torch / MKL / oneDNN to their AVX2 paths (the same kernels, hence the same
    bits, on every x86-64 processor with AVX2), unless the environment already names a path."""
    import platform
    from pathlib import Path

    import pipeline

    assert pipeline.CPU_NUMERICS == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert _capability({"ATEN_CPU_CAPABILITY": "default"}) == "DEFAULT"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if platform.machine() not in ("x86_64", "AMD64") or " avx2" not in flags:
        pytest.skip("the AVX2 pin applies to x86-64 processors with AVX2")
    assert _capability({}) == "AVX2"


def test_seeded_build_ignores_and_preserves_the_global_rng():
    cfg = BackboneModel()
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    a = models.build_backbone("dit", cfg, 8, 1, 3, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(2)
    _same_state(a, models.build_backbone("dit", cfg, 8, 1, 3, seed=5))
    c = models.build_backbone("dit", cfg, 8, 1, 3, seed=6)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_fp_training_is_bit_identical():
    first, second = _train_once(0), _train_once(0)
    _same_state(first, second)
    other = _train_once(1)
    assert not torch.equal(next(first.parameters()), next(other.parameters()))


def test_calibration_and_methods_are_bit_identical(tiny_backbone):
    fp = tiny_backbone("dit", patch=4)
    ccfg = CalibrateConfig(n_samples=8, n_timesteps=3, batch_size=8)
    diff, samp = DiffusionConfig(), SamplingConfig(steps=3)
    c1, c2 = (collect_calibration(fp, ccfg, diff, samp) for _ in range(2))
    for field in ("x", "t", "labels", "step_index"):
        assert torch.equal(getattr(c1, field), getattr(c2, field)), field

    def run(family, variant, options, setting):
        fam = get_family(family)
        cfg = fam.config_for(variant, from_dict(fam.config_cls, options, family))
        student = copy.deepcopy(fp)
        torch.manual_seed(0)  # what the runner does before every job
        res = fam.quantize(student, c1, parse_setting(setting), cfg,
                           MethodContext(device="cpu", diffusion=diff, sampling=samp))
        return res.backbone

    for family, variant, options, setting in [
        ("naive", "naive", {"calib_batches": 1}, "W4A8"),
        ("fp4dit", "fp4dit", {"recon": {"iters": 4, "batch_size": 4}}, "W4A6"),
        ("mpq", "mpqdm2", {"lora_rank": 2, "calib_inputs": 8, "act_calib_batches": 1}, "W3A4"),
    ]:
        _same_state(run(family, variant, options, setting), run(family, variant, options, setting))


@pytest.mark.parametrize("relation", ["trd", "memory"])
def test_qat_is_bit_identical(tiny_calibrated, relation):
    from pipeline.methods.mpqdm import MPQConfig, quantize
    from pipeline.train.qat import QATConfig, run_qat

    fp, calib = tiny_calibrated["unet"]
    diff, samp = DiffusionConfig(), SamplingConfig(steps=3)
    cfg = get_family("mpq").config_for("mpqdm2", MPQConfig(lora_rank=2, calib_inputs=8, act_calib_batches=1))

    def once():
        student = copy.deepcopy(fp)
        torch.manual_seed(0)
        quantize(student, calib, parse_setting("W2A4"), cfg, MethodContext())
        # W2: binary b−1 groups; memory: the timestep buckets carry over from the first trajectory to the second
        run_qat(student, fp, diff, samp, QATConfig(epochs=2, batch_size=2, check_samples=0), relation=relation,
                progress=False)
        return student

    _same_state(once(), once())
