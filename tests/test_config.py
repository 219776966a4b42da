"""Parameter validation: every mistake names the key and the allowed values, before any compute."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import (ConfigError, EvalConfig, FamilyMatrix, ModelConfig, from_dict, load_section,
                             parse_setting, split_family_section, to_dict)

ROOT = Path(__file__).resolve().parents[1]


def test_default_params_file_is_valid():
    from pipeline import config as c

    for section, cls in [("prepare", c.PrepareConfig), ("diffusion", c.DiffusionConfig),
                         ("sampling", c.SamplingConfig), ("model", c.ModelConfig), ("train_fp", c.TrainFPConfig),
                         ("train_evaluators", c.TrainEvaluatorsConfig), ("calibrate", c.CalibrateConfig),
                         ("eval", c.EvalConfig), ("report", c.ReportConfig),
                         ("tracking", c.TrackingConfig)]:
        cfg = load_section(section, cls, ROOT / "params.yaml")
        assert from_dict(cls, to_dict(cfg), section) == cfg  # round trip


@pytest.mark.parametrize("text,w,a", [("W4A8", 4, 8), ("w2a4", 2, 4), ("W8A32", 8, 32)])
def test_parse_setting(text, w, a):
    s = parse_setting(text)
    assert (s.wbits, s.abits) == (w, a)


@pytest.mark.parametrize("text,match", [("W9A8", "unsupported bit setting"), ("W1A8", "unsupported"),
                                        ("W4", "not a bit setting"), (4, "not a bit setting")])
def test_parse_setting_errors(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_setting(text, "quantize.settings[0]")


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError, match=r"quantize\.bogus: unknown key \(allowed keys: .*settings"):
        from_dict(FamilyMatrix, {"bogus": 1}, "quantize")


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"eval\.n_samples: expected an integer, got 'many'"):
        from_dict(EvalConfig, {"n_samples": "many"}, "eval")


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"eval\.fid\.backend: 'inception' is not allowed \(allowed values: "
                                          r"torchmetrics, clean-fid\)"):
        from_dict(EvalConfig, {"fid": {"backend": "inception"}}, "eval")


def test_unknown_backbone():
    with pytest.raises(ConfigError, match=r"model\.backbones\[1\]: unknown backbone 'vae'"):
        from_dict(ModelConfig, {"backbones": ["unet", "vae"]}, "model")


def test_bad_setting_in_list_is_located():
    with pytest.raises(ConfigError, match=r"naive\.settings\[1\]: unsupported bit setting 'W9A8'"):
        from_dict(FamilyMatrix, {"variants": ["naive"], "settings": ["W4A8", "W9A8"]}, "naive")


def test_family_section_splits_matrix_and_options():
    m, opts = split_family_section("naive", {"variants": ["naive"], "settings": ["W4A8"], "calib_batches": 2})
    assert m.variants == ["naive"] and m.bit_settings[0].wbits == 4 and opts == {"calib_batches": 2}
    with pytest.raises(ConfigError, match=r"naive\.settings\[1\]: 'W4A8' is listed twice"):
        split_family_section("naive", {"variants": ["naive"], "settings": ["W4A8", "W4A8"]})
    with pytest.raises(ConfigError, match=r"naive\.variants: list at least one variant"):
        split_family_section("naive", {"settings": ["W4A8"]})


def test_missing_section_and_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"prepare": {}}))
    with pytest.raises(ConfigError, match="missing section 'eval'"):
        load_section("eval", EvalConfig, p)
    with pytest.raises(ConfigError, match="parameter file not found"):
        load_section("eval", EvalConfig, tmp_path / "nope.yaml")


def _stage(args, cwd, params):
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, str(ROOT / "stages" / args[0]), *args[1:]], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_stage_rejects_bad_params_before_compute(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["naive"]["settings"] = ["W4A8", "W12A8"]
    r = _stage(["quantize.py", "--family", "naive", "--out", "q"], tmp_path, params)
    assert r.returncode == 2
    assert "naive.settings[1]: unsupported bit setting 'W12A8'" in r.stderr
    assert not (tmp_path / "q").exists() and not (tmp_path / "mlflow.db").exists()


def test_stage_rejects_unknown_family(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    r = _stage(["quantize.py", "--family", "magic", "--out", "q"], tmp_path, params)
    assert r.returncode == 2
    assert "unknown method family 'magic'" in r.stderr and "naive" in r.stderr


def test_stage_reports_missing_input(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    r = _stage(["train_evaluators.py", "--data", "missing/dir"], tmp_path, params)
    assert r.returncode == 2
    assert "prepared dataset (stage prepare) not found at missing/dir" in r.stderr
