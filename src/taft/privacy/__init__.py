"""Differential privacy for tangent fine-tuning: DP-SGD on Δw with Opacus's accountants.

Three pieces, as in Opacus: per-example gradients (:mod:`taft.privacy.grad_sample`), an optimizer wrapper that
clips, noises and averages them (:mod:`taft.privacy.optimizer`), and accounting from a trusted library
(:mod:`taft.privacy.accounting`). :mod:`taft.privacy.fit` is the training loop of ``taft train --dp-epsilon``;
:mod:`taft.privacy.compose` states what averaged shard models guarantee.
"""

from taft.privacy.accounting import calibrate_noise, check_budget, epsilon_spent
from taft.privacy.compose import compose_private, parallel_guarantee, sequential_epsilon
from taft.privacy.grad_sample import nonlinear_twin, per_example_grads
from taft.privacy.optimizer import DPOptimizer, clip_and_sum, per_example_norms

__all__ = ["DPOptimizer", "calibrate_noise", "check_budget", "clip_and_sum", "compose_private", "epsilon_spent",
           "nonlinear_twin", "parallel_guarantee", "per_example_grads", "per_example_norms", "sequential_epsilon"]
