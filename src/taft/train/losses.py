"""Losses on logits (B, C) and integer labels (B,), and the proximal penalty / projection on Δw.

Rescaled square loss (Hui & Belkin, 2021), per example and averaged over the batch:
``ℓ = (κ·(f_y − M)² + Σ_{j≠y} f_j²) / C`` — κ weighs the true class, M scales its target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rescaled_square_loss(logits: Tensor, labels: Tensor, *, kappa: float = 1.0, m: float = 15.0) -> Tensor:
    C = logits.shape[-1]
    # (B, C); not F.one_hot, whose range check is data-dependent and fails under vmap (per-example gradients)
    onehot = (labels[..., None] == torch.arange(C, device=labels.device)).to(logits.dtype)
    target = onehot * m
    weight = 1.0 + (kappa - 1.0) * onehot
    return (weight * (logits - target).pow(2)).sum(-1).mean() / C


def mse_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Square loss to the one-hot target (RSL with κ = M = 1)."""
    return rescaled_square_loss(logits, labels, kappa=1.0, m=1.0)


def make_loss(name: str, *, kappa: float = 1.0, m: float = 15.0):
    if name == "rsl":
        return lambda z, y: rescaled_square_loss(z, y, kappa=kappa, m=m)
    if name == "mse":
        return mse_loss
    if name == "ce":
        return F.cross_entropy
    raise ValueError(f"unknown loss {name!r}; use rsl, ce or mse")


def squared_norm(delta: dict[str, Tensor]) -> Tensor:
    """‖Δw‖² over all tensors (the penalty λ‖w − w0‖² is ``λ * squared_norm(Δw)``)."""
    return sum(d.pow(2).sum() for d in delta.values())


@torch.no_grad()
def project_to_ball(delta: dict[str, Tensor], radius: float) -> float:
    """Scale Δw in place onto {‖Δw‖ ≤ R} (global norm). Returns the norm before projection."""
    norm = float(squared_norm(delta).sqrt())
    if norm > radius:
        for d in delta.values():
            d.mul_(radius / norm)
    return norm
