"""``taft check``: closed-form tangent vs the ``torch.func.jvp`` reference on random inputs."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch

from taft.engine.reference import max_rel_err, reference_jvp
from taft.tangent_model import TangentModel

# Half precisions are checked against the float64 model with the same (rounded) weights, inputs and Δw. Their
# tolerances are stated, not derived: about 25 units of rounding (2⁻⁸ for bfloat16, 2⁻¹⁰ for float16), the size of
# what the models here show (`taft check minilm --scope all --dtype bfloat16|float16`, CPU, 2026-11-26: tangent
# 2.7e-2 / 3.1e-3, primal 8e-3 / 6e-4 — the tangent is a longer chain of rounded products).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOW_PRECISION = (torch.bfloat16, torch.float16)


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
    low = dt in LOW_PRECISION
    model = model.to(dt).eval()
    tm = TangentModel(model, scope)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in tm.delta_dict().values():
            d.copy_(torch.randn(d.shape, generator=g, dtype=dt) * delta_scale)
    args, kwargs = tm.family.example_inputs(batch, g)
    with torch.no_grad():
        f0, t = tm.forward_parts(*args, **kwargs)
    if low:  # float64 reference of the same rounded model: what the half-precision run approximates
        ref = TangentModel(copy.deepcopy(model).double(), scope)
        ref.load_delta({n: d.detach().double() for n, d in tm.delta_dict().items()})
        up = lambda x: x.double() if torch.is_tensor(x) and x.is_floating_point() else x  # noqa: E731
        args64, kwargs64 = tuple(up(a) for a in args), {k: up(v) for k, v in kwargs.items()}
        y, ty = reference_jvp(ref, *args64, **kwargs64)
        f0, t = f0.double(), t.double()
    else:
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
