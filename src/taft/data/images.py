"""Image datasets yielding ``(image_tensor, label, id)`` with stable ids, plus the model's eval transform.

Ids play the same role as for text (tracing, sharding, forgetting): for an image folder they are the file
paths relative to the root (``cat/001.png``), which survive adding or removing other files; for a torchvision
dataset they are ``<name>:<split>:<index>``, stable because those datasets ship in a fixed order.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms.functional import to_tensor

from taft.data.examples import DataError, resolve_selection

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's preprocessing (open_clip's OPENAI_DATASET_*)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
Transform = Callable[[Image.Image], torch.Tensor]
Item = tuple[torch.Tensor, int, str]


class ImageFolderDataset(Dataset[Item]):
    """Images under ``root/<class>/...``; classes are the sorted sub-folder names (same rule as torchvision).

    Empty class folders still count as classes, so the label space does not shrink with a missing class.
    """

    def __init__(
        self,
        root: Path,
        samples: list[tuple[str, int]],
        class_names: list[str],
        transform: Transform | None = None,
    ) -> None:
        self.root = root
        self.samples = samples
        self.class_names = class_names
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Item:
        rel, label = self.samples[index]
        with Image.open(self.root / rel) as im:
            image = im.convert("RGB")
        return (self.transform or to_tensor)(image), label, rel

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def ids(self) -> list[str]:
        return [rel for rel, _ in self.samples]

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def subset(self, ids_or_indices: Sequence[str] | Sequence[int] | torch.Tensor) -> ImageFolderDataset:
        positions = resolve_selection(ids_or_indices, self.ids)
        chosen = [self.samples[p] for p in positions]
        return ImageFolderDataset(self.root, chosen, self.class_names, self.transform)


def load_image_folder(
    root: str | Path, transform: Transform | None = None, *, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> ImageFolderDataset:
    """Index ``root/<class>/**/<image>`` (files sorted, for a reproducible order); no image is opened here.

    ``transform`` maps a PIL RGB image to a tensor; without one the image becomes a float tensor in [0, 1].
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}; expected root/<class>/<image> files")
    class_names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_names:
        raise DataError(f"no class folders in {root}; expected root/<class>/<image> (one folder per class)")
    wanted = {e.lower() for e in extensions}
    samples = [
        (path.relative_to(root).as_posix(), label)
        for label, name in enumerate(class_names)
        for path in sorted((root / name).rglob("*"))
        if path.is_file() and path.suffix.lower() in wanted
    ]
    if not samples:
        raise DataError(f"no images ({', '.join(sorted(wanted))}) under the class folders of {root}")
    return ImageFolderDataset(root, samples, class_names, transform)


class IndexedImageDataset(Dataset[Item]):
    """Wraps a dataset of ``(image, label)`` pairs (e.g. torchvision's) to yield ``(image, label, id)``."""

    def __init__(
        self,
        base: Any,
        *,
        prefix: str,
        positions: list[int] | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        self.base = base
        self.prefix = prefix
        self.positions = list(range(len(base))) if positions is None else positions
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> Item:
        position = self.positions[index]
        image, label = self.base[position]
        return image, int(label), f"{self.prefix}:{position}"

    @property
    def ids(self) -> list[str]:
        return [f"{self.prefix}:{p}" for p in self.positions]

    @property
    def labels(self) -> torch.Tensor:
        """From the base's ``targets`` when present (torchvision convention), else by loading each item."""
        targets = getattr(self.base, "targets", None)
        if targets is None:
            return torch.tensor([int(self.base[p][1]) for p in self.positions], dtype=torch.long)
        targets = torch.as_tensor(targets, dtype=torch.long)
        return targets[torch.tensor(self.positions, dtype=torch.long)]

    def subset(self, ids_or_indices: Sequence[str] | Sequence[int] | torch.Tensor) -> IndexedImageDataset:
        chosen = [self.positions[p] for p in resolve_selection(ids_or_indices, self.ids)]
        return IndexedImageDataset(
            self.base, prefix=self.prefix, positions=chosen, class_names=self.class_names
        )


def load_torchvision_dataset(
    name: str,
    root: str | Path,
    split: str = "train",
    transform: Transform | None = None,
    download: bool = False,
) -> IndexedImageDataset:
    """A ``torchvision.datasets`` class by name (``"CIFAR10"``), wrapped to yield ids.

    ``split`` goes to the class's ``split=`` argument, or becomes ``train=split == "train"`` for the
    CIFAR/MNIST-style classes. Project machines are offline: a failed load or download becomes a
    :class:`DataError` that points to :func:`load_image_folder`.
    """
    cls = getattr(torchvision.datasets, name, None)
    if not isinstance(cls, type) or not issubclass(cls, Dataset):
        known = ", ".join(n for n in sorted(torchvision.datasets.__all__) if n[0].isupper())
        raise DataError(f"unknown torchvision dataset {name!r}; known: {known}")
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {"transform": transform or to_tensor}
    if "root" in params:
        kwargs["root"] = str(Path(root).expanduser())
    if "download" in params:
        kwargs["download"] = download
    if "split" in params:
        kwargs["split"] = split
    elif "train" in params:
        if split not in ("train", "test"):
            raise DataError(f"torchvision {name} has only 'train' and 'test' splits, got {split!r}")
        kwargs["train"] = split == "train"
    try:
        base = cls(**kwargs)
    except Exception as e:  # missing files, no network, bad split: one actionable message
        action = "load or download" if download else "load (download=False)"
        raise DataError(
            f"could not {action} torchvision dataset {name} ({split}) from {root}: {type(e).__name__}: {e}. "
            f"Without network access, put the images in a local ImageFolder (root/<class>/<image>) and use "
            f"load_image_folder(root, transform)."
        ) from e
    classes = getattr(base, "classes", None)
    return IndexedImageDataset(base, prefix=f"{name.lower()}:{split}", class_names=classes)


def _is_timm_model(model: Any) -> bool:
    return getattr(model, "pretrained_cfg", None) is not None or type(model).__module__.startswith("timm.")


def _timm_transform(model: Any) -> Transform:
    import timm.data

    config = timm.data.resolve_data_config({}, model=model)
    # A ViT built without a pretrained config (e.g. a small test model) resolves timm's default 224 input, but
    # its patch embedding only takes its own fixed size: use that size, keeping the rest of the recipe.
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    fixed = size is not None and not getattr(model, "dynamic_img_size", False)
    if fixed and tuple(config["input_size"][1:]) != tuple(size):
        config["input_size"] = (config["input_size"][0], *size)
    return timm.data.create_transform(**config)


def _open_clip_transform(model: Any) -> Transform:
    """open_clip's own eval preprocessing (``preprocess_cfg``, set by ``create_model``; else its defaults, the
    OpenAI CLIP mean/std, at the tower's ``image_size``)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = getattr(model, "preprocess_cfg", None) or {"size": tuple(model.image_size)}
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


def model_transform(model: Any = None, image_size: int | None = None) -> Transform:
    """The eval transform a model expects.

    timm models carry their own preprocessing config (size, crop, interpolation, mean/std), which is used
    as is (at the model's own size when its patch embedding fixes one). open_clip image towers use
    open_clip's eval preprocessing. Anything else gets the ImageNet recipe: resize to ``image_size / 0.875``,
    center-crop ``image_size`` (default: ``model.config.image_size`` when present, else 224), ImageNet
    mean/std — with the OpenAI CLIP mean/std for Hugging Face CLIP models.
    """
    if model is not None and _is_timm_model(model):
        return _timm_transform(model)
    if model is not None and type(model).__module__.startswith("open_clip.") and hasattr(model, "image_size"):
        return _open_clip_transform(model)
    config = getattr(model, "config", None)
    if image_size is None:
        size = getattr(config, "image_size", 224)
        image_size = int(size[-1] if isinstance(size, tuple | list) else size)
    clip = getattr(config, "model_type", None) in ("clip", "clip_vision_model")
    return T.Compose(
        [
            T.Resize(int(image_size / 0.875)),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN if clip else IMAGENET_MEAN, CLIP_STD if clip else IMAGENET_STD),
        ]
    )
