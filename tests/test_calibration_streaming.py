"""A calibration set streamed to disk while it is sampled is the in-memory one: same bytes on disk, same
tensors when memory-mapped back, the same quantized models."""
import copy

import pytest
import torch

from pipeline import calibration
from pipeline.calibration import CalibrationWriter, collect_calibration, load_calibration, save_calibration
from pipeline.config import CalibrateConfig, DiffusionConfig, SamplingConfig, parse_setting
from pipeline.methods import MethodContext, get_family


@pytest.fixture(scope="module")
def streamed(tiny_backbone, tmp_path_factory):
    fp = tiny_backbone("unet")
    ccfg = CalibrateConfig(n_samples=12, n_timesteps=3, batch_size=5)  # a last batch of 2: uneven chunks
    diff, samp = DiffusionConfig(), SamplingConfig(steps=4)
    root = tmp_path_factory.mktemp("calib")
    in_memory = collect_calibration(fp, ccfg, diff, samp)
    save_calibration(in_memory, root / "memory")
    mp = pytest.MonkeyPatch()
    mp.setattr(calibration, "MMAP_MIN_BYTES", 1)  # map even this small x
    on_disk = collect_calibration(fp, ccfg, diff, samp, out_dir=root / "disk")
    mp.undo()
    return fp, in_memory, on_disk, root, diff, samp


def test_streamed_file_is_byte_identical_and_maps_back(streamed):
    _, in_memory, on_disk, root, _, _ = streamed
    assert (root / "disk" / "calib.safetensors").read_bytes() == (root / "memory" / "calib.safetensors").read_bytes()
    assert (root / "disk" / "manifest.json").read_text() == (root / "memory" / "manifest.json").read_text()
    assert not (root / "disk" / "calib.safetensors.partial").exists()
    # the inputs stay on disk (mapped into this process) until a batch reads them
    from pathlib import Path

    assert str((root / "disk" / "calib.safetensors").resolve()) in Path("/proc/self/maps").read_text()
    for f in ("x", "t", "labels", "step_index"):
        assert torch.equal(getattr(on_disk, f), getattr(in_memory, f)), f
    assert on_disk.timesteps == in_memory.timesteps and len(on_disk) == 36
    # the safetensors library reads the streamed file as its own
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(root / "disk" / "calib.safetensors"))["x"], in_memory.x)


@pytest.mark.parametrize("family,variant,options,setting", [
    ("naive", "naive", {"calib_batches": 2}, "W4A8"),
    ("qdiff", "qdiff", {"recon": {"iters": 3, "batch_size": 4}, "act_recon": {"iters": 2, "batch_size": 4},
                        "calib_batches": 1}, "W4A8"),
])
def test_a_streamed_set_gives_the_same_quantized_model(streamed, family, variant, options, setting):
    fp, in_memory, on_disk, _, diff, samp = streamed
    fam = get_family(family)

    def run(calib):
        student = copy.deepcopy(fp)
        torch.manual_seed(0)
        res = fam.quantize(student, calib, parse_setting(setting), fam.config_for(variant, **options),
                           MethodContext(device="cpu", diffusion=diff, sampling=samp))
        return res.backbone.state_dict()

    a, b = run(in_memory), run(on_disk)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_writer_refuses_wrong_shapes_and_missing_rows_and_loader_refuses_a_bad_file(tmp_path):
    w = CalibrationWriter(tmp_path / "c" / "calib.safetensors", 4, (1, 2, 2))
    with pytest.raises(ValueError, match=r"x: expected \[B, 1, 2, 2\]"):
        w.write(torch.zeros(2, 3, 2, 2), torch.zeros(2), torch.zeros(2), torch.zeros(2))
    w.write(torch.zeros(2, 1, 2, 2), torch.zeros(2), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="2 inputs written, 4 declared"):
        w.close()
    assert not (tmp_path / "c" / "calib.safetensors").exists()  # nothing half-written is left in place
    assert not (tmp_path / "c" / "calib.safetensors.partial").exists()
    # a truncated file (its manifest carries no hash here) is named as corrupt
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "manifest.json").write_text('{"timesteps": [1]}')
    (tmp_path / "d" / "calib.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match="calib.safetensors is corrupt"):
        load_calibration(tmp_path / "d")
