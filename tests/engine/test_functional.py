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
