"""Privacy accounting from a trusted library: Opacus's RDP and PRV accountants, used standalone.

Nothing here is hand-written maths: :func:`epsilon_spent` asks ``opacus.accountants`` for the ε of the subsampled
Gaussian mechanism run ``steps`` times at sampling rate ``q`` with noise multiplier σ, and :func:`calibrate_noise`
is Opacus's binary search (``get_noise_multiplier``) for the smallest σ on its grid whose ε does not exceed the
target. Both are cheap (milliseconds for RDP, up to a second for PRV).

>>> sigma = calibrate_noise(3.0, 1e-5, sample_rate=0.01, steps=500)   # doctest: +SKIP
>>> epsilon_spent(sigma, 1e-5, sample_rate=0.01, steps=500) <= 3.0     # doctest: +SKIP
True
"""

from __future__ import annotations

import math

from taft.config import ConfigError

ACCOUNTANTS = ("rdp", "prv")


def _accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name not in ACCOUNTANTS:
        raise ConfigError(f"dp_accountant={name!r} is not valid; choose one of {list(ACCOUNTANTS)}")
    return RDPAccountant() if name == "rdp" else PRVAccountant()


def check_budget(epsilon: float, delta: float, n: int | None = None) -> None:
    """Refuse a privacy target that means nothing: ε ≤ 0, δ outside (0, 1), or δ > 1/N (which allows releasing
    an example outright)."""
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"dp_epsilon must be > 0, got {epsilon}; typical targets are 1, 3 or 8")
    if not 0 < delta < 1:
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
    ``tolerance`` of it). Raises :class:`ConfigError` naming what to change when no σ Opacus searches reaches it."""
    from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

    check_budget(epsilon, delta)
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sampling rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ConfigError(f"a private run needs at least one step, got {steps}")
    _accountant(accountant)  # the name check, with taft's message
    try:
        sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                     steps=steps, accountant=accountant, epsilon_tolerance=tolerance)
    except ValueError as e:  # Opacus: "The privacy budget is too low." (σ would exceed MAX_SIGMA)
        raise ConfigError(
            f"dp_epsilon={epsilon:g} at dp_delta={delta:g} cannot be met in {steps} steps at sampling rate "
            f"{sample_rate:.3g}, even with noise multiplier {MAX_SIGMA:g} ({e}); raise --dp-epsilon or --dp-delta, "
            "or train fewer steps (fewer --epochs, or a smaller --batch-size)") from e
    spent = epsilon_spent(sigma, delta, sample_rate=sample_rate, steps=steps, accountant=accountant)
    if not spent <= epsilon:  # Opacus's search keeps the upper end; checked so that no run ever overshoots
        raise ConfigError(f"noise calibration for dp_epsilon={epsilon:g} returned σ={sigma:g} spending ε={spent:g}; "
                          f"try --dp-accountant {'prv' if accountant == 'rdp' else 'rdp'}")
    return float(sigma)
