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

from taft.train.text import encode_texts

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
        prompts = [t.format(c) for c in names for t in templates]
        emb = encode_texts(clip_model, tokenizer, prompts, batch_size=batch_size)
    finally:
        clip_model.train(was_training)
    emb = emb.view(len(names), len(templates), -1).mean(1)
    return nn.functional.normalize(emb, dim=-1)


def clip_logit_scale(clip_model: nn.Module) -> float:
    """The model's temperature ``exp(logit_scale)`` (100 for OpenAI's CLIP weights)."""
    return float(clip_model.logit_scale.detach().exp())
