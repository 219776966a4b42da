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
