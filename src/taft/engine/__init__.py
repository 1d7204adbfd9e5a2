"""The tangent engine: dual numbers, the rule registry and dispatch context, the exact torch.func.jvp fallback,
model families (stages) and the recorder that private training reads per-example quantities from."""
