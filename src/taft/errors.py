"""Error base class: everything taft raises for bad user input derives from ``TaftError``.

The CLI prints these as one-line messages (no traceback); each names the problem and the fix."""


class TaftError(ValueError):
    pass


class UnsupportedError(TaftError, NotImplementedError):
    """A model configuration, input or mode the closed form does not implement (and cannot hand to the exact
    fallback). Also a ``NotImplementedError``, which is what such refusals raised before."""
