"""Accounting comes from Opacus: a published value, calibration that never overshoots, and refusals."""

from __future__ import annotations

import math

import pytest

from taft.config import ConfigError
from taft.privacy.accounting import calibrate_noise, check_budget, epsilon_spent
from taft.privacy.compose import compose_private, parallel_guarantee, sequential_epsilon


def test_rdp_reproduces_opacus_published_value():
    # opacus/tests/accountants_test.py: σ = 1.5, q = 0.04, 2250 steps (90 epochs), δ = 1e-5
    eps = epsilon_spent(1.5, 1e-5, sample_rate=0.04, steps=2250, accountant="rdp")
    assert eps == pytest.approx(7.32911117143, abs=1e-9)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize(("target", "rate", "steps"), [(1.0, 0.05, 20), (3.0, 0.01, 500), (8.0, 1.0, 5)])
def test_calibration_never_overshoots(accountant, target, rate, steps):
    sigma = calibrate_noise(target, 1e-5, sample_rate=rate, steps=steps, accountant=accountant)
    spent = epsilon_spent(sigma, 1e-5, sample_rate=rate, steps=steps, accountant=accountant)
    assert spent <= target
    assert target - spent <= 0.011  # Opacus's search tolerance: close to the target, not needlessly noisy
    less_noise = epsilon_spent(0.9 * sigma, 1e-5, sample_rate=rate, steps=steps, accountant=accountant)
    assert less_noise > spent  # ε decreases with σ: the accountant is not constant


def test_zero_steps_spend_nothing_and_zero_noise_is_no_privacy():
    assert epsilon_spent(1.0, 1e-5, sample_rate=0.1, steps=0) == 0.0
    assert epsilon_spent(0.0, 1e-5, sample_rate=0.1, steps=10) == math.inf


@pytest.mark.parametrize(("eps", "delta", "n", "match"), [
    (0.0, 1e-5, None, "dp_epsilon must be > 0"),
    (-1.0, 1e-5, None, "dp_epsilon must be > 0"),
    (1.0, 1.0, None, r"dp_delta must be in \(0, 1\)"),
    (1.0, 0.0, None, r"dp_delta must be in \(0, 1\)"),
    (1.0, 1e-2, 1000, r"larger than 1/N = 0.001 for N = 1000 .* --dp-delta 0.0001"),
])
def test_bad_budgets_are_refused(eps, delta, n, match):
    with pytest.raises(ConfigError, match=match):
        check_budget(eps, delta, n)


def test_unreachable_target_is_refused_with_what_to_change():
    with pytest.raises(ConfigError, match=r"cannot be met in 1000000000000 steps.*raise --dp-epsilon.*fewer --epochs"):
        calibrate_noise(0.1, 1e-5, sample_rate=1.0, steps=10**12)


def test_bad_accountant_and_rate_are_refused():
    with pytest.raises(ConfigError, match="dp_accountant='gdp' is not valid"):
        calibrate_noise(1.0, 1e-5, sample_rate=0.1, steps=10, accountant="gdp")
    with pytest.raises(ConfigError, match="sampling rate"):
        calibrate_noise(1.0, 1e-5, sample_rate=1.5, steps=10)


def _report(eps, sigma=1.0, q=0.1, steps=100, delta=1e-5):
    return {"epsilon": eps, "delta": delta, "noise_multiplier": sigma, "sample_rate": q, "steps_taken": steps,
            "accountant": "rdp"}


def test_disjoint_shards_compose_in_parallel():
    import torch

    deltas = [{"w": torch.full((2,), float(v))} for v in (1.0, 4.0)]
    avg, g = compose_private(deltas, sizes=[300, 100], privacy=[_report(2.0), _report(3.5)])
    assert g["epsilon"] == 3.5 and g["delta"] == 1e-5
    assert torch.allclose(avg["w"], torch.full((2,), 1.75))
    with pytest.raises(ConfigError, match="was not trained privately"):
        parallel_guarantee([_report(1.0), None])


def test_retraining_on_the_same_records_adds_up():
    one = _report(0.0, sigma=1.0, q=0.1, steps=100)
    one["epsilon"] = epsilon_spent(1.0, 1e-5, sample_rate=0.1, steps=100)
    twice = sequential_epsilon([one, one])
    assert twice == pytest.approx(epsilon_spent(1.0, 1e-5, sample_rate=0.1, steps=200), rel=1e-12)
    assert one["epsilon"] < twice <= 2 * one["epsilon"]
