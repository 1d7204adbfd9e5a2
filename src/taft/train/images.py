"""Image classification runs: the image side of :func:`taft.train.loop.prepare`.

Data specs:

* ``imagefolder:/path`` — ``/path/train/<class>/<image>``, with optional ``val/`` (or ``validation/``) and
  ``test/`` beside ``train/``, holding the same class folders. Without ``val/``, a seeded 10 % of train is
  carved off (:func:`taft.data.examples.carve_validation`, the text rule).
* ``torchvision:NAME`` — a ``torchvision.datasets`` class (``torchvision:CIFAR10``) read from ``--data-root``
  (default ``./data``) with ``download=False``: its train and test splits, val carved from train.

The backbone's eval transform (:func:`taft.data.images.model_transform`) turns images into pixels; the frozen
prefix runs once per split into a :class:`FeatureCache` (pixels are dropped from the cache once the embedding
stage is in the prefix). The classifier pools per family: ``none`` where the backbone already returns one
vector per image (timm with ``num_classes=0``, CLIP vision ``pooler_output``/``image_embeds``, open_clip's
embedding), ``cls`` where it returns tokens (HF ViT ``last_hidden_state``). timm models lose their ImageNet head
(``reset_classifier(0)``). ``head_init=zero-shot`` builds CLIP's zero-shot head from the class names (CLIP
models only): normalized image embeddings, head ``logit_scale × clip_text_head``. ``--class-names`` replace the
class names (one per class, in label order: class folders sort by name).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from taft.config import CLASS_NAMES_FIX, ConfigError, TrainConfig
from taft.data.examples import DataError, DatasetSplits, carve_validation
from taft.data.images import load_image_folder, load_torchvision_dataset, model_transform
from taft.models.classifier import Classifier
from taft.train.cache import FeatureCache, split_features
from taft.train.pipeline import Prepared, given_class_names, init_classifier
from taft.train.zero_shot import clip_logit_scale, clip_text_head, prompt_name
from taft.zoo import is_clip_model, load_clip_pair, load_model

IMAGE_SPECS = ("imagefolder:", "torchvision:")
VAL_FRACTION = 0.1
VAL_FOLDERS = ("val", "validation")
PIXEL_KEYS = ("x", "pixel_values")  # where the families keep the input images in a prefix state


def is_image_spec(spec: object) -> bool:
    return str(spec).startswith(IMAGE_SPECS)


# -- data -------------------------------------------------------------------------------------------------
def load_image_splits(spec: str, transform=None, *, root: str | Path | None = None, seed: int = 0,
                      val_fraction: float = VAL_FRACTION) -> DatasetSplits:
    """train / val / test datasets of ``(image, label, id)`` for an image data spec (see the module docstring)."""
    kind, _, rest = str(spec).partition(":")
    if not rest:
        raise DataError(f"data spec {spec!r} names nothing: use imagefolder:/path/to/folder or torchvision:NAME")
    if kind == "imagefolder":
        return _folder_splits(Path(rest).expanduser(), transform, seed, val_fraction)
    if kind == "torchvision":
        root = Path(root).expanduser() if root else Path("data")
        train = load_torchvision_dataset(rest, root, "train", transform)
        test = load_torchvision_dataset(rest, root, "test", transform)
        train, val = carve_validation(train, val_fraction, seed)
        return DatasetSplits(train, val, test)
    raise DataError(f"unknown image data spec {spec!r}; use imagefolder:/path or torchvision:NAME")


def _folder_splits(folder: Path, transform, seed: int, val_fraction: float) -> DatasetSplits:
    layout = f"{folder}/train/<class>/<image> (optional val/ and test/ beside train/, same class folders)"
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}; expected {layout}")
    if not any(folder.iterdir()):
        raise DataError(f"image folder {folder} is empty; expected {layout}")
    if not (folder / "train").is_dir():
        found = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise DataError(f"no train/ split folder in {folder} (sub-folders: {found}); expected {layout}")
    train = load_image_folder(folder / "train", transform)
    parts = {}
    for key, names in (("val", VAL_FOLDERS), ("test", ("test",))):
        sub = next((folder / n for n in names if (folder / n).is_dir()), None)
        if sub is not None:
            parts[key] = load_image_folder(sub, transform)
            if parts[key].class_names != train.class_names:
                raise DataError(f"{sub} has class folders {parts[key].class_names} but {folder / 'train'} has "
                                f"{train.class_names}: every split needs the same class folders (empty is fine)")
    val = parts.get("val")
    if val is None:
        train, val = carve_validation(train, val_fraction, seed)
    return DatasetSplits(train, val, parts.get("test"))


def num_classes_of(splits: DatasetSplits, declared: int | None = None) -> int:
    """Classes of the label space: the class names, else ``declared``, else the largest label + 1."""
    names = getattr(splits.train, "class_names", None)
    top = max(int(d.labels.max()) for d in (splits.train, splits.val, splits.test) if d is not None and len(d))
    k = len(names) if names else (declared or top + 1)
    if declared is not None and declared != k:
        raise DataError(f"num_classes={declared}, but the data has {k} classes ({names})")
    if top >= k:
        raise DataError(f"label {top} outside range(0, {k}) (num_classes={k})")
    return k


def data_fingerprint(spec: str, splits: DatasetSplits, root: str | Path | None) -> str:
    """What identifies the images beyond their ids (paths): folder, sizes and modification times of the files."""
    h = hashlib.sha256(str(spec).encode())
    for ds in (splits.train, splits.val, splits.test):
        if ds is None:
            continue
        base = getattr(ds, "root", None)
        if base is None:  # torchvision: name and root
            h.update(str(Path(root or "data").expanduser().resolve()).encode())
            continue
        h.update(str(Path(base).resolve()).encode())
        for rel in ds.ids:
            st = (Path(base) / rel).stat()
            h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def image_prefix_batches(dataset, batch_size: int, device="cpu",
                         dtype: torch.dtype | None = None) -> Iterator[tuple[list[int], tuple, dict]]:
    """``(indices, (pixel_values,), {})`` batches in dataset order, for ``FeatureCache.build``."""
    for s in range(0, len(dataset), batch_size):
        idx = list(range(s, min(s + batch_size, len(dataset))))
        x = torch.stack([dataset[i][0] for i in idx])
        yield idx, (x.to(device=device, dtype=dtype or x.dtype),), {}


def image_cache_for(tm, dataset, cfg: TrainConfig, name: str, progress: bool, cache_dir: Path | None,
                    key: str) -> FeatureCache:
    dtype = next(tm.base.parameters()).dtype
    drop = PIXEL_KEYS if tm.start > 0 else ()  # the suffix starts after the embedding: pixels are dead weight
    return split_features(tm, cfg, dataset, name, progress, cache_dir, key, lambda: image_prefix_batches(
        dataset, cfg.eval_batch_size, torch.device(cfg.device), dtype), drop=drop)


# -- model ------------------------------------------------------------------------------------------------
def wants_zero_shot(cfg: TrainConfig) -> bool:
    # head_init=probe starts from CLIP's zero-shot head where the model has a text tower, else from random
    return (cfg.head_init == "zero-shot" or cfg.method == "zero-shot"
            or (cfg.head_init == "probe" and is_clip_model(cfg.model)))


def image_backbone(name: str, clip_pair: tuple[nn.Module, object] | None = None) -> nn.Module:
    """The image tower to fine-tune: with a CLIP pair, its image tower in the joint embedding space (open_clip's
    ``visual``; HF: a ``CLIPVisionModelWithProjection`` with the pair's weights); else ``load_model(name)``,
    timm models without their classification head (pooled features)."""
    if clip_pair is not None:
        full = clip_pair[0]
        if hasattr(full, "visual"):
            return full.visual.eval()
        from transformers import CLIPVisionModelWithProjection

        vcfg = copy.deepcopy(full.config.vision_config)
        vcfg.projection_dim = full.config.projection_dim
        vm = CLIPVisionModelWithProjection(vcfg).to(full.visual_projection.weight.dtype)
        vm.vision_model.load_state_dict(full.vision_model.state_dict())
        vm.visual_projection.load_state_dict(full.visual_projection.state_dict())
        return vm.eval()
    model = load_model(name)
    if hasattr(model, "reset_classifier"):  # timm: num_classes=0 gives pooled features
        model.reset_classifier(0)
    return model.eval()


@torch.no_grad()
def _pooling_and_dim(backbone: nn.Module, example: torch.Tensor) -> tuple[str, int]:
    from taft.engine.family import family_for

    p = next(backbone.parameters())
    try:
        out = family_for(backbone).select_output(backbone(example[None].to(device=p.device, dtype=p.dtype)))
    except (RuntimeError, ValueError, TypeError, IndexError) as e:  # e.g. a text model handed pixels
        raise ConfigError(f"{type(backbone).__name__} cannot take images ({type(e).__name__}: {e}); image data "
                          f"needs an image model: tiny-vit, vit_* / timm:NAME, open_clip:ARCH/TAG, hf:<ViT or CLIP>"
                          ) from e
    if out.dim() == 2:
        return "none", out.shape[-1]
    if out.dim() == 3:
        return "cls", out.shape[-1]
    raise ConfigError(f"{type(backbone).__name__} returns features of shape {tuple(out.shape)}; expected "
                      f"(batch, dim) or (batch, tokens, dim)")


def build_image_classifier(cfg: TrainConfig, backbone: nn.Module, num_classes: int, example: torch.Tensor,
                           class_names: Sequence[str] | None = None, clip_pair=None) -> Classifier:
    """Backbone + per-family pooling + head (:func:`~taft.train.pipeline.init_classifier`); the zero-shot head is
    CLIP's text head of the class names."""
    pooling, dim = _pooling_and_dim(backbone, example)

    def head() -> torch.Tensor:
        if clip_pair is None:
            raise ConfigError(f"head_init=zero-shot needs a CLIP model with its text tower, not {cfg.model}; "
                              f"use --head-init random")
        if not class_names:
            raise ConfigError(f"head_init=zero-shot needs class names, and {cfg.data} has none: name the classes "
                              f"in label order with {CLASS_NAMES_FIX}, or use --head-init random")
        full, tokenizer = clip_pair
        text = clip_text_head(full, tokenizer, [prompt_name(c) for c in class_names])
        if text.shape[1] != dim:
            raise ConfigError(f"{cfg.model}: text embeddings of dim {text.shape[1]} for image features of dim {dim}")
        return clip_logit_scale(full) * text.to(next(backbone.parameters()))

    return init_classifier(cfg, backbone, num_classes, pooling=pooling, zero_shot=wants_zero_shot(cfg),
                           zero_shot_head=head, feature_dim=dim)


def prepare_images(cfg: TrainConfig, device: torch.device) -> Prepared:
    """Splits and classifier of an image run (the image branch of :func:`taft.train.loop.prepare`)."""
    pair = None
    if wants_zero_shot(cfg):
        if not is_clip_model(cfg.model):
            what = "method=zero-shot" if cfg.method == "zero-shot" else f"head_init={cfg.head_init}"
            raise ConfigError(f"{what} on images needs a CLIP model with a text tower (open_clip:ARCH/TAG, "
                              f"hf:<CLIP model>, tiny-clip) for the class-name head; {cfg.model} has none: "
                              f"use --head-init random")
        pair = load_clip_pair(cfg.model)
        pair[0].to(device)
    backbone = image_backbone(cfg.model, pair).to(device)
    splits = load_image_splits(cfg.data, model_transform(backbone), root=cfg.data_root, seed=cfg.seed)
    k = num_classes_of(splits, cfg.num_classes)
    # --class-names replace the folder (or torchvision) class names, in label order (folders sort by name)
    names = given_class_names(cfg, k) or getattr(splits.train, "class_names", None)
    clf = build_image_classifier(cfg, backbone, k, splits.train[0][0], names, pair).to(device)

    def cache_for(tm, ds, name, progress, cache_dir, key):
        return image_cache_for(tm, ds, cfg, name, progress, cache_dir, key)

    return Prepared(splits, clf, cache_for, data_fingerprint(cfg.data, splits, cfg.data_root))
