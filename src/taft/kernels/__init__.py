"""Fused kernels for the tangent forward (Triton). Optional: every caller has an exact PyTorch path."""
