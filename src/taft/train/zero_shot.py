"""Zero-shot heads of CLIP models from class names: one text embedding per class, averaged over prompt templates.

``clip_text_head`` works with open_clip's ``CLIP`` (``encode_text``, tokenizer ``texts -> LongTensor``) and with
Hugging Face's ``CLIPModel`` (``get_text_features``, a ``transformers`` tokenizer). Each prompt embedding is
L2-normalized, the K prompts of a class are averaged, and the mean is normalized again (CLIP's prompt
ensembling). An image classifier with L2-normalized image embeddings and head ``logit_scale × text_head`` then
gives exactly CLIP's zero-shot logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

# A few of CLIP's ImageNet prompt templates (the small ensemble of the CLIP notebooks, plus the plain prompt).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of the {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "itap of a {}.",
    "art of the {}.",
    "a {} in a video game.",
)


def prompt_name(class_name: str) -> str:
    """A folder-style class name as words: ``golden_retriever`` → ``golden retriever``."""
    return class_name.replace("_", " ").strip()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def encode_texts(clip_model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 256) -> Tensor:
    """L2-normalized text embeddings ``(N, D)`` (float32) of a CLIP model (open_clip or Hugging Face)."""
    dev = _device(clip_model)
    out = []
    for s in range(0, len(texts), batch_size):
        chunk = list(texts[s : s + batch_size])
        if hasattr(clip_model, "get_text_features"):  # transformers CLIPModel
            tok = tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")
            f = clip_model.get_text_features(input_ids=tok["input_ids"].to(dev),
                                             attention_mask=tok["attention_mask"].to(dev))
            f = f if isinstance(f, Tensor) else f.pooler_output  # transformers 5 returns the model output
        elif hasattr(clip_model, "encode_text"):  # open_clip CLIP
            f = clip_model.encode_text(tokenizer(chunk).to(dev))
        else:
            raise TypeError(f"{type(clip_model).__name__} is not a CLIP model (no encode_text / get_text_features)")
        out.append(nn.functional.normalize(f.float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def clip_text_head(clip_model: nn.Module, tokenizer, class_names: Sequence[str],
                   templates: Sequence[str] = DEFAULT_TEMPLATES, *, batch_size: int = 256) -> Tensor:
    """``(C, D)`` unit rows: for each class, the normalized mean of its normalized template embeddings.

    ``templates`` hold one ``{}`` each, filled with the class name (used as given; see :func:`prompt_name`)."""
    names, templates = list(class_names), list(templates)
    if not names:
        raise ValueError("clip_text_head: no class names")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"clip_text_head: every template needs one '{{}}' for the class name, got {templates}")
    was_training = clip_model.training
    clip_model.eval()
    try:
        emb = encode_texts(clip_model, tokenizer, [t.format(c) for c in names for t in templates], batch_size)
    finally:
        clip_model.train(was_training)
    emb = emb.view(len(names), len(templates), -1).mean(1)
    return nn.functional.normalize(emb, dim=-1)


def clip_logit_scale(clip_model: nn.Module) -> float:
    """The model's temperature ``exp(logit_scale)`` (100 for OpenAI's CLIP weights)."""
    return float(clip_model.logit_scale.detach().exp())
