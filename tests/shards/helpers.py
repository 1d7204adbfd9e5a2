"""The small text task and settings the shard tests share."""

from __future__ import annotations

from taft.config import TrainConfig

LINES = [f"{i % 3} sentence number {i} is {['bad', 'fine', 'good'][i % 3]} {'very ' * (i % 4)}indeed"
         for i in range(90)]
K = 3


def _cfg(data, **kw) -> TrainConfig:
    d, t = data
    base = dict(model="tiny-bert", data=str(d), test_file=str(t), head_init="random", epochs=2, batch_size=8,
                lr=1e-2, scope="last:1", threads=1)
    return TrainConfig(**{**base, **kw})
