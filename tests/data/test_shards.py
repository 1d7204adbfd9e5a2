"""Hash-based shards: deterministic, disjoint, covering, stable under removal of other examples."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taft.data import DataError, TextDataset, TextExample, assign_shards, shard_of, split_into_shards


def _dataset(n: int) -> TextDataset:
    return TextDataset("toy", [TextExample(f"train:{i:04d}", f"sentence {i}", i % 2) for i in range(n)], 2)


def test_assign_shards_concrete_values():
    ids = ["train:a", "train:b", "train:c"]
    expected = [int.from_bytes(hashlib.sha256(f"3:{i}".encode()).digest()[:8], "big") % 4 for i in ids]
    assert assign_shards(ids, 4, seed=3) == expected
    assert assign_shards(ids, 1, seed=3) == [0, 0, 0]
    assert shard_of("train:a", 4, 3) == expected[0]


def test_split_is_disjoint_covering_and_ordered():
    ds = _dataset(200)
    shards = split_into_shards(ds, 5, seed=0)
    assert len(shards) == 5
    all_ids = [i for s in shards for i in s.ids]
    assert sorted(all_ids) == sorted(ds.ids)
    assert len(set(all_ids)) == 200
    assert all(len(s) > 20 for s in shards)  # roughly balanced: 40 expected each
    for s in shards:
        assert s.ids == sorted(s.ids)  # dataset order kept
        assert s.num_classes == 2
    assert [s.ids for s in split_into_shards(ds, 5, seed=0)] == [s.ids for s in shards]
    assert [s.ids for s in split_into_shards(ds, 5, seed=1)] != [s.ids for s in shards]


def test_removing_an_example_keeps_other_shards():
    ds = _dataset(100)
    before = dict(zip(ds.ids, assign_shards(ds.ids, 4, seed=9), strict=True))
    kept = ds.subset([i for i in range(100) if i != 37])
    after = dict(zip(kept.ids, assign_shards(kept.ids, 4, seed=9), strict=True))
    assert all(after[i] == before[i] for i in kept.ids)
    # and the shard that lost the example is the only one that changed
    old = [set(s.ids) for s in split_into_shards(ds, 4, seed=9)]
    new = [set(s.ids) for s in split_into_shards(kept, 4, seed=9)]
    changed = [k for k in range(4) if old[k] != new[k]]
    assert changed == [before[ds.ids[37]]]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(min_size=1), unique=True, max_size=40), st.integers(1, 7), st.integers(0, 10**6))
def test_shards_in_range_and_per_id(ids, k, seed):
    shards = assign_shards(ids, k, seed)
    assert all(0 <= s < k for s in shards)
    assert shards == [assign_shards([i], k, seed)[0] for i in ids]


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "3"])
def test_num_shards_validated(bad):
    with pytest.raises(DataError, match=r"num_shards must be an integer >= 1"):
        assign_shards(["a"], bad, seed=0)
    with pytest.raises(DataError, match=r"num_shards must be an integer >= 1"):
        split_into_shards(_dataset(3), bad, seed=0)
