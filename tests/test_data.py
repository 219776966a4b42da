"""pipeline.data: embedded digits, image folders, stratified split, dataset files."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import data
from pipeline.config import PrepareConfig


@pytest.fixture(scope="module")
def digits():
    return data.load_images(PrepareConfig())


def test_digits_shapes_range_and_classes(digits):
    x, y, names = digits
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert sorted(torch.unique(y).tolist()) == list(range(10))
    assert names == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    # grey levels 0..16 map linearly onto [-1, 1]
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images.astype(np.float32))
    torch.testing.assert_close(x[:, 0], raw / 8.0 - 1.0)


def test_digits_resized_and_repeated_to_rgb():
    x, y, _ = data.load_images(PrepareConfig(image_size=16, channels=3))
    assert x.shape == (1797, 3, 16, 16)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])


def test_split_is_stratified_disjoint_and_seeded():
    n_per = torch.tensor([40, 21, 9, 2])
    labels = torch.repeat_interleave(torch.arange(4), n_per)
    images = torch.arange(labels.numel(), dtype=torch.float32).view(-1, 1, 1, 1)  # id per image
    tx, ty, rx, ry = data.split_reference(images, labels, 0.25, seed=3)
    ids_train, ids_ref = set(tx.flatten().tolist()), set(rx.flatten().tolist())
    assert not ids_train & ids_ref
    assert ids_train | ids_ref == set(range(labels.numel()))
    ref_counts = torch.bincount(ry, minlength=4)
    expected = torch.tensor([10, 5, 2, 1])  # round(0.25 n), at least one each side
    assert torch.equal(ref_counts, expected)
    assert torch.equal(torch.bincount(ty, minlength=4), n_per - expected)
    # labels still belong to their images
    assert torch.equal(labels[rx.flatten().long()], ry)
    again = data.split_reference(images, labels, 0.25, seed=3)
    assert torch.equal(again[2], rx)
    other = data.split_reference(images, labels, 0.25, seed=4)
    assert not torch.equal(other[2], rx)


def test_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="fraction"):
        data.split_reference(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long), 1.5, 0)


def test_save_and_load_dataset_round_trip(tmp_path, digits):
    x, y, names = digits
    tx, ty, rx, ry = data.split_reference(x, y, 0.25, 0)
    data.save_dataset(tmp_path, tx, ty, rx, ry, names)
    for split, (ex, ey) in {"train": (tx, ty), "reference": (rx, ry)}.items():
        lx, ly = data.load_split(tmp_path, split)
        assert torch.equal(lx, ex) and torch.equal(ly, ey)
    meta = data.load_meta(tmp_path)
    assert meta["class_names"] == names
    assert meta["image_size"] == 8 and meta["channels"] == 1
    assert meta["counts"] == {"train": tx.shape[0], "reference": rx.shape[0]}
    assert json.loads((tmp_path / "meta.json").read_text())["num_classes"] == 10


def test_load_split_errors(tmp_path):
    with pytest.raises(ValueError, match="split.*train, reference"):
        data.load_split(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="train split not found"):
        data.load_split(tmp_path, "train")


def _write_png(path, value, size, mode="L"):
    arr = np.full((size, size) if mode == "L" else (size, size, 3), value, dtype=np.uint8)
    Image.fromarray(arr, mode=mode).save(path)


def test_image_folder_loading(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs").mkdir()
    for i in range(3):
        _write_png(tmp_path / "cats" / f"{i}.png", 255, 12)
    for i in range(2):
        _write_png(tmp_path / "dogs" / f"{i}.png", 0, 5, mode="RGB")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    x, y, names = data.load_images(PrepareConfig(source=str(tmp_path), image_size=8, channels=1))
    assert names == ["cats", "dogs"]
    assert x.shape == (5, 1, 8, 8)
    assert y.tolist() == [0, 0, 0, 1, 1]
    torch.testing.assert_close(x[:3], torch.ones(3, 1, 8, 8))
    torch.testing.assert_close(x[3:], -torch.ones(2, 1, 8, 8))
    x3, _, _ = data.load_images(PrepareConfig(source=str(tmp_path), image_size=4, channels=3))
    assert x3.shape == (5, 3, 4, 4)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare.source.*not found"):
        data.load_images(PrepareConfig(source=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="no class sub-folders"):
        data.load_images(PrepareConfig(source=str(tmp_path)))
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        data.load_images(PrepareConfig(source=str(tmp_path)))


def test_caption():
    assert data.caption("seven") == "a handwritten digit seven"
