"""Image datasets: ImageFolder on tiny PNGs, torchvision wrapping, model transforms."""

from __future__ import annotations

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from taft.data import (
    DataError,
    IndexedImageDataset,
    load_image_folder,
    load_torchvision_dataset,
    model_transform,
    split_into_shards,
)

COLORS = {"cat": [(255, 0, 0), (200, 0, 0)], "dog": [(0, 0, 255)], "zebra": [(0, 255, 0), (0, 128, 0)]}


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    for cls, colors in COLORS.items():
        (root / cls).mkdir(parents=True)
        for k, color in enumerate(colors):
            Image.new("RGB", (6, 4), color).save(root / cls / f"{k:02d}.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / "nested").mkdir()
    Image.new("L", (6, 4), 255).save(root / "dog" / "nested" / "gray.png")  # grayscale -> RGB
    (root / ".hidden").mkdir()
    return root


def test_image_folder_items_and_ids(image_root):
    ds = load_image_folder(image_root)
    assert ds.class_names == ["cat", "dog", "zebra"]
    assert ds.num_classes == 3
    assert ds.ids == ["cat/00.png", "cat/01.png", "dog/00.png", "dog/nested/gray.png", "zebra/00.png", "zebra/01.png"]
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    image, label, id_ = ds[2]
    assert (label, id_) == (1, "dog/00.png")
    assert image.shape == (3, 4, 6)
    assert torch.allclose(image[:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    gray, _, _ = ds[3]
    assert gray.shape == (3, 4, 6)
    assert torch.allclose(gray, torch.ones_like(gray))


def test_image_folder_ids_stable_when_files_added(image_root):
    before = load_image_folder(image_root)
    Image.new("RGB", (6, 4)).save(image_root / "cat" / "000.png")  # sorts first
    after = load_image_folder(image_root)
    assert len(after) == len(before) + 1
    assert set(before.ids) < set(after.ids)
    labels_after = dict(zip(after.ids, after.labels.tolist(), strict=True))
    assert all(labels_after[i] == y for i, y in zip(before.ids, before.labels.tolist(), strict=True))


def test_image_folder_transform_subset_shards_and_loader(image_root):
    ds = load_image_folder(image_root, transform=model_transform(image_size=8))
    image, _, _ = ds[0]
    assert image.shape == (3, 8, 8)
    sub = ds.subset(["zebra/01.png", "cat/00.png"])
    assert sub.ids == ["zebra/01.png", "cat/00.png"]
    assert sub.labels.tolist() == [2, 0]
    shards = split_into_shards(ds, 2, seed=0)
    assert sorted(i for s in shards for i in s.ids) == sorted(ds.ids)
    images, labels, ids = next(iter(DataLoader(ds, batch_size=4)))
    assert images.shape == (4, 3, 8, 8)
    assert labels.tolist() == [0, 0, 1, 1]
    assert list(ids) == ds.ids[:4]


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="no class folders"):
        load_image_folder(tmp_path)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images \(.*\.png"):
        load_image_folder(tmp_path)


def test_torchvision_offline_error(tmp_path):
    with pytest.raises(DataError) as err:
        load_torchvision_dataset("CIFAR10", tmp_path, split="test")
    msg = str(err.value)
    assert "could not load (download=False) torchvision dataset CIFAR10 (test)" in msg
    assert "load_image_folder" in msg
    assert isinstance(err.value.__cause__, RuntimeError)
    with pytest.raises(DataError, match=r"only 'train' and 'test' splits"):
        load_torchvision_dataset("CIFAR10", tmp_path, split="val")
    with pytest.raises(DataError, match=r"unknown torchvision dataset 'Cifar10'; known: .*CIFAR10"):
        load_torchvision_dataset("Cifar10", tmp_path)


def test_torchvision_wrapper_yields_ids(tmp_path):
    ds = load_torchvision_dataset("FakeData", tmp_path, split="train")  # FakeData: no root, no download
    assert len(ds) == 1000
    base = torchvision.datasets.FakeData(size=6, image_size=(3, 5, 5), num_classes=3)
    ds = IndexedImageDataset(base, prefix="fake:train", class_names=["a", "b", "c"])
    sub = ds.subset([4, 1])
    assert sub.ids == ["fake:train:4", "fake:train:1"]
    image, label, id_ = sub[0]
    assert id_ == "fake:train:4"
    assert label == base[4][1]
    assert sub.labels.tolist() == [base[4][1], base[1][1]]
    assert ds.subset(["fake:train:1"]).ids == ["fake:train:1"]


def test_model_transform_timm_and_fallback():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    transform = model_transform(model)
    out = transform(Image.new("RGB", (300, 200)))
    assert out.shape == (3, 176, 176)  # resnet10t's pretrained_cfg input size
    plain = model_transform(nn.Linear(2, 2), image_size=32)
    red = plain(Image.new("RGB", (50, 40), (255, 0, 0)))
    assert red.shape == (3, 32, 32)
    assert red[0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-4)
    assert red[1, 0, 0].item() == pytest.approx((0 - 0.456) / 0.224, rel=1e-4)

    class WithConfig(nn.Module):
        config = type("Cfg", (), {"image_size": 16})()

    assert model_transform(WithConfig())(Image.new("RGB", (20, 20))).shape == (3, 16, 16)
    assert model_transform()(Image.new("RGB", (300, 300))).shape == (3, 224, 224)
