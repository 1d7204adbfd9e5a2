"""Built-in model families (importing registers their rules)."""

from taft.models import bert, clip_vision, hf_vit, open_clip_vit, roberta, timm_vit  # noqa: F401
