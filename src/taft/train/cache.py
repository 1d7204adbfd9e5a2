"""Frozen-prefix feature cache: the stages before the first trained one run once per dataset.

Each example's prefix state is stored trimmed to its own length (padding dropped), so batches can be
re-formed in any order across epochs (and, later, across shards). Kept in memory, or in a safetensors file
for large sets (``save``/``load``), keyed by the caller (base fingerprint, start stage, example ids).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from taft.engine.dual import Dual
from taft.engine.family import State

_PAD = {"attention_mask": 0, "input_ids": 0}


class FeatureCache:
    """Per-example prefix states ``{"h": (T_i, D), "attention_mask": (T_i,), ...}`` in dataset order."""

    def __init__(self, items: list[dict[str, Tensor]], none_keys: Sequence[str] = ()) -> None:
        self.items = items
        self.none_keys = tuple(none_keys)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> list[int]:
        """Tokens per example (1 per example for inputs without a padding mask)."""
        key = "attention_mask" if self.items and "attention_mask" in self.items[0] else None
        return [int(it[key].shape[0]) if key else 1 for it in self.items]

    @classmethod
    @torch.no_grad()
    def build(cls, tm, batches: Iterable[tuple[list[int], tuple, dict]], total: int, *,
              desc: str = "prefix features", progress: bool = True) -> FeatureCache:
        """Run ``tm.prefix`` on ``(indices, args, kwargs)`` batches and split the states per example."""
        items: list[dict[str, Tensor] | None] = [None] * total
        none_keys: set[str] = set()
        bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
        for idx, args, kwargs in batches:
            state = tm.prefix(*args, **kwargs)
            tensors = {k: v for k, v in state.aux.items() if isinstance(v, Tensor)}
            none_keys.update(k for k, v in state.aux.items() if v is None)
            if state.h is not None:
                tensors["h"] = state.h.primal
            mask = tensors.get("attention_mask")
            for b, i in enumerate(idx):
                n = int(mask[b].sum()) if mask is not None else None
                items[i] = {k: (v[b, :n] if n is not None else v[b]).detach().to("cpu").clone()
                            for k, v in tensors.items()}
            bar.update(len(idx))
        bar.close()
        return cls(items, sorted(none_keys))

    def collate(self, indices: Sequence[int], device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None) -> State:
        """Batch examples ``indices`` into a prefix state (right-padded to the longest)."""
        rows = [self.items[i] for i in indices]
        aux: dict[str, object] = {k: None for k in self.none_keys}
        h = None
        for key in rows[0]:
            parts = [r[key] for r in rows]
            if parts[0].dim() >= 1 and "attention_mask" in rows[0]:
                T = max(p.shape[0] for p in parts)
                out = parts[0].new_full((len(parts), T, *parts[0].shape[1:]), _PAD.get(key, 0))
                for b, p in enumerate(parts):
                    out[b, : p.shape[0]] = p
            else:
                out = torch.stack(parts)
            out = out.to(device)
            if key == "h":
                h = Dual(out.to(dtype) if dtype is not None else out, None)
            else:
                aux[key] = out
        return State(h, aux)

    # -- disk ---------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Every tensor of an item shares its first (token) dimension, so one length list splits them all.
        keys = list(self.items[0]) if self.items else []
        flat = {k: torch.cat([it[k] for it in self.items]) for k in keys}
        flat["__lengths__"] = torch.tensor([it[keys[0]].shape[0] for it in self.items])
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in flat.items()}, str(tmp),
                  metadata={"none_keys": ",".join(self.none_keys), "keys": ",".join(keys)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> FeatureCache:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        flat = load_file(str(path))
        lengths = flat.pop("__lengths__").tolist()
        keys = [k for k in meta["keys"].split(",") if k]
        split = {k: torch.split(flat[k], lengths) for k in keys}
        items = [{k: split[k][i] for k in keys} for i in range(len(lengths))]
        return cls(items, [k for k in meta["none_keys"].split(",") if k])
