"""Closed-form tangent rules, one per file; importing the package registers them."""

from taft.rules import (  # noqa: F401
    attention,
    conv2d,
    embedding,
    gelu,
    hf_activations,
    identity,
    layer_norm,
    linear,
    multihead_attention,
    tanh,
)
