"""taft: tangent fine-tuning of pretrained transformers."""

__version__ = "0.1.0"
