"""A hook point for per-example gradient book-keeping (fast DP clipping, :mod:`taft.privacy.ghost`).

While a recorder is active, the rules of the layers whose gradient has a closed per-example form (Linear,
LayerNorm) hand it their primal input and output; the recorder keeps the input and hooks the output's gradient.
Nothing is recorded otherwise (one context-variable lookup per layer)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

_ACTIVE: ContextVar[Any] = ContextVar("taft_grad_recorder", default=None)


def active_recorder() -> Any:
    """The recorder of the current forward, or None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def recording(recorder: Any) -> Iterator[Any]:
    token = _ACTIVE.set(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)
