"""min_steps: small training sets train at least that many optimizer steps (epochs raised), everywhere a training
length is planned: ordinary runs, shard stores (sequential and batched alike) and private runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from taft.config import ConfigError, TrainConfig
from taft.shards import ShardTrainer


def test_epochs_for_raises_epochs_to_reach_min_steps():
    cfg = TrainConfig(epochs=5, batch_size=32, min_steps=300)
    assert cfg.epochs_for(4907) == 5  # 154 steps an epoch: already 770
    assert cfg.epochs_for(98) == 75  # 4 steps an epoch: 75 epochs reach 300
    assert cfg.epochs_for(1) == 300
    assert TrainConfig(epochs=5).epochs_for(10) == 5  # off by default
    with pytest.raises(ConfigError, match="min_steps"):
        TrainConfig(min_steps=0)


def test_min_steps_run_equals_the_run_with_those_epochs(tmp_path):
    lines = [f"{i % 2} sentence {i} is {['bad', 'good'][i % 2]}" for i in range(40)]
    (tmp_path / "d.txt").write_text("\n".join(lines) + "\n")
    cfg = TrainConfig(model="tiny-bert", data=str(tmp_path / "d.txt"), test_file=str(tmp_path / "d.txt"),
                      head_init="random", method="taft", epochs=1, batch_size=8, lr=1e-2, threads=1,
                      min_steps=12)
    trainer = ShardTrainer.from_config(cfg)
    ids = trainer.features.ids[:20]  # 3 steps an epoch: 4 epochs
    a = trainer.train_one(0, ids)
    trainer.cfg = dataclasses.replace(cfg, min_steps=None, epochs=4)
    b = trainer.train_one(0, ids)
    trainer.cfg = dataclasses.replace(cfg, min_steps=None, epochs=1)
    c = trainer.train_one(0, ids)
    assert all(torch.equal(a.delta[n], b.delta[n]) for n in a.delta)
    assert any(not torch.equal(a.delta[n], c.delta[n]) for n in a.delta), "min_steps changed nothing: vacuous"


def test_batched_shards_of_different_sizes_follow_sequential_with_min_steps(tmp_path):
    lines = [f"{i % 2} sentence {i} is {['bad', 'good'][i % 2]} {'very ' * (i % 3)}" for i in range(60)]
    (tmp_path / "d.txt").write_text("\n".join(lines) + "\n")
    cfg = TrainConfig(model="tiny-bert", data=str(tmp_path / "d.txt"), test_file=str(tmp_path / "d.txt"),
                      head_init="random", method="taft", epochs=1, batch_size=8, lr=0.1, optimizer="sgd",
                      threads=1, min_steps=9)
    trainer = ShardTrainer.from_config(cfg)
    ids = trainer.features.ids
    jobs = [(0, ids[:8]), (1, ids[8:40]), (2, ids[40:52])]  # 1, 4 and 2 steps an epoch: 9, 3 and 5 epochs
    seq = [trainer.train_one(k, i) for k, i in jobs]
    bat = trainer.train_batched(jobs)
    for s, b in zip(seq, bat, strict=True):
        scale = max(t.abs().max() for t in s.delta.values())
        assert max((s.delta[n] - b.delta[n]).abs().max() for n in s.delta) <= 1e-5 * scale


def test_private_plan_counts_the_raised_epochs():
    from taft.privacy.fit import plan_private_run

    cfg = TrainConfig(method="taft", head_init="zero-shot", epochs=1, batch_size=10, dp_epsilon=3.0, dp_delta=1e-3,
                      min_steps=20)
    plan = plan_private_run(cfg, 50)  # 5 steps an epoch: 4 epochs
    assert plan.steps == 20
    assert plan_private_run(dataclasses.replace(cfg, min_steps=None), 50).steps == 5
