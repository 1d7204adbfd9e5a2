from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from taft.train.losses import make_loss, mse_loss, project_to_ball, rescaled_square_loss, squared_norm


def test_rescaled_square_loss_by_hand():
    z = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    y = torch.tensor([0, 1])
    # ex1: κ(1−3)² + 2² = 12; ex2: κ(3−3)² + 0² = 0; mean 6, divided by C = 2
    assert rescaled_square_loss(z, y, kappa=2.0, m=3.0).item() == pytest.approx(3.0)
    # κ = M = 1 is the square loss to the one-hot target
    assert mse_loss(z, y).item() == pytest.approx(((0**2 + 2**2) + (0**2 + 2**2)) / 2 / 2)


def test_make_loss_dispatch_and_ce():
    z = torch.tensor([[2.0, 0.0, -1.0]])
    y = torch.tensor([0])
    assert make_loss("ce")(z, y).item() == pytest.approx(F.cross_entropy(z, y).item())
    assert make_loss("rsl", kappa=1.0, m=15.0)(z, y).item() == pytest.approx(((2 - 15) ** 2 + 0 + 1) / 3)
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("hinge")


def test_penalty_and_projection():
    d = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}
    assert squared_norm(d).item() == 25.0
    before = project_to_ball(d, 10.0)
    assert before == 5.0 and d["a"].tolist() == [3.0, 0.0]  # inside the ball: untouched
    project_to_ball(d, 1.0)
    assert squared_norm(d).sqrt().item() == pytest.approx(1.0)
    assert d["a"].tolist() == pytest.approx([0.6, 0.0]) and d["b"].item() == pytest.approx(0.8)
