"""The rich console every command prints to (fixed width when the output is not a terminal)."""

from __future__ import annotations

import sys


def console():
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=140)
