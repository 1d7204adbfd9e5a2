"""A store keeps its validation features (validation examples are never training examples, so no forget touches
them): a request reads them instead of encoding the split again, with the same results; a store made before they
were kept, or whose file is damaged, encodes them again (same answers), ``verify`` reports the damage, and the next
writing request writes them anew."""

from __future__ import annotations

import shutil

import pytest
import torch

import taft.train.text as text
from taft.shards import ShardSession, ShardStore, ShardTrainer, forget, verify
from taft.shards.common import VAL_FEATURES, _store_config
from taft.train.cache import FeatureCache

from .test_session import _same, _state
from .test_shards import _ids


@pytest.fixture()
def val_encodings(monkeypatch) -> list[int]:
    """How many validation examples were put through the encoder since the fixture was made."""
    seen: list[int] = []
    real = text.text_cache_for

    def counting(tm, tokenizer, ds, cfg, name, *args, **kw):
        if name == "val":
            seen.append(len(ds))
        return real(tm, tokenizer, ds, cfg, name, *args, **kw)

    monkeypatch.setattr(text, "text_cache_for", counting)
    return seen


def _val_acc(root) -> dict[int, float]:
    with ShardStore(root) as st:
        return {r["shard"]: r["val_acc"] for r in st.shard_rows() if r["status"] == "live"}


def _same_features(a, b) -> bool:
    """Same examples, setting and tensors (the file's bytes may differ: safetensors orders its metadata freely)."""
    x, y = FeatureCache.load(a), FeatureCache.load(b)
    return (x.ids == y.ids and x.info == y.info and x.constants == y.constants and x.none_keys == y.none_keys
            and all(set(p) == set(q) and all(torch.equal(p[k], q[k]) for k in p)
                    for p, q in zip(x.items, y.items, strict=True)))


def _drop_val_features(root) -> None:
    """Make ``root`` a store of the layout before validation features were kept."""
    with ShardStore(root) as st, st.transaction() as db:
        st.set_meta(db, "val_features", None)
    (root / VAL_FEATURES).unlink()


def test_the_store_keeps_its_validation_features_and_a_forget_reads_them(store, val_encodings):
    with ShardStore(store) as st:
        rec, cfg = st.get_meta("val_features"), _store_config(st)
    assert rec["file"] == VAL_FEATURES and rec["examples"] > 0
    kept = FeatureCache.load(store / VAL_FEATURES)
    fresh = ShardTrainer.from_config(cfg).val_features  # encoded now, from the data and w0
    assert kept.ids == fresh.ids and len(kept) == rec["examples"]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(kept.items, fresh.items, strict=True) for k in a)
    val_encodings.clear()
    forget(store, [_ids(store, 1)[0]], retrain=True)
    assert val_encodings == []  # read from the store, not encoded again
    assert verify(store)["ok"]


def test_a_store_without_them_encodes_them_and_its_next_writer_keeps_them(store, tmp_path, val_encodings):
    other = tmp_path / "other"
    shutil.copytree(store, other)
    _drop_val_features(store)
    assert verify(store)["ok"]  # an older store is not damaged
    ShardSession(store)  # a reader outside a writing request writes nothing
    with ShardStore(store) as st:
        assert st.get_meta("val_features") is None and not (store / VAL_FEATURES).exists()
    victim = _ids(store, 1)[2]
    val_encodings.clear()
    forget(store, [victim], retrain=True)
    assert len(val_encodings) == 1  # encoded once, then kept
    forget(other, [victim], retrain=True)
    assert _same(_state(store), _state(other)) and _val_acc(store) == _val_acc(other)
    with ShardStore(store) as st:
        assert st.get_meta("val_features")["examples"] == len(FeatureCache.load(store / VAL_FEATURES))
    assert _same_features(store / VAL_FEATURES, other / VAL_FEATURES)  # what a store made with them holds
    report = verify(store)
    assert report["ok"], report["problems"]


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_damaged_validation_features_are_reported_encoded_again_and_rewritten(store, tmp_path, val_encodings,
                                                                               damage):
    other = tmp_path / "other"
    shutil.copytree(store, other)
    path = store / VAL_FEATURES
    if damage == "flip":
        raw = bytearray(path.read_bytes())
        raw[-3] ^= 0xFF
        path.write_bytes(bytes(raw))
    else:
        path.unlink()
    report = verify(store)
    assert not report["ok"] and any("validation features" in p for p in report["problems"]), report
    victim = _ids(store, 2)[1]
    val_encodings.clear()
    forget(store, [victim], retrain=True)  # the damaged file is never read as features: encoded again
    assert len(val_encodings) == 1
    forget(other, [victim], retrain=True)
    assert _same(_state(store), _state(other)) and _val_acc(store) == _val_acc(other)
    report = verify(store)
    assert report["ok"], report["problems"]
    assert _same_features(path, other / VAL_FEATURES)
