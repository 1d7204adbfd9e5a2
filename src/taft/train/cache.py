"""Frozen-prefix feature cache: the stages before the first trained one run once per dataset.

Each example's prefix state is stored trimmed to its own length (padding dropped), so batches can be
re-formed in any order across epochs (and, later, across shards). Kept in memory, or in a safetensors file
for large sets (``save``/``load``), keyed by the caller (base fingerprint, start stage, example ids).
Inputs without a padding mask (images) are stored per example as is, one "length" each; auxiliary flags of
the state (``is_causal``, ``interpolate_pos_encoding``: the same for every batch) are kept as constants.

A cache knows which examples it holds (``ids``: the datasets' stable content ids, in row order) and what produced
them (``info``: start stage, dtype, model, max length, ...); both are stored in the file. ``subset(ids)`` takes the
rows of some examples (a shard, or everything but a forgotten example); ``load`` with ``expect_ids`` /
``expect_info`` refuses a file that holds other examples or came from another setting
(:class:`StaleCacheError`), so callers rebuild instead of training on stale features.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from taft.engine.dual import Dual
from taft.engine.family import State, is_under
from taft.errors import TaftError

if TYPE_CHECKING:
    from taft.config import TrainConfig
    from taft.tangent_model import TangentModel

_PAD = {"attention_mask": 0, "input_ids": 0}


class StaleCacheError(TaftError):
    """A cached feature file that does not hold what the caller expects (other examples or another setting)."""


class FeatureCache:
    """Per-example prefix states ``{"h": (T_i, D), "attention_mask": (T_i,), ...}`` in dataset order."""

    def __init__(self, items: list[dict[str, Tensor]], none_keys: Sequence[str] = (),
                 constants: dict[str, bool | int | float | str] | None = None, *,
                 ids: Sequence[str] | None = None, info: dict[str, str] | None = None) -> None:
        if ids is not None and len(ids) != len(items):
            raise ValueError(f"FeatureCache: {len(ids)} ids for {len(items)} rows")
        self.items = items
        self.none_keys = tuple(none_keys)
        self.constants = dict(constants or {})
        self.ids = None if ids is None else list(ids)
        self.info = dict(info or {})

    def subset(self, ids: Sequence[str]) -> FeatureCache:
        """The rows of examples ``ids``, in that order (tensors shared, not copied)."""
        if self.ids is None:
            raise StaleCacheError("FeatureCache.subset: this cache does not record example ids; rebuild it")
        row = {i: r for r, i in enumerate(self.ids)}
        missing = [i for i in ids if i not in row]
        if missing:
            raise StaleCacheError(f"FeatureCache.subset: {len(missing)} of the requested examples are not in the "
                                  f"cache (e.g. {missing[:3]}); build the cache over a split that holds them")
        return FeatureCache([self.items[row[i]] for i in ids], self.none_keys, self.constants, ids=list(ids),
                            info=self.info)

    @classmethod
    def concat(cls, caches: Sequence[FeatureCache]) -> FeatureCache:
        """The rows of ``caches`` one after another (tensors shared, not copied); they must come from one setting
        (same keys, constants and ``info``) and all record ids, or none."""
        if not caches:
            return cls([], ids=[])
        first = caches[0]
        for c in caches[1:]:
            if (c.none_keys, c.constants, c.info) != (first.none_keys, first.constants, first.info):
                raise StaleCacheError("FeatureCache.concat: the caches were made in different settings")
            if (c.ids is None) != (first.ids is None):
                raise StaleCacheError("FeatureCache.concat: some caches record example ids and some do not")
        ids = None if first.ids is None else [i for c in caches for i in c.ids]
        return cls([it for c in caches for it in c.items], first.none_keys, first.constants, ids=ids,
                   info=first.info)

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
              desc: str = "prefix features", progress: bool = True, drop: Sequence[str] = (),
              ids: Sequence[str] | None = None, info: dict[str, str] | None = None) -> FeatureCache:
        """Run ``tm.prefix`` on ``(indices, args, kwargs)`` batches and split the states per example.

        ``drop``: auxiliary inputs the suffix never reads (pixels, once the embedding stage is in the prefix)."""
        items: list[dict[str, Tensor] | None] = [None] * total
        none_keys: set[str] = set()
        constants: dict[str, bool | int | float | str] = {}
        bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
        for idx, args, kwargs in batches:
            state = tm.prefix(*args, **kwargs)
            tensors = {k: v for k, v in state.aux.items() if isinstance(v, Tensor) and k not in drop}
            none_keys.update(k for k, v in state.aux.items() if v is None)
            for k, v in state.aux.items():
                if isinstance(v, bool | int | float | str) and constants.setdefault(k, v) != v:
                    raise ValueError(f"FeatureCache: auxiliary input {k!r} differs between batches ({v!r} vs "
                                     f"{constants[k]!r}); the cache keeps one value")
            if state.h is not None:
                tensors["h"] = state.h.primal
            mask = tensors.get("attention_mask")
            for b, i in enumerate(idx):
                n = int(mask[b].sum()) if mask is not None else None
                items[i] = {k: (v[b, :n] if n is not None else v[b]).detach().to("cpu").clone()
                            for k, v in tensors.items()}
            bar.update(len(idx))
        bar.close()
        return cls(items, sorted(none_keys), constants, ids=ids, info=info)

    def advance(self, tm, start: int, *, batch_size: int = 256, device: torch.device | str = "cpu",
                progress: bool = False, info: dict[str, str] | None = None) -> FeatureCache:
        """The features of ``tm`` (whose frozen stages end later) from these, made by a model on the same base whose
        frozen stages end at stage ``start``: only the stages in between run (:meth:`TangentModel.advance`)."""
        order = sorted(range(len(self)), key=lambda i: self.lengths[i])  # similar lengths batch with little padding

        class _Advance:  # FeatureCache.build calls ``prefix``
            @staticmethod
            def prefix(state: State) -> State:
                return tm.advance(state, start)

        batches = ((idx, (self.collate(idx, device),), {}) for idx in
                   (order[s : s + batch_size] for s in range(0, len(order), batch_size)))
        return FeatureCache.build(_Advance, batches, len(self), desc="prefix features (advanced)", progress=progress,
                                  ids=self.ids, info=info)

    def collate(self, indices: Sequence[int], device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None) -> State:
        """Batch examples ``indices`` into a prefix state (right-padded to the longest)."""
        rows = [self.items[i] for i in indices]
        aux: dict[str, object] = {k: None for k in self.none_keys}
        aux.update(self.constants)
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
        # Text: every tensor of an item shares its first (token) dimension, so one length list splits them all;
        # a key whose first dimensions differ (pixels beside tokens) gets its own list.
        keys = list(self.items[0]) if self.items else []
        flat = {k: torch.cat([it[k] for it in self.items]) for k in keys}
        lengths = {k: torch.tensor([it[k].shape[0] for it in self.items]) for k in keys}
        if keys:
            flat["__lengths__"] = lengths[keys[0]]
        for k in keys[1:]:
            if not torch.equal(lengths[k], lengths[keys[0]]):
                flat[f"__lengths__.{k}"] = lengths[k]
        meta = {"none_keys": ",".join(self.none_keys), "keys": ",".join(keys), "info": json.dumps(self.info)}
        if self.constants:
            meta["constants"] = json.dumps(self.constants)
        if self.ids is not None:
            meta["ids"] = json.dumps(self.ids)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in flat.items()}, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, *, expect_ids: Sequence[str] | None = None,
             expect_info: dict[str, str] | None = None) -> FeatureCache:
        """Read a saved cache; with ``expect_ids`` / ``expect_info``, a file holding other examples (or in another
        order) or made in another setting raises :class:`StaleCacheError`."""
        from taft.checkpoint import load_safetensors

        flat, meta = load_safetensors(path)  # in memory: a file changed under a long-lived reader cannot SIGBUS it
        stored_ids = json.loads(meta["ids"]) if "ids" in meta else None
        info = json.loads(meta.get("info", "{}"))
        if expect_ids is not None and stored_ids != list(expect_ids):
            raise StaleCacheError(f"{path}: holds features of other examples than the split asks for")
        for k, v in (expect_info or {}).items():
            if info.get(k) != v:
                raise StaleCacheError(f"{path}: made with {k}={info.get(k)!r}, this run has {k}={v!r}")
        keys = [k for k in meta["keys"].split(",") if k]
        lengths = flat.pop("__lengths__").tolist() if keys else []
        split = {k: torch.split(flat[k], flat.pop(f"__lengths__.{k}").tolist() if f"__lengths__.{k}" in flat
                                else lengths) for k in keys}
        items = [{k: split[k][i] for k in keys} for i in range(len(lengths))]
        constants = json.loads(meta.get("constants", "{}"))
        return cls(items, [k for k in meta["none_keys"].split(",") if k], constants, ids=stored_ids, info=info)


# -- keys and reuse (the training pipelines) ------------------------------------------------------------
def cache_info(tm: TangentModel, cfg: TrainConfig) -> dict[str, str]:
    """What produced a split's prefix features, stored with them and checked when they are read back."""
    return {"arch": tm.family.arch, "start": tm._stages[tm.start].name, "model": cfg.model,
            "max_length": str(cfg.max_length), "dtype": str(next(tm.base.parameters()).dtype)}


def load_cached(path: Path, dataset, info: dict[str, str]) -> FeatureCache | None:
    """The cache file at ``path`` if it holds exactly ``dataset``'s examples made in setting ``info``, else
    ``None`` (missing or stale: the caller rebuilds it)."""
    if not path.is_file():
        return None
    try:
        return FeatureCache.load(path, expect_ids=dataset.ids, expect_info=info)
    except StaleCacheError:
        return None


def cache_key(tm: TangentModel, cfg: TrainConfig, dataset, extra: str = "") -> str:
    """Key of one split's prefix features: the prefix's parameters, the start stage, tokenization, and that
    split's example ids (not the head or the linearized blocks, so runs that differ only there share features).

    ``extra``: what else identifies the data (image ids are paths, not contents). Only ``dataset``'s own ids
    enter the key, so a subset (``max_train``) never reuses another subset's features, and a run that does not
    evaluate on test never reads the test split."""
    h = hashlib.sha256()
    for part in cache_info(tm, cfg).values():
        h.update(part.encode())
    prefixes = [p for s in tm._stages[: tm.start] for p in s.prefixes]
    for name, t in sorted(tm.base_params().items()):  # only what the frozen prefix computes with
        if is_under(name, prefixes):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    h.update("\n".join(dataset.ids).encode())
    if extra:
        h.update(extra.encode())
    return h.hexdigest()[:16]


def split_features(tm: TangentModel, cfg: TrainConfig, dataset, name: str, progress: bool, cache_dir: Path | None,
                   key: str, batches: Callable[[], Iterable[tuple[list[int], tuple, dict]]], *,
                   drop: Sequence[str] = ()) -> FeatureCache:
    """Prefix features of one split, for both pipelines: read from ``cache_dir`` when a file made in the same
    setting holds exactly ``dataset``'s examples, else built from ``batches()`` (called only then: no tokenizing or
    image decoding on a hit) and saved there."""
    info = cache_info(tm, cfg)
    path = None if cache_dir is None else cache_dir / f"{key}-{name}.safetensors"
    if path is not None:
        hit = load_cached(path, dataset, info)
        if hit is not None:
            return hit
    cache = FeatureCache.build(tm, batches(), len(dataset), desc=f"prefix features ({name})", progress=progress,
                               drop=drop, ids=dataset.ids, info=info)
    if path is not None:
        cache.save(path)
    return cache
