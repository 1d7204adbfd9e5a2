"""Invariants of the wrapper: Δ=0, linearity, gradients, start stage, scopes, the user's module untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from taft.engine.reference import reference_vjp
from taft.scope import ScopeError
from taft.tangent_model import TangentModel
from taft.zoo import tiny_bert
from tests.helpers import assert_close, check_against_reference, check_finite_difference, randomize_delta


@pytest.fixture()
def bert():
    return tiny_bert().eval().double()


@pytest.fixture()
def batch(bert):
    from taft.engine.family import family_for

    return family_for(bert).example_inputs(3, torch.Generator().manual_seed(1))


def test_zero_delta_gives_exactly_the_primal(bert, batch):
    args, kw = batch
    tm = TangentModel(bert, "all")
    f0, t = tm.forward_parts(*args, **kw)
    assert torch.count_nonzero(t) == 0
    assert torch.equal(tm(*args, **kw), f0)
    plain = bert(*args, **kw).last_hidden_state
    assert_close(f0.detach(), plain.detach(), what="primal vs plain model")


def test_output_is_linear_in_delta(bert, batch):
    args, kw = batch
    tm = TangentModel(bert, "last:1")
    f0 = tm(*args, **kw).detach()
    randomize_delta(tm, 0.1, seed=1)
    d1 = {n: d.detach().clone() for n, d in tm.delta_dict().items()}
    y1 = tm(*args, **kw).detach()
    randomize_delta(tm, 0.1, seed=2)
    d2 = {n: d.detach().clone() for n, d in tm.delta_dict().items()}
    y2 = tm(*args, **kw).detach()
    tm.load_delta({n: d1[n] + d2[n] for n in d1})
    y12 = tm(*args, **kw).detach()
    assert_close(y12 - f0, (y1 - f0) + (y2 - f0), what="linearity")
    tm.load_delta({n: 3.0 * d1[n] for n in d1})
    assert_close(tm(*args, **kw).detach() - f0, 3.0 * (y1 - f0), what="homogeneity")


@pytest.mark.parametrize("scope", ["all", "last:1", "attn"])
def test_vjp_gradient_equals_tangent_gradient_and_reference(bert, batch, scope):
    """∂L/∂Δw from the plain network's VJP at w0 == autograd through the tangent pass == reference."""
    args, kw = batch
    tm = TangentModel(bert, scope)
    randomize_delta(tm, 0.1)
    g = torch.randn(3, 12, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    grads = {}
    for mode in ("vjp", "tangent"):
        tm.backward = mode
        tm.zero_grad()
        (tm(*args, **kw) * g).sum().backward()
        grads[mode] = {n: d.grad.clone() for n, d in tm.delta_dict().items()}

    # Reference: Jᵀg by torch.func.vjp of the base model's own forward at w0.
    ref = reference_vjp(tm, g, *args, **kw)

    def flat(d):  # one vector: tensors whose true gradient is 0 (key biases) are judged on the global scale
        return torch.cat([d[n].flatten() for n in tm.linearized])

    assert torch.isfinite(flat(grads["vjp"])).all()
    assert_close(flat(grads["vjp"]), flat(grads["tangent"]), what="grad vjp vs tangent")
    assert_close(flat(grads["vjp"]), flat(ref), what="grad vs reference")
    assert flat(ref).abs().max() > 0


def test_vjp_mode_keeps_no_tangent_graph(bert, batch):
    """In vjp mode the tangent output is detached: the gradient flows only through the primal at w0."""
    args, kw = batch
    tm = TangentModel(bert, "last:1")
    randomize_delta(tm)
    f0, t = tm.forward_parts(*args, **kw)
    assert f0.requires_grad and not t.requires_grad


def test_frozen_prefix_runs_plain(bert, batch):
    args, kw = batch
    tm = TangentModel(bert, "last:1")
    assert tm.start == 2 and tm._stages[tm.start].name == "encoder.layer.1"
    state = tm.prefix(*args, **kw)
    assert state.h.tangent is None and not state.h.primal.requires_grad
    randomize_delta(tm)
    f0, t = tm.suffix_parts(state)
    f0b, tb = tm.forward_parts(*args, **kw)
    assert torch.equal(f0, f0b) and torch.equal(t, tb)


def test_reports_linearized_names(bert):
    tm = TangentModel(bert, "attn")
    assert tm.linearized == [
        f"encoder.layer.{i}.attention.{m}.weight"
        for i in range(2)
        for m in ("self.query", "self.key", "self.value", "output.dense")
    ]
    assert set(tm.delta_dict()) == set(tm.linearized)
    assert all(torch.count_nonzero(d) == 0 for d in tm.delta_dict().values())


def test_user_module_is_not_modified(bert, batch):
    args, kw = batch
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    flags = {n: p.requires_grad for n, p in bert.named_parameters()}
    tm = TangentModel(bert, "last:1", reinit=True)
    randomize_delta(tm)
    tm(*args, **kw).sum().backward()
    torch.optim.SGD([p for p in tm.delta_dict().values()], lr=0.1).step()
    after = bert.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {n: p.requires_grad for n, p in bert.named_parameters()}
    assert all(p.grad is None for p in bert.parameters())


def test_reinit_is_seeded_and_exact(bert, batch):
    args, kw = batch
    a = TangentModel(bert, "last:1", reinit=True, seed=5)
    b = TangentModel(bert, "last:1", reinit=True, seed=5)
    c = TangentModel(bert, "last:1", reinit=True, seed=6)
    name = "encoder.layer.1.attention.self.query.weight"
    base = dict(bert.named_parameters())[name]
    assert torch.equal(a.w0_dict()[name], b.w0_dict()[name])
    assert not torch.equal(a.w0_dict()[name], c.w0_dict()[name])
    assert not torch.equal(a.w0_dict()[name], base)
    randomize_delta(a, 0.1)
    check_against_reference(a, *args, **kw)


def test_linearize_cls_matches_fallback_and_finite_difference(bert, batch):
    args, kw = batch
    tm = TangentModel(bert, "last:1", linearize_cls=True)
    assert tm.linearized[-1] == "taft.cls"
    randomize_delta(tm, 0.1)
    f0, t = tm.forward_parts(*args, **kw)
    tm.force_fallback = True
    f0r, tr = tm.forward_parts(*args, **kw)
    assert_close(f0.detach(), f0r.detach(), what="primal")
    assert_close(t.detach(), tr.detach(), what="tangent")
    tm.force_fallback = False
    check_finite_difference(tm, *args, **kw)


class _Custom(nn.Module):
    """A module no rule knows, using fused SDPA (no forward-AD formula) inside."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 24)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        q, k, v = self.inp(x).view(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, 2, T, 4)
        return self.out(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], 8)).sin()


def test_any_module_works_through_the_fallback():
    torch.manual_seed(0)
    m = _Custom().double()
    tm = TangentModel(m, "all")
    randomize_delta(tm, 0.1)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    check_against_reference(tm, x)
    assert tm.fallback_modules == ["<root>"]
    check_finite_difference(tm, x)
    (tm(x) ** 2).sum().backward()
    assert all(d.grad is not None and torch.isfinite(d.grad).all() for d in tm.delta_dict().values())


def test_scope_errors_name_the_problem(bert):
    with pytest.raises(ScopeError, match="(?s)matches no parameter.*Available names:.*encoder.layer.0"):
        TangentModel(bert, "re:.*nonexistent.*")
    with pytest.raises(ScopeError, match=r"k must be in 1\.\.2"):
        TangentModel(bert, "last:3")
    with pytest.raises(ScopeError, match="has no head"):
        TangentModel(bert, "head")
    with pytest.raises(ScopeError, match="exclusion"):
        TangentModel(bert, "all,!nothing_like_this")
    with pytest.raises(ValueError, match="backward"):
        TangentModel(bert, "all", backward="nope")


def test_suffix_and_regex_patterns(bert):
    tm = TangentModel(bert, "re:encoder\\.layer\\.0\\..*,LayerNorm.bias,!re:.*attention.*")
    assert "embeddings.LayerNorm.bias" in tm.linearized
    assert "encoder.layer.0.intermediate.dense.weight" in tm.linearized
    assert not any("attention" in n for n in tm.linearized)
    assert tm.start == 0


def test_hooked_or_patched_modules_take_the_faithful_fallback(bert, batch):
    """A rule reproduces the class's forward; a hook or an instance-level forward must not be skipped."""
    args, kw = batch
    seen = []
    handle = bert.encoder.layer[1].output.dense.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    tm = TangentModel(bert, "last:1")
    randomize_delta(tm, 0.1)
    check_against_reference(tm, *args, **kw)
    assert tm.fallback_modules == ["encoder.layer.1.output.dense"] and seen
    handle.remove()


def test_all_skips_frozen_parameters_unless_everything_is_frozen():
    """A fixed parameter (``requires_grad=False``, e.g. open_clip's sin-cos position embedding) is not trained by
    ``all``; an explicit pattern or another preset still takes it; a model frozen wholesale gives
    ``requires_grad`` no meaning."""
    from taft.models.timm_vit import tiny_timm_vit

    m = tiny_timm_vit(0)
    m.pos_embed.requires_grad_(False)
    assert "pos_embed" not in TangentModel(m, "all").linearized
    assert "pos_embed" in TangentModel(m, "all,pos_embed").linearized
    m.requires_grad_(False)
    assert "pos_embed" in TangentModel(m, "all").linearized
    m.requires_grad_(True)
    for n, p in m.named_parameters():  # the last block and the head frozen (as peft leaves a base model)
        p.requires_grad_(not n.startswith(("blocks.1.", "norm.", "fc_norm.", "head.")))
    assert "head.weight" in TangentModel(m, "last:1").linearized
    assert not any(n.startswith("blocks.1.") for n in TangentModel(m, "all").linearized)


def test_parameters_are_delta_only_and_the_base_still_follows():
    """Optimizers (and Opacus) see Δw and nothing else; ``.to()`` and ``.train()`` still reach the base model."""
    m = tiny_bert(0).eval()
    tm = TangentModel(m, "last:1")
    assert sorted(id(p) for p in tm.parameters()) == sorted(id(p) for p in tm.delta_dict().values())
    assert all(k.startswith(("delta.", "w0.")) for k in tm.state_dict())
    tm.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    tm.train()
    assert m.training and all(mod.training for mod in m.modules())
    tm.eval()
    assert not m.training
