"""Every fast path of the tangent forward against the exact path, through whole models.

CPU: the fused attention kernel runs through Triton's interpreter (``KERNEL_ON_CPU``) inside the engine in
float32, checked against ``torch.func.jvp`` of a float64 copy (forward and the VJP gradient). GPU (``-m gpu``):
float32 runs the unfused exact path, within 1e-4; bfloat16 runs the real
kernel, within 2× (+1e-3) of the error the exact closed form (kernel off) makes in bfloat16 — both against float64 —
for the forward, and the VJP gradient likewise.
"""

from __future__ import annotations

import copy

import pytest
import torch

from taft.engine.reference import max_rel_err, reference_jvp, reference_vjp
from taft.kernels import attention as fused
from taft.models.timm_vit import tiny_timm_vit
from taft.rules import attention as attention_rule
from taft.tangent_model import TangentModel
from taft.zoo import tiny_bert
from tests.helpers import example_inputs, jitter_params, randomize_delta

pytestmark = pytest.mark.skipif(fused.triton is None, reason="needs Triton")


def _models():
    vit = jitter_params(tiny_timm_vit(seed=0, img_size=40, patch_size=8), 1, torch.float64)  # 26 tokens
    bert = jitter_params(tiny_bert(0).eval(), 2, torch.float64)
    return {"timm-vit": vit, "bert": bert}


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    real = fused.tangent_attention

    def spy(*a, **k):
        calls.append(a[0].dtype)
        return real(*a, **k)

    monkeypatch.setattr(fused, "tangent_attention", spy)
    return calls


def _pair(m64, scope, dtype, device):
    """(fast model in ``dtype`` on ``device``, float64 reference model) with the same Δw."""
    ref = TangentModel(m64, scope)
    randomize_delta(ref, 0.1)
    fast = TangentModel(copy.deepcopy(m64).to(device=device, dtype=dtype), scope)
    fast.load_delta({n: d.detach().to(device=device, dtype=dtype) for n, d in ref.delta_dict().items()})
    return fast, ref


def _inputs(m64, device, dtype):
    args, kw = example_inputs(m64, 3)

    def mv(x):
        if not isinstance(x, torch.Tensor):
            return x
        return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)

    fp = lambda x: x.double() if x.is_floating_point() else x  # noqa: E731
    return (tuple(mv(a) for a in args), {k: mv(v) for k, v in kw.items()},
            tuple(fp(a) for a in args), {k: fp(v) for k, v in kw.items()})


def _errors(fast, ref, args, kw, args64, kw64, dtype):
    """Relative errors of (f0, J·Δw, ∂L/∂Δw) of ``fast`` against the float64 reference."""
    with torch.no_grad():
        f0, t = fast.forward_parts(*args, **kw)
    y, ty = reference_jvp(ref, *args64, **kw64)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = fast(*args, **kw)
    (out.float() * g.to(out.device)).sum().backward()
    gref = reference_vjp(ref, g, *args64, **kw64)
    grads = {n: d.grad for n, d in fast.delta_dict().items()}
    # relative to the whole gradient: some entries are exactly 0 in exact arithmetic (the key bias, by softmax's
    # shift invariance) and only rounding noise in float32
    grad_err = max_rel_err(torch.cat([grads[n].double().cpu().flatten() for n in ref.linearized]),
                           torch.cat([gref[n].flatten() for n in ref.linearized]))
    return max_rel_err(f0.double().cpu(), y), max_rel_err(t.double().cpu(), ty), grad_err


@pytest.mark.parametrize("scope", ["all", "last:1"])
@pytest.mark.parametrize("name", ["timm-vit", "bert"])
def test_kernel_in_the_engine_cpu(name, scope, monkeypatch, kernel_calls):
    monkeypatch.setattr(attention_rule, "KERNEL_ON_CPU", True)
    m64 = _models()[name]
    fast, ref = _pair(m64, scope, torch.float32, "cpu")
    args, kw, args64, kw64 = _inputs(m64, "cpu", torch.float32)
    e_f0, e_t, e_g = _errors(fast, ref, args, kw, args64, kw64, torch.float32)
    assert kernel_calls, "the fused kernel was not used"
    assert max(e_f0, e_t, e_g) < 1e-5, (e_f0, e_t, e_g)
    assert fast.fallback_modules == []


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scope", ["all", "last:1"])
@pytest.mark.parametrize("name", ["timm-vit", "bert", "vit-197"])
def test_fast_paths_on_gpu(name, scope, dtype, monkeypatch, kernel_calls):
    if name == "vit-197":  # 224 px / 16: the 197 tokens of every ViT-B/16
        m64 = jitter_params(tiny_timm_vit(seed=0, img_size=224, patch_size=16, embed_dim=64, num_heads=2), 1,
                            torch.float64)
    else:
        m64 = _models()[name]
    fast, ref = _pair(m64, scope, dtype, "cuda")
    args, kw, args64, kw64 = _inputs(m64, "cuda", dtype)
    errs = _errors(fast, ref, args, kw, args64, kw64, dtype)
    if dtype == torch.float32:  # float32: the unfused exact path
        assert not kernel_calls
        assert max(errs) < 1e-4, errs
        return
    assert kernel_calls, "the fused kernel was not used"
    monkeypatch.setattr(attention_rule, "FUSED", False)  # the exact closed form, in bfloat16
    slow, _ = _pair(m64, scope, dtype, "cuda")
    bar = _errors(slow, ref, args, kw, args64, kw64, dtype)
    for what, e, b in zip(("f0", "jvp", "grad"), errs, bar, strict=True):
        assert e <= 2 * b + 1e-3, f"{what}: fused {e:.2e} vs exact-in-bf16 {b:.2e}"


def test_too_large_for_32_bit_offsets_takes_the_exact_path(monkeypatch, kernel_calls):
    monkeypatch.setattr(attention_rule, "KERNEL_ON_CPU", True)
    monkeypatch.setattr(fused, "MAX_NUMEL", 64)  # as if q held 2³¹ elements
    m64 = _models()["timm-vit"]
    fast, ref = _pair(m64, "all", torch.float32, "cpu")
    args, kw, args64, kw64 = _inputs(m64, "cpu", torch.float32)
    assert max(_errors(fast, ref, args, kw, args64, kw64, torch.float32)) < 1e-5
    assert not kernel_calls
    q = torch.zeros(1, 1, 80, 8)
    with pytest.raises(ValueError, match="64-bit"):
        fused.tangent_attention(q, q, q, None, None, None, scale=1.0)
