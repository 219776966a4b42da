"""One source of defaults: every key that ``params.yaml`` names has the value of its config dataclass's default
(nested sub-configs compared against the default instance their parent builds), so a config built in Python
without params (``from_dict(cls, {})``, the dataclass itself) runs what the default ``dvc repro`` runs."""
import copy
import dataclasses
from pathlib import Path

import pytest

from pipeline.config import from_dict, read_params, split_family_section, to_dict
from pipeline.methods import get_family
from pipeline.validation import FAMILIES_KEY, SECTIONS

ROOT = Path(__file__).resolve().parents[1]
_MISSING = dataclasses.MISSING


def _field_default(f):
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return _MISSING


def _compare(default_obj, raw: dict, obj, prefix: str) -> list[tuple[str, object, object]]:
    out = []
    for f in dataclasses.fields(obj):
        if f.name not in raw:
            continue
        default = _field_default(f) if default_obj is _MISSING else getattr(default_obj, f.name)
        if default is _MISSING:
            continue
        value, key = getattr(obj, f.name), f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(default) and isinstance(raw[f.name], dict):
            out += _compare(default, raw[f.name], value, key)
        elif to_dict(default) != to_dict(value):
            out.append((key, to_dict(default), to_dict(value)))
    return out


def disagreements(raw: dict) -> list[tuple[str, object, object]]:
    """``(key, dataclass default, params value)`` for every key both name with different values."""
    out = []
    for section, cls in SECTIONS.items():
        out += _compare(_MISSING, raw[section], from_dict(cls, raw[section], section), section)
    for name in raw[FAMILIES_KEY]:
        _, options = split_family_section(name, raw[name])
        cls = get_family(name).config_cls
        out += _compare(_MISSING, options, from_dict(cls, options, name), name)
    return out


def test_params_yaml_states_the_dataclass_defaults():
    found = disagreements(read_params(ROOT / "params.yaml"))
    assert found == [], "params.yaml and the config dataclasses disagree:\n" + "\n".join(
        f"  {k}: dataclass {d!r}, params.yaml {v!r}" for k, d, v in found)


# the six disagreements found in review (issue 23), each set back to the old dataclass value
@pytest.mark.parametrize("path, old", [
    ("qdiff.split_weights", True), ("mpq.qat.epochs", 6), ("search.n_trials", 48), ("search.batch_size", 2),
    ("mpq.qat.check_samples", 16), ("train_evaluators.clip_steps", 1500), ("train_fp.unet.steps", 1500),
    ("model.dit.dit.num_layers", 6)])
def test_a_disagreement_is_named(path, old):
    raw = copy.deepcopy(read_params(ROOT / "params.yaml"))
    *parents, leaf = path.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = old
    assert [k for k, _, _ in disagreements(raw)] == [path]
