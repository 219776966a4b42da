"""The presets (``make quick``, ``make paper``) stay valid as params.yaml evolves: their ``-S key=value``
overrides name existing keys and give a params file that ``validate`` accepts."""
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.validation import validate_params

ROOT = Path(__file__).resolve().parents[1]


def apply_args(params: dict, text: str) -> dict:
    """``params`` with every ``-S key=value`` of ``text`` set (values parsed as YAML, as DVC does); an unknown
    key path is an error, as in ``dvc exp run -S``."""
    tokens = shlex.split(text)
    pairs = [tokens[i + 1] for i, t in enumerate(tokens) if t == "-S"]
    assert len(pairs) * 2 == len(tokens), f"only -S key=value pairs expected, got {tokens}"
    for pair in pairs:
        key, value = pair.split("=", 1)
        *parents, leaf = key.split(".")
        node = params
        for p in parents:
            assert isinstance(node, dict) and p in node, f"{key}: no key {p!r} in params.yaml"
            node = node[p]
        assert leaf in node, f"{key}: no key {leaf!r} in params.yaml"
        node[leaf] = yaml.safe_load(value)
    return params


@pytest.mark.parametrize("preset", ["quick", "paper"])
def test_preset_gives_valid_params(preset, tmp_path):
    params = apply_args(yaml.safe_load((ROOT / "params.yaml").read_text()),
                        (ROOT / "presets" / f"{preset}.args").read_text())
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    out = validate_params(path)
    if preset == "quick":  # one seed, one setting per family: the first look it promises
        for fam in out["families"]:
            assert out[fam]["seeds"] == [0] and len(out[fam]["settings"]) == 1, fam


def test_a_bad_override_is_caught(tmp_path):
    with pytest.raises(AssertionError, match="naive.setings: no key 'setings'"):
        apply_args(yaml.safe_load((ROOT / "params.yaml").read_text()), "-S naive.setings=[W4A8]")


# the papers' models: each preset names the snapshot directories a user downloads; here the tiny random pipeline
# of the same kind stands in for the snapshot (and its image size for the dataset's), so the test checks every
# key and value of the preset, and that the directory a preset expects is one the pipeline accepts
MODEL_PRESETS = {"ddpm-cifar10": ("unet", "ddpm"), "ldm4": ("unet", "ldm"), "dit-xl-2-256": ("dit", "dit"),
                 "pixart-alpha-512": ("pixart", "pixart"), "sd-v1": ("unet", "sd")}


@pytest.fixture(scope="module")
def tiny_pipes(tmp_path_factory):
    from pipeline import tiny_pipelines

    root = tmp_path_factory.mktemp("pipes")
    for kind in {k for _, k in MODEL_PRESETS.values()}:
        tiny_pipelines.save(kind, root / kind)
    tiny_pipelines.write_prompts(root / "prompts.txt")
    return root


def test_every_model_preset_is_tested():
    assert {p.stem for p in (ROOT / "presets").glob("*.args")} == set(MODEL_PRESETS) | {"quick", "paper"}


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_model_preset_gives_valid_params(preset, tiny_pipes, tmp_path):
    from pipeline.hub import check_pipeline_dir

    backbone, kind = MODEL_PRESETS[preset]
    params = apply_args(yaml.safe_load((ROOT / "params.yaml").read_text()),
                        (ROOT / "presets" / f"{preset}.args").read_text())
    model = params["model"]
    assert model["backbones"] == [backbone] and model[backbone]["source"].startswith("models/")
    model[backbone]["source"] = str(tiny_pipes / kind)
    if model[backbone]["prompts"] is not None:
        assert model[backbone]["prompts"].startswith("prompts/")
        model[backbone]["prompts"] = str(tiny_pipes / "prompts.txt")
    c, h, _ = check_pipeline_dir(tiny_pipes / kind, model[backbone]["prompts"])["image_shape"]
    assert params["prepare"]["channels"] == c
    params["prepare"]["image_size"] = h
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    out = validate_params(path)
    for fam in out["families"]:
        assert out[fam]["backbones"] == [backbone], fam
