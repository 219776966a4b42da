"""Whole-pipeline validation (the `validate` stage): every section, every family, before any compute."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.validation import stamps, validate_params

ROOT = Path(__file__).resolve().parents[1]


def _params():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def _write(tmp_path, params):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params, sort_keys=False))
    return p


def test_default_params_are_valid_and_normalised():
    out = validate_params(ROOT / "params.yaml")
    assert out["families"] == _params()["families"]
    for fam in out["families"]:
        assert out[fam]["variants"] and out[fam]["settings"]
    # defaults are filled in: a key absent from params.yaml still appears
    assert "chunk_size" in out["fp4dit"]["recon"]


@pytest.mark.parametrize("edit,match", [
    (lambda p: p["naive"].update(settings=["W8A8", "W99A8"]), r"naive\.settings\[1\]: unsupported bit setting"),
    (lambda p: p["mpq"].update(variants=["mpqdm", "magic"], seeded_variants=["mpqdm"]), r"mpq\.variants\[1\]: unknown variant 'magic'"),
    (lambda p: p["fp4dit"].update(backbones=["unet"]), r"fp4dit\.backbones\[0\]: family 'fp4dit' does not support"),
    (lambda p: p["mpq"]["qat"].update(epochs=0), r"mpq\.qat\.epochs: must be >= 1"),
    (lambda p: p["fp4dit"]["recon"].update(itres=3), r"fp4dit\.recon\.itres: unknown key"),
    (lambda p: p.update(families=["naive", "nope"]), r"families\[1\]: unknown method family 'nope'"),
    (lambda p: p.update(bogus={}), r"bogus: unknown section"),
    (lambda p: p["eval"].update(n_samples=-1), r"eval\.n_samples: must be > 0"),
    (lambda p: p["model"].update(backbones=["unet"]), r"naive\.backbones\[1\]: backbone 'dit' is not in model"),
    (lambda p: p["fp4dit"].update(settings=["W2A8"]), r"fp4dit\.settings\[0\]: W2A8 is not supported"),
    # the review's gaps (issue 23): each passed validate and failed later, or never
    (lambda p: p["diffusion"].update(beta_end=-1), r"diffusion\.beta_end: must be in \(beta_start"),
    (lambda p: p["train_fp"]["dit"].update(warmup_steps=-1), r"train_fp\.dit\.warmup_steps: must be >= 0"),
    (lambda p: p["model"]["dit"]["dit"].update(attention_head_dim=-1), r"model\.dit\.dit\.attention_head_dim: must be > 0"),
    (lambda p: p["model"]["pixart"]["pixart"].update(patch_size=-1), r"model\.pixart\.pixart\.patch_size: must be > 0"),
    (lambda p: p["model"]["dit"]["dit"].update(patch_size=3), r"model\.dit\.dit\.patch_size: 3 does not divide prepare"),
    (lambda p: p["model"]["unet"]["unet"].update(block_out_channels=[32, 60]),
     r"model\.unet\.unet\.block_out_channels\[1\]: must be a positive multiple of norm_num_groups"),
])
def test_bad_value_anywhere_is_named(tmp_path, edit, match):
    p = _params()
    edit(p)
    with pytest.raises(ConfigError, match=match):
        validate_params(_write(tmp_path, p))


def test_layer_patterns_must_match_a_layer_of_the_familys_backbones(tmp_path):
    """A pattern with a typo would exclude nothing and quantization would start: refused, naming the key.
    A pattern that matches on one of the family's backbones passes; the defaults (names of other layouts,
    e.g. Hunyuan-DiT's time_extra_emb) pass although they match nothing here."""
    p = _params()
    p["fp4dit"]["exclude"] = p["fp4dit"]["exclude"] + ["transformer_blocks.0.attn1.to_q", "caption_projection.*"]
    out = validate_params(_write(tmp_path, p))  # the first on both transformers, the second on PixArt only
    assert "caption_projection.*" in out["fp4dit"]["exclude"] and "time_extra_emb.*" in out["fp4dit"]["exclude"]
    p["fp4dit"]["exclude"].append("transformer_block.*.attn1")  # typo: blocks
    with pytest.raises(ConfigError, match=r"fp4dit\.exclude\[7\]: 'transformer_block\.\*\.attn1' matches no layer "
                                          r"of the dit, pixart backbone\(s\) \(layer names look like"):
        validate_params(_write(tmp_path, p))
    p = _params()
    p["fp4dit"].update(backbones=["dit"], exclude=["caption_projection.*"])  # PixArt's layer, not run here
    with pytest.raises(ConfigError, match=r"fp4dit\.exclude\[0\]: 'caption_projection"):
        validate_params(_write(tmp_path, p))
    p = _params()
    p["dilatequant"]["foldable_patterns"] = ["re:down_blocks\\.1\\.attentions\\.0\\.to_.", "@first", "*to_kk"]
    with pytest.raises(ConfigError, match=r"dilatequant\.foldable_patterns\[2\]: '\*to_kk' matches no layer"):
        validate_params(_write(tmp_path, p))


def test_a_family_not_listed_keeps_its_section_unread_and_a_misspelt_one_is_refused(tmp_path):
    p = _params()
    p["families"] = ["naive", "fp4dit"]
    p["export"]["rows"] = [r for r in p["export"]["rows"] if r.split("/")[1] in p["families"]]
    out = validate_params(_write(tmp_path, p))
    assert out["families"] == ["naive", "fp4dit"] and "mpq" not in out and "tmpq" not in out
    p["mpqq"] = p.pop("mpq")
    with pytest.raises(ConfigError, match=r"mpqq: unknown section"):
        validate_params(_write(tmp_path, p))


def test_search_and_tmpq_backbones_are_checked(tmp_path):
    p = _params()
    p["search"]["backbones"] = ["pixart", "unet"]
    p["model"]["backbones"] = ["unet", "dit"]
    for fam in p["families"]:
        p[fam]["backbones"] = [b for b in p[fam]["backbones"] if b != "pixart"]
    with pytest.raises(ConfigError, match=r"search.backbones\[0\]: backbone 'pixart' is not in model.backbones"):
        validate_params(_write(tmp_path, p))
    p["search"]["backbones"] = ["dit"]
    with pytest.raises(ConfigError, match=r"tmpq.backbones\[0\]: 'unet' is not in search.backbones \(dit\)"):
        validate_params(_write(tmp_path, p))


def test_stamps_change_only_where_params_changed(tmp_path):
    a = stamps(validate_params(ROOT / "params.yaml"))
    p = _params()
    p["mpq"]["qat"]["epochs"] += 1
    p["train_fp"]["dit"]["steps"] += 1
    b = stamps(validate_params(_write(tmp_path, p)))
    changed = sorted(k for k in a if a[k] != b[k])
    assert changed == ["mpq.json", "mpq.qat.json", "train_fp.dit.json", "train_fp.json"]


def test_validate_stage_fails_fast_naming_the_key(tmp_path):
    p = _params()
    p["calibrate"]["selection"] = "best"
    _write(tmp_path, p)
    r = subprocess.run([sys.executable, str(ROOT / "stages" / "validate.py"), "--out", "stamps"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "calibrate.selection: 'best' is not allowed (allowed values: uniform, random)" in r.stderr
    assert not (tmp_path / "stamps").exists()
    p["calibrate"]["selection"] = "random"
    _write(tmp_path, p)
    r = subprocess.run([sys.executable, str(ROOT / "stages" / "validate.py"), "--out", "stamps"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "stamps" / "calibrate.json").read_text())["selection"] == "random"


@pytest.mark.parametrize("row, message", [
    ("unet/naive/naive", r"export.rows\[1\]: 'unet/naive/naive' is not a row; write it as backbone/family/variant/setting"),
    ("unet/naive/naive/W9A8", r"export.rows\[1\]: unsupported bit setting"),
    ("unet/mpqq/naive/W8A8", r"export.rows\[1\]: 'unet/mpqq/naive/W8A8': family 'mpqq' is not in 'families'"),
    ("pixart/qdiff/qdiff/W8A8", r"export.rows\[1\]: .*backbone 'pixart' is not in qdiff.backbones \(unet\)"),
    ("unet/naive/nave/W8A8", r"export.rows\[1\]: .*variant 'nave' is not in naive.variants .*or 'best'"),
    ("unet/naive/naive/W5A5", r"export.rows\[1\]: .*setting 'W5A5' is not in naive.settings"),
    ("unet/peers/quanto/W8A8", r"export.rows\[1\]: .*the peers rows run in their own tool's kernels"),
    ("unet/naive/naive/W8A8", r"export.rows\[1\]: 'unet/naive/naive/W8A8' is listed twice"),
])
def test_export_rows_are_checked_before_any_compute(tmp_path, row, message):
    p = _params()
    p["export"]["rows"] = ["unet/naive/naive/W8A8", row]
    with pytest.raises(ConfigError, match=message):
        validate_params(_write(tmp_path, p))


def test_export_rows_may_name_the_best_variant_and_any_setting_spelling(tmp_path):
    p = _params()
    p["export"]["rows"] = ["unet/qdiff/best/w8a8", "dit/fp4dit/best/W4A8"]
    assert validate_params(_write(tmp_path, p))["export"]["rows"] == ["unet/qdiff/best/w8a8", "dit/fp4dit/best/W4A8"]
    p["export"].update(batches=[0])
    with pytest.raises(ConfigError, match=r"export.batches: a non-empty list of positive batch sizes"):
        validate_params(_write(tmp_path, p))
