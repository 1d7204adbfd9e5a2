"""Error base class: everything taft raises for bad user input derives from ``TaftError``.

The CLI prints these as one-line messages (no traceback); each names the problem and the fix."""


class TaftError(ValueError):
    pass
