"""``taft check``: closed-form tangent vs the ``torch.func.jvp`` reference on random inputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from taft.engine.reference import max_rel_err, reference_jvp
from taft.tangent_model import TangentModel

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class CheckReport:
    model: str
    arch: str
    scope: str
    dtype: str
    linearized: int
    max_rel_err_primal: float
    max_rel_err_tangent: float
    tolerance: float
    fallback_modules: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return max(self.max_rel_err_primal, self.max_rel_err_tangent) <= self.tolerance

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def check_model(model, *, name: str = "model", scope: str = "all", dtype: str = "float64",
                batch: int = 3, seed: int = 0, delta_scale: float = 1e-2) -> CheckReport:
    """Run random inputs and a random Δw through the closed-form tangent and the reference."""
    if dtype not in DTYPES:
        raise ValueError(f"check: dtype {dtype!r} not supported; use one of {sorted(DTYPES)}")
    dt = DTYPES[dtype]
    model = model.to(dt).eval()
    tm = TangentModel(model, scope)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in tm.delta_dict().values():
            d.copy_(torch.randn(d.shape, generator=g, dtype=dt) * delta_scale)
    args, kwargs = tm.family.example_inputs(batch, g)
    with torch.no_grad():
        f0, t = tm.forward_parts(*args, **kwargs)
    y, ty = reference_jvp(tm, *args, **kwargs)
    return CheckReport(
        model=name,
        arch=tm.family.arch,
        scope=str(tm.scope),
        dtype=dtype,
        linearized=len(tm.linearized),
        max_rel_err_primal=max_rel_err(f0, y.detach()),
        max_rel_err_tangent=max_rel_err(t, ty.detach()),
        tolerance=TOLERANCE[dt],
        fallback_modules=list(tm.fallback_modules),
    )
