"""Image fine-tuning through the shared loop: image-folder specs, per-family pooling, cached prefix features,
`taft eval` reproducing a run, CLIP zero-shot heads from class-name templates, and data/config errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from taft.cli import main
from taft.config import ConfigError, TrainConfig
from taft.data.examples import DataError
from taft.data.images import model_transform
from taft.tangent_model import TangentModel
from taft.train.cache import FeatureCache
from taft.train.images import (
    build_image_classifier,
    image_backbone,
    image_prefix_batches,
    load_image_splits,
)
from taft.train.loop import prepare, train
from taft.train.zero_shot import clip_logit_scale, clip_text_head, encode_texts
from taft.zoo import ModelNotFoundError, _open_clip_name, load_clip_pair, tiny_clip
from tests.helpers import assert_close, randomize_delta

CLASSES = ("bright", "dark")


def _draw(folder: Path, per_class: int, rng: random.Random) -> None:
    for name, level in zip(CLASSES, (210, 45), strict=True):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            img = Image.new("RGB", (24, 24))
            img.putdata([tuple(min(255, max(0, level + rng.randint(-40, 40))) for _ in range(3))
                         for _ in range(24 * 24)])
            img.save(folder / name / f"{i:02d}.png")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """2 separable classes (bright vs dark noise): 12 train and 3 test images each; no val/ (carved)."""
    root = tmp_path_factory.mktemp("images")
    rng = random.Random(0)
    _draw(root / "train", 12, rng)
    _draw(root / "test", 3, rng)
    return root


def _cfg(root: Path, **kw) -> TrainConfig:
    base = dict(model="tiny-vit", data=f"imagefolder:{root}", head_init="random", epochs=2, batch_size=8)
    return TrainConfig(**{**base, **kw})


# -- runs -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["taft", "nlft", "fc"])
def test_image_folder_run_and_eval_reproduces_it(image_root, tmp_path, capsys, method):
    out = tmp_path / "run"
    res = train(_cfg(image_root, method=method, output_dir=str(out)), progress=False)
    assert {"delta.safetensors", "config.yaml", "metrics.jsonl", "results.json"} <= {p.name for p in out.iterdir()}
    assert len(res.epochs) == 2 and all(0.0 <= r["val_acc"] <= 1.0 for r in res.epochs)
    assert 0.0 <= res.val_acc <= 1.0 and 0.0 <= res.test_acc <= 1.0
    recorded = json.loads((out / "results.json").read_text())
    for split, n in (("val", 2), ("test", 6)):  # val: round(10 % of 24) carved from train
        capsys.readouterr()
        assert main(["eval", str(out), "--split", split, "--json"]) == 0
        ev = json.loads(capsys.readouterr().out)
        assert ev["examples"] == n and ev["accuracy"] == recorded[f"{split}_acc"]


@pytest.mark.parametrize("model", ["tiny-open-clip", "tiny-clip-vision", "tiny-hf-vit"])
def test_other_families_train_one_epoch(image_root, model):
    res = train(_cfg(image_root, model=model, epochs=1), progress=False)
    assert 0.0 <= res.val_acc <= 1.0 and res.epochs[0]["train_loss"] > 0


def test_pooling_per_family(image_root):
    pools = {}
    for model in ("tiny-vit", "tiny-hf-vit", "tiny-clip-vision", "tiny-open-clip"):
        clf = prepare(_cfg(image_root, model=model), torch.device("cpu")).clf
        pools[model] = (clf.pooling, clf.head.in_features)
    assert pools == {"tiny-vit": ("none", 32), "tiny-hf-vit": ("cls", 32), "tiny-clip-vision": ("none", 32),
                     "tiny-open-clip": ("none", 16)}  # open_clip: the projected embedding


def test_disk_cache_is_reused(image_root, tmp_path):
    cfg = _cfg(image_root, method="fc", epochs=1, cache="disk", cache_dir=str(tmp_path / "c"))
    a = train(cfg, progress=False)
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert len(files) == 3  # train, val, test
    b = train(cfg, progress=False)
    assert a.val_acc == b.val_acc and a.epochs[0]["train_loss"] == b.epochs[0]["train_loss"]


@pytest.mark.parametrize("model", ["tiny-vit", "tiny-hf-vit"])
def test_image_feature_cache_equals_uncached_path(image_root, tmp_path, model):
    backbone = image_backbone(model)
    ds = load_image_splits(f"imagefolder:{image_root}", model_transform(backbone)).train
    clf = build_image_classifier(_cfg(image_root, model=model), backbone, 2, ds[0][0]).double().eval()
    tm = TangentModel(clf, "last:1")
    randomize_delta(tm, 0.1)
    cache = FeatureCache.build(tm, image_prefix_batches(ds, 5, dtype=torch.float64), len(ds), progress=False,
                               drop=("x", "pixel_values"))
    assert "x" not in cache.items[0] and "pixel_values" not in cache.items[0]
    cache.save(tmp_path / "c.safetensors")
    loaded = FeatureCache.load(tmp_path / "c.safetensors")
    assert loaded.constants == cache.constants  # is_causal / interpolate_pos_encoding survive the disk
    idx = [7, 0, 13, 2]
    direct = tm(torch.stack([ds[i][0] for i in idx]).double())
    for c in (cache, loaded):
        f0, t = tm.suffix_parts(c.collate(idx))
        assert_close((f0 + t).detach(), direct.detach(), what="cached vs uncached")


# -- CLIP zero-shot heads -----------------------------------------------------------------------------------
def test_clip_text_head_is_the_mean_of_normalized_template_embeddings():
    model, tok = tiny_clip()
    names, templates = ["bright", "dark", "golden retriever"], ("a photo of a {}.", "art of the {}.", "{}")
    head = clip_text_head(model, tok, names, templates)
    assert head.shape == (3, 16)
    assert torch.allclose(head.norm(dim=-1), torch.ones(3), atol=1e-6)
    with torch.no_grad():
        for c, name in enumerate(names):
            rows = [model.encode_text(tok([t.format(name)]))[0] for t in templates]
            mean = torch.stack([r / r.norm() for r in rows]).mean(0)
            assert torch.allclose(head[c], mean / mean.norm(), atol=1e-5)


def test_clip_text_head_for_hf_clip():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()

    def tok(texts, padding=True, truncation=True, return_tensors="pt"):  # words → ids, padded, with a mask
        ids = [[1, *(3 + sum(map(ord, w)) % 90 for w in t.split()), 2] for t in texts]
        T = max(map(len, ids))
        return {"input_ids": torch.tensor([r + [0] * (T - len(r)) for r in ids]),
                "attention_mask": torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in ids])}

    head = clip_text_head(full, tok, ["cat", "dog"], ("a {}.", "the big {}."))
    by_hand = encode_texts(full, tok, ["a cat.", "the big cat.", "a dog.", "the big dog."]).view(2, 2, -1).mean(1)
    assert torch.allclose(head, by_hand / by_hand.norm(dim=-1, keepdim=True), atol=1e-6)
    # the image tower in the same (projected) space: CLIPVisionModelWithProjection with the pair's weights
    vm = image_backbone("hf:local", (full, tok))
    x = torch.randn(2, 3, 32, 32)
    want = full.get_image_features(pixel_values=x)
    want = want if isinstance(want, torch.Tensor) else want.pooler_output
    assert torch.allclose(vm(x).image_embeds, want, atol=1e-6)


def test_zero_shot_head_for_an_image_run(image_root, tmp_path):
    cfg = _cfg(image_root, model="tiny-clip", head_init="zero-shot", method="fc", epochs=1,
               output_dir=str(tmp_path / "run"))
    clf = prepare(cfg, torch.device("cpu")).clf
    full, tok = load_clip_pair("tiny-clip")
    assert clf.normalize and clf.pooling == "none"
    expected = clip_logit_scale(full) * clip_text_head(full, tok, list(CLASSES))
    assert torch.allclose(clf.head.weight, expected) and not clf.head.bias.any()
    res = train(cfg, progress=False)
    assert main(["eval", str(tmp_path / "run"), "--split", "val", "--json"]) == 0
    assert res.val_acc == json.loads((tmp_path / "run" / "results.json").read_text())["val_acc"]
    zs = train(_cfg(image_root, model="tiny-clip", method="zero-shot"), progress=False)
    assert 0.0 <= zs.val_acc <= 1.0 and zs.epochs == []


def test_zero_shot_needs_a_clip_model(image_root, capsys):
    with pytest.raises(ConfigError, match="--head-init random"):
        prepare(_cfg(image_root, head_init="zero-shot"), torch.device("cpu"))
    assert main(["train", "--model", "tiny-open-clip", "--data", f"imagefolder:{image_root}",
                 "--head-init", "zero-shot"]) == 2
    assert "--head-init random" in capsys.readouterr().err  # a vision tower alone has no text side
    # the default head_init (probe) starts a model without a text tower from a random head instead
    assert main(["train", "--model", "tiny-vit", "--data", f"imagefolder:{image_root}", "--epochs", "1",
                 "--probe-epochs", "1"]) == 0
    with pytest.raises(ModelNotFoundError, match="not a CLIP model"):
        load_clip_pair("tiny-vit")
    assert _open_clip_name("ViT-B-32/openai") == "ViT-B-32:openai"
    assert _open_clip_name("hf-hub:org/model") == "hf-hub:org/model"


# -- errors ---------------------------------------------------------------------------------------------------
def _train_cli(data: str, *extra: str) -> list[str]:
    return ["train", "--model", "tiny-vit", "--data", data, "--head-init", "random", "--epochs", "1", *extra]


def test_clear_errors_for_bad_image_folders(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "flat" / "cat").mkdir(parents=True)  # class folders without a train/ split folder
    (tmp_path / "noimg" / "train" / "cat").mkdir(parents=True)
    cases = {"empty": "is empty", "flat": "no train/ split folder", "nope": "image folder not found",
             "noimg": "no images"}
    for name, expect in cases.items():
        assert main(_train_cli(f"imagefolder:{tmp_path / name}")) == 2
        err = capsys.readouterr().err
        assert expect in err, err
    with pytest.raises(DataError, match="torchvision dataset CIFAR10"):
        load_image_splits("torchvision:CIFAR10", root=tmp_path)  # offline, no files: one actionable message


def test_mismatched_split_classes_and_missing_test_split(image_root, tmp_path, capsys):
    root = tmp_path / "d"
    _draw(root / "train", 4, random.Random(1))
    (root / "val" / "other").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "val" / "other" / "a.png")
    assert main(_train_cli(f"imagefolder:{root}")) == 2
    assert "same class folders" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(_train_cli(f"imagefolder:{image_root}", "--method", "fc", "--output-dir", str(out))) == 0
    capsys.readouterr()
    (root / "val" / "other" / "a.png").unlink()  # now: train/ only (val carved), no test/
    for d in (root / "val" / "other", root / "val"):
        d.rmdir()
    assert main(["eval", str(out), "--data", f"imagefolder:{root}", "--split", "test"]) == 2
    assert "has no test split" in capsys.readouterr().err
