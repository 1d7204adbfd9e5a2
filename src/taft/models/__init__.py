"""Built-in model families (importing registers their rules)."""

from taft.models import bert  # noqa: F401
