"""The frozen-prefix feature cache knows its examples and its setting: subsets by id, and stale files refused."""

from __future__ import annotations

import copy

import pytest
import torch

from taft.config import TrainConfig
from taft.models.classifier import Classifier
from taft.tangent_model import TangentModel
from taft.train.cache import FeatureCache, StaleCacheError, cache_info, cache_key, load_cached
from taft.train.text import prefix_batches, tokenize
from taft.zoo import load_model, load_tokenizer
from tests.helpers import assert_close, randomize_delta

TEXTS = ["a gripping , funny film", "dull", "one of the worst movies of the year , sadly", "fine", "wow ."]
IDS = [f"id{i}" for i in range(len(TEXTS))]


class _Split:
    def __init__(self, ids):
        self.ids = list(ids)


def _clf():
    torch.manual_seed(0)
    return Classifier(load_model("tiny-bert"), 6)


@pytest.fixture(scope="module")
def tm():
    tm = TangentModel(_clf(), "last:1")
    randomize_delta(tm, 0.1)
    return tm


def _build(tm, ids=IDS, info=None):
    tok = load_tokenizer("tiny-bert")
    toks = tokenize(tok, [TEXTS[IDS.index(i)] for i in ids], 32)
    return FeatureCache.build(tm, prefix_batches(toks, 2), len(toks), progress=False, ids=ids, info=info)


def test_subset_takes_the_rows_of_those_examples(tm):
    full = _build(tm)
    sub = full.subset(["id3", "id0"])
    direct = _build(tm, ids=["id3", "id0"])
    assert sub.ids == ["id3", "id0"]
    f0a, ta = tm.suffix_parts(sub.collate([0, 1]))
    f0b, tb = tm.suffix_parts(direct.collate([0, 1]))
    assert_close((f0a + ta).detach(), (f0b + tb).detach(), what="subset vs built alone")
    with pytest.raises(StaleCacheError, match="not in the cache"):
        full.subset(["id0", "nope"])


def test_ids_and_info_round_trip_and_stale_files_are_refused(tm, tmp_path):
    info = {"start": "encoder.layer.1", "dtype": "torch.float32"}
    path = tmp_path / "c.safetensors"
    _build(tm, info=info).save(path)
    back = FeatureCache.load(path, expect_ids=IDS, expect_info=info)
    assert back.ids == IDS and back.info == info
    with pytest.raises(StaleCacheError, match="other examples"):
        FeatureCache.load(path, expect_ids=IDS[:3])
    with pytest.raises(StaleCacheError, match="other examples"):
        FeatureCache.load(path, expect_ids=list(reversed(IDS)))
    with pytest.raises(StaleCacheError, match="dtype"):
        FeatureCache.load(path, expect_info={**info, "dtype": "torch.bfloat16"})
    # what the training loop does: a stale file is not used (it is rebuilt), a matching one is
    assert load_cached(path, _Split(IDS[:3]), info) is None
    assert load_cached(path, _Split(IDS), info) is not None
    assert load_cached(tmp_path / "missing.safetensors", _Split(IDS), info) is None


def test_the_key_changes_with_subset_model_scope_length_and_dtype(tm):
    cfg = TrainConfig(model="tiny-bert", data="trec", max_length=32)
    base = cache_key(tm, cfg, _Split(IDS))
    assert cache_key(tm, cfg, _Split(IDS)) == base, "nothing changed: the features must be reused"
    assert cache_key(tm, cfg, _Split(IDS[:4])) != base
    assert cache_key(tm, TrainConfig(model="tiny-bert", data="trec", max_length=16), _Split(IDS)) != base
    assert cache_key(TangentModel(tm.base, "last:2"), cfg, _Split(IDS)) != base
    assert cache_key(TangentModel(tm.base, "last:1", reinit=True), cfg, _Split(IDS)) == base  # prefix unchanged
    other = TangentModel(_clf(), "last:1")
    with torch.no_grad():
        other.base.backbone.embeddings.word_embeddings.weight.add_(1.0)
    assert cache_key(other, cfg, _Split(IDS)) != base
    half = TangentModel(copy.deepcopy(tm.base).to(torch.bfloat16), "last:1")
    assert cache_info(half, cfg)["dtype"] == "torch.bfloat16"
    assert cache_key(half, cfg, _Split(IDS)) != base
