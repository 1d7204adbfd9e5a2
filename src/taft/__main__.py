"""``python -m taft``: the command line, also as ``torchrun ... -m taft train ...`` (one process per rank)."""

import sys

from taft.cli import main

if __name__ == "__main__":
    sys.exit(main())
