"""Privacy accounting from a trusted library: Opacus's RDP and PRV accountants, used standalone.

Nothing here is hand-written maths: :func:`epsilon_spent` asks ``opacus.accountants`` for the ε of the subsampled
Gaussian mechanism run ``steps`` times at sampling rate ``q`` with noise multiplier σ, and :func:`calibrate_noise`
is Opacus's search (``get_noise_multiplier``: double σ from 20 until ε ≤ target, then bisect) for the smallest σ
whose ε does not exceed the target, step for step, with a bound on its iterations (Opacus's loops have none: a
target ε it cannot get within the tolerance of, such as 1e20, searched forever). Targets are capped at
:data:`~taft.config.MAX_DP_EPSILON`. Both are cheap (milliseconds for RDP, up to a second for PRV).

>>> sigma = calibrate_noise(3.0, 1e-5, sample_rate=0.01, steps=500)   # doctest: +SKIP
>>> epsilon_spent(sigma, 1e-5, sample_rate=0.01, steps=500) <= 3.0     # doctest: +SKIP
True
"""

from __future__ import annotations

import math
import numbers

from taft.config import ConfigError, check_dp_epsilon

ACCOUNTANTS = ("rdp", "prv")
# Bisection steps of the σ search: from [0, 20] (or wider) 64 halvings reach the resolution of a float64 σ.
MAX_BISECTIONS = 64


def _accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name not in ACCOUNTANTS:
        raise ConfigError(f"dp_accountant={name!r} is not valid; choose one of {list(ACCOUNTANTS)}")
    return RDPAccountant() if name == "rdp" else PRVAccountant()


def check_budget(epsilon: float, delta: float, n: int | None = None) -> None:
    """Refuse a privacy target that means nothing: ε ≤ 0, not finite or above :data:`~taft.config.MAX_DP_EPSILON`,
    δ outside (0, 1), or δ > 1/N (which allows releasing an example outright)."""
    check_dp_epsilon(epsilon)
    if not (isinstance(delta, numbers.Real) and 0 < delta < 1):
        raise ConfigError(f"dp_delta must be in (0, 1), got {delta}; use a value well below 1/N, e.g. 1e-5")
    if n is not None and delta > 1.0 / n:
        raise ConfigError(f"dp_delta={delta:g} is larger than 1/N = {1.0 / n:.3g} for N = {n} training examples: "
                          f"such a δ allows publishing some records outright; use --dp-delta {_below(1.0 / n):g} "
                          "or smaller")


def _below(x: float) -> float:
    """A round power of ten below ``x`` (the suggestion in error messages)."""
    return 10.0 ** math.floor(math.log10(x) - 1e-12)


def epsilon_spent(sigma: float, delta: float, *, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """ε after ``steps`` of the (Poisson-)subsampled Gaussian mechanism with noise multiplier ``sigma``.

    ``sigma = 0`` is no privacy (``inf``); ``steps = 0`` spends nothing."""
    if steps == 0:
        return 0.0
    if sigma <= 0:
        return math.inf
    acc = _accountant(accountant)
    acc.history = [(float(sigma), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(epsilon: float, delta: float, *, sample_rate: float, steps: int, accountant: str = "rdp",
                    tolerance: float = 0.01) -> float:
    """The noise multiplier σ for which ``steps`` steps at ``sample_rate`` spend at most ``epsilon`` (and within
    ``tolerance`` of it). Raises :class:`ConfigError` naming what to change when no σ Opacus searches reaches it, or
    when the search does not get within ``tolerance`` in :data:`MAX_BISECTIONS` steps."""
    from opacus.accountants.utils import MAX_SIGMA

    check_budget(epsilon, delta)
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sampling rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ConfigError(f"a private run needs at least one step, got {steps}")
    if not (isinstance(tolerance, numbers.Real) and 0 < tolerance < math.inf):
        raise ConfigError(f"calibration tolerance must be a number > 0, got {tolerance!r}")
    acc = _accountant(accountant)

    def spent(sigma: float) -> float:
        acc.history = [(sigma, sample_rate, steps)]
        return float(acc.get_epsilon(delta=delta))

    # Opacus's get_noise_multiplier, step for step (the same σ for the same inputs), its two loops bounded.
    eps_high, sigma_low, sigma_high = math.inf, 0, 10
    while eps_high > epsilon:  # at most log2(MAX_SIGMA / 10) ≈ 17 doublings
        sigma_high = 2 * sigma_high
        eps_high = spent(sigma_high)
        if sigma_high > MAX_SIGMA:
            raise ConfigError(
                f"dp_epsilon={epsilon:g} at dp_delta={delta:g} cannot be met in {steps} steps at sampling rate "
                f"{sample_rate:.3g}, even with noise multiplier {MAX_SIGMA:g} (the privacy budget is too low); raise "
                "--dp-epsilon or --dp-delta, or train fewer steps (fewer --epochs, or a smaller --batch-size)")
    for _ in range(MAX_BISECTIONS):
        if not epsilon - eps_high > tolerance:
            break
        sigma = (sigma_low + sigma_high) / 2
        if not sigma_low < sigma < sigma_high:  # the interval cannot shrink further in float64
            break
        eps = spent(sigma)
        if eps < epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    if epsilon - eps_high > tolerance:
        raise ConfigError(
            f"noise calibration for dp_epsilon={epsilon:g} did not get within {tolerance:g} of it in "
            f"{MAX_BISECTIONS} bisection steps (σ={sigma_high:.6g} spends ε={eps_high:.6g}, and less noise spends more "
            f"than the target); try --dp-accountant {'prv' if accountant == 'rdp' else 'rdp'}, or a smaller "
            f"--dp-epsilon")
    final = epsilon_spent(sigma_high, delta, sample_rate=sample_rate, steps=steps, accountant=accountant)
    if not final <= epsilon:  # Opacus's search keeps the upper end; checked so that no run ever overshoots
        raise ConfigError(f"noise calibration for dp_epsilon={epsilon:g} returned σ={sigma_high:g} spending "
                          f"ε={final:g}; try --dp-accountant {'prv' if accountant == 'rdp' else 'rdp'}")
    return float(sigma_high)
