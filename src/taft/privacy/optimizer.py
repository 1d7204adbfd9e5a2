"""The Gaussian mechanism on a sum of clipped per-example gradients, and an optimizer wrapper that steps on it.

One DP-SGD step (Abadi et al., 2016), Opacus's convention:

    g̃ = (Σ_{i∈batch} g_i · min(1, C/‖g_i‖) + N(0, σ²C²·I)) / B_expected

with ``‖g_i‖`` the norm over all trainable tensors together (flat clipping) and ``B_expected = q·N`` under
Poisson sampling (dividing by the realized batch size would make the scale depend on the data). An empty batch
is a step on noise alone. Everything after the noise (Adam's moments, a data-independent penalty gradient, the
learning-rate schedule, a projection onto a ball) is post-processing and costs no privacy.

>>> opt = DPOptimizer(torch.optim.Adam(params), delta, clip=1.0, noise_multiplier=1.1, expected_batch_size=64)
>>> opt.accumulate(per_example_grads(tm, state, labels, loss))   # any number of micro-batches   # doctest: +SKIP
>>> opt.step()                                                    # noise, average, optimizer step # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

Reduce = Callable[[dict[str, Tensor]], dict[str, Tensor]]


def per_example_norms(grads: Mapping[str, Tensor]) -> Tensor:
    """(B,) norms of each example's gradient over all tensors together."""
    return torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()


def clip_and_sum(grads: Mapping[str, Tensor], clip: float) -> dict[str, Tensor]:
    """``Σ_i g_i · min(1, C/‖g_i‖)``: every example contributes a vector of norm ≤ C."""
    factor = (clip / (per_example_norms(grads) + 1e-6)).clamp(max=1.0)  # (B,)  Opacus's 1e-6 guard
    return {n: torch.einsum("b,b...->...", factor.to(g.dtype), g) for n, g in grads.items()}


def gaussian_noise(like: Mapping[str, Tensor], std: float, generator: torch.Generator | None) -> dict[str, Tensor]:
    """Independent N(0, std²) entries shaped like ``like`` (drawn on CPU from ``generator``, then moved)."""
    return {n: (torch.randn(t.shape, generator=generator, dtype=t.dtype) * std).to(t.device)
            for n, t in like.items()}


class DPOptimizer:
    """Wraps a torch optimizer over Δw: collects clipped per-example gradients, then noises, averages and steps.

    Args:
        optimizer: any ``torch.optim`` optimizer over the tensors of ``params``.
        params: ``{name: tensor}`` of the trained values (Δw), the keys of the per-example gradients.
        clip: per-example norm bound C.
        noise_multiplier: σ; the noise on the sum has standard deviation σ·C.
        expected_batch_size: q·N (N for full-batch DP-GD), the divisor of the noisy sum.
        generator: source of the noise (seeded for reproducibility; like Opacus without ``secure_mode``, it is not
            a cryptographically secure generator).
        reduce: data-parallel runs (:func:`sum_over_ranks`): the clipped sum of this process's examples becomes the
            sum over all ranks' before the noise is added, so a step is the single-process step — each rank
            clips its own examples, and the noise (the same seeded draw on every rank) enters the global sum once.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor], *, clip: float,
                 noise_multiplier: float, expected_batch_size: float,
                 generator: torch.Generator | None = None, reduce: Reduce | None = None) -> None:
        if clip <= 0:
            raise ValueError(f"DPOptimizer(clip={clip}): the clipping norm must be > 0")
        if noise_multiplier < 0:
            raise ValueError(f"DPOptimizer(noise_multiplier={noise_multiplier}): must be ≥ 0")
        if expected_batch_size <= 0:
            raise ValueError(f"DPOptimizer(expected_batch_size={expected_batch_size}): must be > 0")
        self.optimizer = optimizer
        self.params = dict(params)
        self.clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.generator = generator
        self.reduce = reduce
        self._sum: dict[str, Tensor] | None = None

    def accumulate(self, per_example: Mapping[str, Tensor]) -> None:
        """Add one micro-batch of per-example gradients ``{name: (b, *shape)}``, clipped to C each."""
        part = clip_and_sum(per_example, self.clip)
        self._sum = part if self._sum is None else {n: self._sum[n] + part[n] for n in part}

    def add_clipped(self, clipped_sum: Mapping[str, Tensor]) -> None:
        """Add one micro-batch's sum of already clipped per-example gradients
        (:func:`taft.privacy.ghost.clipped_sum`)."""
        part = {n: t.detach() for n, t in clipped_sum.items()}
        self._sum = part if self._sum is None else {n: self._sum[n] + part[n] for n in part}

    def noisy_gradient(self) -> dict[str, Tensor]:
        """(clipped sum + N(0, σ²C²)) / B_expected, and the accumulated sum is reset."""
        total = self._sum if self._sum is not None else {n: torch.zeros_like(p) for n, p in self.params.items()}
        self._sum = None
        if self.reduce is not None:
            total = self.reduce(total)
        noise = gaussian_noise(total, self.noise_multiplier * self.clip, self.generator)
        return {n: (total[n].detach() + noise[n]) / self.expected_batch_size for n in total}

    def step(self, extra_grad: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Set each tensor's ``.grad`` to the noisy average (plus ``extra_grad``, a data-independent term such as
        the penalty's 2λΔw) and step the wrapped optimizer. Returns the privatized gradient."""
        grad = self.noisy_gradient()
        for n, p in self.params.items():
            g = grad[n] if extra_grad is None else grad[n] + extra_grad[n].detach()
            p.grad = g.to(p.dtype)
        self.optimizer.step()
        return grad

    def zero_grad(self) -> None:
        self._sum = None
        self.optimizer.zero_grad(set_to_none=True)


def sum_over_ranks(total: dict[str, Tensor]) -> dict[str, Tensor]:
    """The clipped sums of every rank added up (:class:`DPOptimizer`'s ``reduce`` under torchrun, as Opacus's
    DPDDP sums clipped gradients across workers). Cost: one all-reduce of the trained parameters' size."""
    from taft.train.distributed import all_reduce_sum

    names = sorted(total)  # one order on every rank, whichever path built its sum
    summed = dict(zip(names, all_reduce_sum([total[n] for n in names])[0], strict=True))
    return {n: summed[n] for n in total}  # the caller's order: the noise is drawn tensor by tensor in it
