"""The text pipeline: tokenization once per dataset, length-sorted batches for the prefix pass, sentence
embeddings, the classifier (mean pooling, zero-shot head from class descriptions) and its prefix features."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from taft.config import CLASS_NAMES_FIX, ConfigError, TrainConfig
from taft.data.text import SENTENCE_TASKS, load_text_dataset
from taft.models.classifier import Classifier, pool
from taft.train.cache import split_features
from taft.train.pipeline import Prepared, given_class_names, init_classifier
from taft.zoo import load_model, load_tokenizer

ZERO_SHOT_SCALE = 20.0  # logit scale of cosine-similarity heads (sentence-transformers' usual temperature)


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    return tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]


def padded_batch(ids: Sequence[Sequence[int]], pad_id: int = 0, device="cpu") -> dict[str, torch.Tensor]:
    T = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for b, x in enumerate(ids):
        input_ids[b, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[b, : len(x)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def prefix_batches(ids: Sequence[Sequence[int]], batch_size: int, pad_id: int = 0,
                   device="cpu") -> Iterator[tuple[list[int], tuple, dict]]:
    """``(indices, args, kwargs)`` batches in length order for ``FeatureCache.build``, each of sentences of one
    length (no padding). A row's features then do not depend on the other examples of the split (bitwise on CPU;
    padding to a batch-mate's length changes the last bits): a shard store that grows computes its new examples'
    features alone and must get those of a store built at once (``tests/shards/test_grow.py``)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(len(ids[i]), []).append(i)
    for group in groups.values():
        for s in range(0, len(group), batch_size):
            idx = group[s : s + batch_size]
            yield idx, (), padded_batch([ids[i] for i in idx], pad_id, device)


def bucketed_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator,
                     bucket: int = 50) -> list[list[int]]:
    """Shuffled batches of similar lengths: shuffle, sort within windows of ``bucket`` batches, shuffle batches.

    Deterministic for a generator state; cuts padding (the tangent step costs per token)."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * bucket
    batches = []
    for s in range(0, len(perm), window):
        chunk = sorted(perm[s : s + window], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 256,
                 max_length: int = 64) -> Tensor:
    """L2-normalized text embeddings ``(N, D)`` (float32), the one way taft embeds texts: a CLIP model's text tower
    (open_clip ``encode_text`` or Hugging Face ``get_text_features``), or a sentence encoder's mean-pooled output
    (MiniLM: how it was trained). Zero-shot heads come from these."""
    dev = next(model.parameters()).device
    out = []
    for s in range(0, len(texts), batch_size):
        chunk = list(texts[s : s + batch_size])
        if hasattr(model, "get_text_features"):  # transformers CLIPModel
            tok = tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")
            f = model.get_text_features(input_ids=tok["input_ids"].to(dev),
                                        attention_mask=tok["attention_mask"].to(dev))
            f = f if isinstance(f, Tensor) else f.pooler_output  # transformers 5 returns the model output
        elif hasattr(model, "encode_text"):  # open_clip CLIP
            f = model.encode_text(tokenizer(chunk).to(dev))
        else:  # a sentence encoder
            from taft.engine.family import family_for

            batch = padded_batch(tokenize(tokenizer, chunk, max_length), device=dev)
            f = pool(family_for(model).select_output(model(**batch)), batch["attention_mask"], "mean")
        out.append(nn.functional.normalize(f.float(), dim=-1))
    return torch.cat(out)


def build_classifier(cfg: TrainConfig, backbone: nn.Module, tokenizer, num_classes: int,
                     descriptions: list[str] | None) -> Classifier:
    """Backbone + mean pooling + head (:func:`~taft.train.pipeline.init_classifier`); the zero-shot head is the
    class descriptions' sentence embeddings."""

    def head() -> Tensor:
        if not descriptions:
            what = "method=zero-shot" if cfg.method == "zero-shot" else "head_init=zero-shot"
            raise ConfigError(f"{what} needs a description of each class, and {cfg.data} has none (integer labels): "
                              f"name the classes in label order with {CLASS_NAMES_FIX}, or use --head-init random")
        return ZERO_SHOT_SCALE * encode_texts(backbone, tokenizer, descriptions)

    # head_init=probe starts from the zero-shot head where the classes have descriptions, else from random
    zero_shot = (cfg.head_init == "zero-shot" or cfg.method == "zero-shot"
                 or (cfg.head_init == "probe" and bool(descriptions)))
    return init_classifier(cfg, backbone, num_classes, pooling="mean", zero_shot=zero_shot, zero_shot_head=head)


def text_cache_for(tm, tokenizer, dataset, cfg, name: str, progress: bool, cache_dir: Path | None, key: str):
    dev = torch.device(cfg.device)
    return split_features(tm, cfg, dataset, name, progress, cache_dir, key, lambda: prefix_batches(
        tokenize(tokenizer, dataset.texts, cfg.max_length), cfg.eval_batch_size, tokenizer.pad_token_id or 0, dev))


def prepare_text(cfg: TrainConfig, device: torch.device) -> Prepared:
    splits = load_text_dataset(cfg.data, cfg.test_file, root=cfg.data_root, seed=cfg.seed,
                               num_classes=cfg.num_classes)
    task = SENTENCE_TASKS.get(cfg.data)
    # --class-names win over the task's descriptions and the file's string labels
    names = given_class_names(cfg, splits.train.num_classes, declarable=task is None)
    descriptions = names or (list(task.descriptions) if task else (list(splits.train.class_names or []) or None))
    tokenizer = load_tokenizer(cfg.model)
    backbone = load_model(cfg.model).to(device)
    clf = build_classifier(cfg, backbone, tokenizer, splits.train.num_classes, descriptions).to(device)
    positions = getattr(getattr(backbone, "config", None), "max_position_embeddings", None)
    text_cfg = cfg
    if positions and cfg.max_length > positions:  # longer inputs would index past the position embeddings
        if cfg.max_length != TrainConfig.max_length:  # the default is only a cap: no warning for small models
            warnings.warn(f"max_length={cfg.max_length} exceeds the {positions} positions of {cfg.model}; "
                          f"sentences are cut at {positions} tokens", stacklevel=2)
        text_cfg = dataclasses.replace(cfg, max_length=positions)

    def cache_for(tm, ds, name, progress, cache_dir, key):
        return text_cache_for(tm, tokenizer, ds, text_cfg, name, progress, cache_dir, key)

    return Prepared(splits, clf, cache_for)
