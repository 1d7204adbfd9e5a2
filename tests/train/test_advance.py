"""Features cached at a late start advance to a later one: the probe's features come from the run's own prefix
features (the training set goes through the encoder once), equal to computing them from the inputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import taft.train.loop as loop
from taft.config import TrainConfig
from taft.train.baselines import make_tangent_model
from taft.train.loop import prepare, resolve_device

LINES = [f"{i % 2} sentence {i} is {['bad', 'good'][i % 2]} {'very ' * (i % 5)}indeed" for i in range(40)]


@pytest.mark.parametrize("scope", ["last:1", "last:2", "all"])
def test_advanced_features_equal_the_direct_prefix(tmp_path, scope):
    (tmp_path / "d.txt").write_text("\n".join(LINES) + "\n")
    cfg = TrainConfig(model="tiny-bert", data=str(tmp_path / "d.txt"), test_file=str(tmp_path / "d.txt"),
                      head_init="random", scope=scope, threads=1, eval_batch_size=7)
    prep = prepare(cfg, resolve_device("cpu"))
    ds = prep.splits.train
    tm = make_tangent_model(cfg, prep.clf).eval()
    probe = make_tangent_model(dataclasses.replace(cfg, method="fc"), prep.clf).eval()
    assert tm.start < probe.start
    late = prep.cache_for(tm, ds, "train", False, None, "")
    advanced = late.advance(probe, tm.start, batch_size=5)
    direct = prep.cache_for(probe, ds, "probe", False, None, "")
    assert advanced.ids == direct.ids and len(advanced) == len(ds)
    for a, d in zip(advanced.items, direct.items, strict=True):
        assert set(a) == set(d)
        for k in a:
            assert a[k].shape == d[k].shape
            assert torch.allclose(a[k].double(), d[k].double(), rtol=1e-5, atol=1e-5), k
    with pytest.raises(ValueError, match="advance"):
        tm.advance(late.collate([0]), probe.start)


def test_a_probe_run_encodes_the_training_set_once(tmp_path, monkeypatch):
    (tmp_path / "d.txt").write_text("\n".join(LINES) + "\n")
    cfg = TrainConfig(model="tiny-bert", data=str(tmp_path / "d.txt"), test_file=str(tmp_path / "d.txt"),
                      head_init="probe", probe_epochs=2, epochs=1, threads=1)
    calls = []
    real = loop.prepare

    def counting_prepare(c, device):
        prep = real(c, device)
        inner = prep.cache_for

        def cache_for(tm, ds, name, *a, **k):
            calls.append(name)
            return inner(tm, ds, name, *a, **k)

        return dataclasses.replace(prep, cache_for=cache_for)

    monkeypatch.setattr(loop, "prepare", counting_prepare)
    result = loop.train(cfg, progress=False)
    assert calls.count("train") == 1 and "probe" not in calls, calls
    assert 0.0 <= result.val_acc <= 1.0
