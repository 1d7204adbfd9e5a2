"""Text inputs: tokenization once per dataset, length-sorted batches for the prefix pass."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


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
    """``(indices, args, kwargs)`` batches in length order (little padding), for ``FeatureCache.build``."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
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
