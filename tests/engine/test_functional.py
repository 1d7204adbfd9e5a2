"""``TangentModel`` under ``torch.func``: Δw are its only parameters, so ``functional_call`` + ``vmap`` / ``grad``
transform it — per-example gradients (DP-SGD) and K stacked Δw in one call (shard models, task vectors)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from taft.models.timm_vit import tiny_timm_vit
from taft.tangent_model import TangentModel
from tests.helpers import assert_close, jitter_params, randomize_delta

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


@pytest.fixture(params=["last:1", "all"])
def tm(request):
    m = jitter_params(tiny_timm_vit(seed=0), 1)
    tm = TangentModel(m, request.param)
    randomize_delta(tm, 0.1)
    return tm


def _inputs(n=4):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64), torch.tensor([1, 2, 3, 4])[:n]


def test_per_example_gradients_equal_one_at_a_time(tm):
    x, y = _inputs()
    params = {k: v.detach() for k, v in tm.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(torch.func.functional_call(tm, p, (xi[None],)), yi[None])

    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(len(x)):
        tm.zero_grad()
        F.cross_entropy(tm(x[i : i + 1]), y[i : i + 1]).backward()
        for k, p in tm.named_parameters():
            assert_close(per_example[k][i], p.grad, what=f"example {i} {k}")
    assert max(per_example[k].abs().max().item() for k in per_example) > 1e-3, "zero gradients: vacuous"


def test_vmap_over_stacked_deltas_equals_separate_calls(tm):
    x, _ = _inputs(3)
    g = torch.Generator().manual_seed(9)
    K = 3
    stacked = {k: 0.1 * torch.randn((K, *v.shape), generator=g, dtype=v.dtype) for k, v in tm.named_parameters()}
    with torch.no_grad():
        together = torch.func.vmap(lambda p: torch.func.functional_call(tm, p, (x,)))(stacked)
        for i in range(K):
            tm.load_delta({n: stacked[f"delta.{n.replace('.', ':')}"][i] for n in tm.linearized})
            alone = tm(x)
            assert (together[i] - alone).abs().max().item() <= 1e-12 * alone.abs().max().item()


def test_gradients_under_vmap_over_stacked_deltas_reach_each_model(tm):
    """K models trained together (shards): each stacked Δw gets its own model's gradient, not the sum over models
    (the straight-through weights must be batched like Δw)."""
    x, y = _inputs(3)
    g = torch.Generator().manual_seed(5)
    K = 3
    xs = x[None].expand(K, *x.shape) + 0.1 * torch.randn(K, *x.shape, generator=g, dtype=x.dtype)
    stacked = {k: (0.1 * torch.randn((K, *v.shape), generator=g, dtype=v.dtype)).requires_grad_(True)
               for k, v in tm.named_parameters()}
    out = torch.func.vmap(lambda p, xi: torch.func.functional_call(tm, p, (xi,)))(stacked, xs)
    sum(F.cross_entropy(out[i], y) for i in range(K)).backward()
    for i in range(K):
        tm.load_delta({n: stacked[f"delta.{n.replace('.', ':')}"][i].detach() for n in tm.linearized})
        tm.zero_grad()
        F.cross_entropy(tm(xs[i]), y).backward()
        for k, p in tm.named_parameters():
            assert_close(stacked[k].grad[i], p.grad, what=f"model {i} {k}")


# -- taft.functional: the same model as pure functions of a name-keyed Δw -----------------------------------------
def _named(tm, seed: int, scale: float = 0.1, K: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (lambda t: t.shape) if K is None else (lambda t: (K, *t.shape))
    return {n: scale * torch.randn(shape(t), generator=g, dtype=t.dtype) for n, t in tm.delta_dict().items()}


def test_tangent_function_is_the_model_at_that_delta_and_leaves_it_alone(tm):
    from taft.functional import tangent_function

    x, _ = _inputs(3)
    state = tm.prefix(x)
    own = {n: t.detach().clone() for n, t in tm.delta_dict().items()}
    delta = _named(tm, 1)
    f0, jvp = tangent_function(tm)(delta, state)
    assert all(torch.equal(t, own[n]) for n, t in tm.delta_dict().items())  # the module's Δw is untouched
    tm.load_delta(delta)
    ref0, ref = tm.forward_parts(x)
    # (without a Δw that requires grad the attention takes its no-grad path: equal to rounding, not bitwise)
    assert (f0 - ref0).abs().max() <= 1e-12 * ref0.abs().max()
    assert (jvp - ref).abs().max() <= 1e-12 * ref.abs().max()
    assert ref.abs().max() > 1e-3  # not vacuous


def test_tangent_function_under_vmap_and_grad(tm):
    from taft.functional import tangent_function

    x, y = _inputs(3)
    state = tm.prefix(x)
    f = tangent_function(tm)
    stacked = _named(tm, 2, K=3)
    together = torch.func.vmap(lambda d: sum(f(d, state)))(stacked)
    for i in range(3):
        alone = sum(f({n: t[i] for n, t in stacked.items()}, state))
        assert (together[i] - alone).abs().max() <= 1e-12 * alone.abs().max()
    delta = _named(tm, 3)
    grads = torch.func.grad(lambda d: F.cross_entropy(sum(f(d, state)), y))(delta)
    tm.load_delta(delta)
    tm.zero_grad()
    F.cross_entropy(tm(x), y).backward()  # the module's VJP-mode gradient
    for n, p in tm.delta_dict().items():
        assert_close(grads[n], p.grad, what=n)


def test_nonlinear_function_and_refusals():
    from taft.functional import nonlinear_function, tangent_function

    m = jitter_params(tiny_timm_vit(seed=0), 1)
    nl = TangentModel(m, "last:1", linear=False)
    x, _ = _inputs(2)
    delta = _named(nl, 4)
    out = nonlinear_function(nl)(delta, nl.prefix(x))
    nl.load_delta(delta)
    assert_close(out, nl(x), what="f(x; w0 + Δw)")
    with pytest.raises(ValueError, match="use tangent_function"):
        nonlinear_function(TangentModel(m, "last:1"))
    with pytest.raises(ValueError, match="use nonlinear_function"):
        tangent_function(nl)
    with pytest.raises(KeyError, match="exactly the model's linearized tensors"):
        nonlinear_function(nl)({n: t for n, t in list(delta.items())[1:]}, nl.prefix(x))
