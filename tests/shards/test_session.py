"""A store held open by a long-lived process (ShardSession) gives bitwise the results of one-shot requests, reads
again what another process changed, and does not rebuild w0 per request; stores of the one-file features layout
are split per shard by their next request."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest
import torch

from taft.checkpoint import read_delta
from taft.shards import ShardSession, ShardStore, ShardTrainer, forget, train_store, verify
from taft.shards.common import _read_features
from taft.train.cache import FeatureCache

from .test_shards import _bitwise, _ids


def _state(root: Path) -> dict:
    """Everything a reader sees: the live shards' Δw, the composed Δw, the features of every shard."""
    with ShardStore(root) as st:
        shards = {r["shard"]: read_delta(root / r["file"])[0] for r in st.shard_rows() if r["status"] == "live"}
        feats = {k: FeatureCache.load(root / r["file"]) for k, r in st.feature_rows().items()}
    composed = read_delta(root / "composed" / "delta.safetensors")[0]
    return {"shards": shards, "composed": composed, "features": {k: (f.ids, [it["h"] for it in f.items])
                                                                 for k, f in feats.items()}}


def _same(a: dict, b: dict) -> bool:
    if set(a["shards"]) != set(b["shards"]) or set(a["features"]) != set(b["features"]):
        return False
    return (all(_bitwise(a["shards"][k], b["shards"][k]) for k in a["shards"])
            and _bitwise(a["composed"], b["composed"])
            and all(a["features"][k][0] == b["features"][k][0]
                    and all(torch.equal(x, y) for x, y in zip(a["features"][k][1], b["features"][k][1], strict=True))
                    for k in a["features"]))


def test_session_forget_equals_one_shot_forget_bitwise(store, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(store, other)
    a, b = _ids(store, 1)[0], _ids(store, 0)[2]
    session = ShardSession(store)
    session.forget([a], retrain=True)
    session.forget([b])  # drop
    forget(other, [a], retrain=True)
    forget(other, [b])
    assert _same(_state(store), _state(other))
    assert verify(store)["ok"]


def test_session_does_not_rebuild_w0_or_reread_shards(store, monkeypatch):
    session = ShardSession(store)
    # the modules that look up read_delta
    readers = [importlib.import_module(f"taft.shards.{m}") for m in ("common", "composition", "create")]

    def refuse(*a, **k):
        raise AssertionError("rebuilt w0 / re-read a shard file inside a warm session")

    monkeypatch.setattr(ShardTrainer, "from_config", classmethod(lambda cls, *a, **k: refuse()))
    real_read = readers[0].read_delta
    reads = []
    for module in readers:
        monkeypatch.setattr(module, "read_delta",
                            lambda p, *a, **k: (reads.append(Path(p).name), real_read(p, *a, **k))[1])
    session.forget([_ids(store, 2)[0]], retrain=True)
    # only the retrained shard's new file is read (once, for its metadata), and the composed folder's check in verify
    assert reads == ["shard-0002-g2.safetensors"], reads


def test_session_add_and_import_then_forget_equal_one_shot_requests_bitwise(store, data, tmp_path, monkeypatch):
    """Growth in a session: its new shards and features are kept in memory, w0 is not rebuilt, and the store ends
    bitwise as the one-shot requests leave it, through a forget of an added and of an imported example."""
    from taft.shards.grow import add_data, export_shard, import_shard

    from .helpers import _cfg
    from .test_grow import NEW, OTHER, _write

    other = tmp_path / "other"
    shutil.copytree(store, other)
    new = _write(tmp_path / "new.txt", NEW)
    donor = tmp_path / "donor"
    train_store(_cfg((_write(tmp_path / "donor.txt", OTHER), data[1])), donor, 2, progress=False)
    export_shard(donor, 1, tmp_path / "pkg")
    session = ShardSession(store)
    with monkeypatch.context() as m:
        m.setattr(ShardTrainer, "from_config", classmethod(lambda cls, *a, **k: pytest.fail("rebuilt w0")))
        assert session.add(new, num_shards=2)["shards"] == [3, 4]
        with ShardStore(store) as st:  # the new shards' Δw and features are in memory
            feats, rows = st.feature_rows(), {r["shard"]: r for r in st.shard_rows()}
        assert {(feats[k]["file"], feats[k]["sha256"]) for k in (3, 4)} <= set(session.loaded.features)
        assert {(rows[k]["file"], rows[k]["sha256"]) for k in (3, 4)} <= set(session.loaded.deltas)
        added = _ids(store, 4)[0]
        session.forget([added], retrain=True)
        assert session.import_shard(tmp_path / "pkg")["shard"] == 5
        imported = _ids(store, 5)[0]
        session.forget([imported])
    add_data(other, new, num_shards=2)
    forget(other, [added], retrain=True)
    import_shard(other, tmp_path / "pkg")
    forget(other, [imported])
    assert _same(_state(store), _state(other))
    with ShardStore(store) as st:
        live = {(r["file"], r["sha256"]) for r in st.shard_rows() if r["status"] == "live"}
    assert set(session.loaded.deltas) <= live  # nothing stale kept
    assert verify(store)["ok"]


def test_session_reads_again_what_another_process_changed(store, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(store, other)
    a, b = _ids(store, 0)[0], _ids(store, 0)[1]
    session = ShardSession(store)
    forget(store, [a], retrain=True)  # another process, behind the session's back: shard 0 and its features change
    session.forget([b], retrain=True)
    forget(other, [a], retrain=True)
    forget(other, [b], retrain=True)
    assert _same(_state(store), _state(other))
    assert verify(store)["ok"]


def test_old_one_file_features_layout_is_split_per_shard(store, tmp_path):
    """A store written before features were kept per shard: its next request splits the file, nothing changes."""
    other = tmp_path / "other"
    shutil.copytree(store, other)
    with ShardStore(store) as st:
        feats = _read_features(st)
        order = st.all_live_ids()
        legacy = st.root / "features" / "train-g1.safetensors"
        feats.subset(order).save(legacy)
        for r in st.feature_rows().values():
            (st.root / r["file"]).unlink()
        with st.transaction() as db:
            db.execute("DELETE FROM features")
            st.set_meta(db, "features", st.rel(legacy))
    report = verify(store)
    assert report["ok"], report["problems"]
    assert not legacy.exists()
    victim = _ids(store, 1)[3]
    forget(store, [victim], retrain=True)
    forget(other, [victim], retrain=True)
    assert _same(_state(store), _state(other))


def test_a_corrupt_features_file_is_reported_and_refused(store):
    with ShardStore(store) as st:
        path = st.root / st.feature_rows()[1]["file"]
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    report = verify(store)
    assert not report["ok"] and any("shard 1" in p and "SHA-256" in p for p in report["problems"])
    with pytest.raises(Exception, match="SHA-256"):
        forget(store, [_ids(store, 1)[0]], retrain=True)
