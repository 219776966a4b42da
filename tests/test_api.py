"""``pipeline.api.quantize``: every family from Python, no runner, on the shared tiny models. Each call gives the
model the family's own ``quantize`` (+ ``finetune``) gives on the variant's config (the runner's path), leaves
the given FP model untouched, and bad input fails before any compute, naming what is wrong. (``tmpq`` needs
a search front: its API check is in tests/methods/test_tmpq.py.)"""
import copy

import pytest
import torch

from pipeline.api import quantize
from pipeline.config import DiffusionConfig, SamplingConfig, parse_setting
from pipeline.methods import MethodContext, get_family

SAMP = SamplingConfig(steps=3)
# per family: (backbone, setting, variant, fast overrides)
CASES = {
    "naive": ("unet", "W8A8", "naive", {"calib_batches": 1}),
    "fp4dit": ("dit", "W4A8", "fp4dit", {"recon": {"iters": 2, "batch_size": 4}}),
    "mpq": ("unet", "W4A4", "mpqdm2", {"lora_rank": 2, "calib_inputs": 8, "act_calib_batches": 1,
                                       "weight_init": "minmax", "act_init": "minmax",
                                       "qat": {"epochs": 1, "batch_size": 2, "check_samples": 0}}),
    "dilatequant": ("unet", "W4A4", "dilatequant_no_tpq", {"calib_batches": 1, "bkd": {"iters": 2, "batch_size": 4}}),
    "qdiff": ("unet", "W4A8", "qdiff", {"calib_batches": 1, "recon": {"iters": 2, "batch_size": 4},
                                        "act_recon": {"iters": 2, "batch_size": 4}}),
    "peers": ("dit", "W8A8", "torchao", {}),
}


def _direct(fam, fp, calib, setting, variant, overrides, seed=0):
    """What a runner job computes (first phase, then the fine-tune phase on that student)."""
    from pipeline.runner import seeded_config

    cfg = seeded_config(fam.config_for(variant, **overrides), seed)
    ctx = MethodContext(device=torch.device("cpu"), diffusion=DiffusionConfig(), sampling=SAMP, backbone_name=fp.kind)
    teacher = copy.deepcopy(fp)
    torch.manual_seed(getattr(cfg, "seed", seed))
    res = fam.quantize(copy.deepcopy(fp), calib, setting, cfg, ctx)
    if fam.finetune is not None:
        fam.finetune(res.backbone, teacher, setting, cfg, ctx)
    return res.backbone


def test_every_family_has_a_case():
    from pipeline.methods import families

    ours = {n for n, f in families().items() if f.quantize.__module__.startswith("pipeline.methods.")}
    assert ours - {"tmpq"} == set(CASES)  # (test families registered by other test modules aside)


@pytest.mark.parametrize("family", sorted(CASES))
def test_quantize_from_python_equals_the_family_run(tiny_calibrated, family):
    kind, setting, variant, overrides = CASES[family]
    fp, calib = tiny_calibrated[kind]
    before = {k: v.clone() for k, v in fp.state_dict().items()}
    res = quantize(fp, family, setting, calib, variant=variant, device="cpu", sampling=SAMP, **overrides)
    assert all(torch.equal(v, fp.state_dict()[k]) for k, v in before.items())  # the FP model is untouched
    want = _direct(get_family(family), fp, calib, parse_setting(setting), variant, overrides)
    x, t, y = next(iter(calib.batches(8, "cpu", shuffle=False)))
    with torch.no_grad():
        got, ref, fp_out = res.backbone(x, t, y), want(x, t, y), fp(x, t, y)
    assert torch.equal(got, ref)
    assert not torch.equal(got, fp_out)  # it did quantize
    if get_family(family).finetune is not None:
        assert "finetune" in res.info


def test_method_seed_and_default_variant(tiny_calibrated):
    fp, calib = tiny_calibrated["unet"]
    x, t, y = next(iter(calib.batches(8, "cpu", shuffle=False)))
    outs = [quantize(fp, "naive", "W4A8", calib, seed=s, calib_batches=1, device="cpu").backbone(x, t, y)
            for s in (0, 0)]
    assert torch.equal(outs[0], outs[1])
    dq = get_family("dilatequant")
    assert dq.config_for(dq.variants[0].name).wd is True  # the first variant, the method itself, is the default


@pytest.mark.parametrize("call, error, match", [
    (lambda fp, c: quantize(fp, "nope", "W8A8", c), KeyError, "unknown method family 'nope'"),
    (lambda fp, c: quantize(fp, "naive", "W8A8", c, variant="x"), KeyError, "has no variant 'x'"),
    (lambda fp, c: quantize(fp, "naive", "W8A8", c, calib_batchs=1), ValueError,
     r"naive\[naive\]\.calib_batchs: unknown key"),
    (lambda fp, c: quantize(fp, "mpq", "W4A4", c, qat={"epochs": "many"}), ValueError,
     r"mpq\[mpqdm\]\.qat\.epochs: expected an integer"),
    (lambda fp, c: quantize(fp, "naive", "W9A8", c), ValueError, "W9A8"),
    (lambda fp, c: quantize(fp, "peers", "W3A8", c, variant="quanto"), ValueError,
     "W3A8 is not supported by peers/quanto"),
    (lambda fp, c: quantize(fp, "fp4dit", "W4A8", c), ValueError, "family 'fp4dit' supports dit, pixart"),
    (lambda fp, c: quantize(fp.net, "naive", "W8A8", c), TypeError, "expected a DiffusionBackbone"),
    (lambda fp, c: quantize(fp, "naive", "W8A8", [c]), TypeError, "expected a CalibrationSet"),
])
def test_bad_input_is_named_before_any_compute(tiny_calibrated, call, error, match):
    fp, calib = tiny_calibrated["unet"]
    with pytest.raises(error, match=match):
        call(fp, calib)


def test_importing_the_api_stays_free_of_torch():
    import subprocess
    import sys

    code = "import sys, pipeline.api; assert callable(pipeline.api.quantize); sys.exit('torch' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
