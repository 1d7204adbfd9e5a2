"""Δw kept in float32 (the master copy) while the model runs in bfloat16: what the forward uses, where the gradient
goes, what ``.to()`` does, and the small steps a bf16 Δw would lose."""

from __future__ import annotations

import pytest
import torch

from taft.engine.family import family_for
from taft.tangent_model import TangentModel
from taft.zoo import tiny_bert


@pytest.fixture()
def batch():
    bert = tiny_bert().eval()
    return family_for(bert).example_inputs(3, torch.Generator().manual_seed(1))


def _models(linear: bool = True):
    torch.manual_seed(0)
    base = tiny_bert().eval().to(torch.bfloat16)
    return (TangentModel(base, "last:1", linear=linear, master_dtype=torch.float32),
            TangentModel(base, "last:1", linear=linear))


@pytest.mark.parametrize("linear", [True, False], ids=["tangent", "non-linear"])
def test_forward_uses_the_master_copy_rounded_to_the_model_dtype(batch, linear):
    args, kw = batch
    master, plain = _models(linear)
    assert all(d.dtype == torch.float32 for d in master.delta_dict().values())
    assert all(d.dtype == torch.bfloat16 for d in plain.delta_dict().values())
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, d in master.delta_dict().items():
            d.copy_(1e-2 * torch.randn(d.shape, generator=g))
            plain.delta_dict()[n].copy_(d.to(torch.bfloat16))
    out, ref = master(*args, **kw), plain(*args, **kw)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref)  # the same bf16 computation: Δw rounded once, exactly as the bf16-only model holds it


@pytest.mark.parametrize("linear", [True, False], ids=["tangent", "non-linear"])
def test_gradient_reaches_the_master_copy_in_float32(batch, linear):
    args, kw = batch
    master, plain = _models(linear)
    master(*args, **kw).float().square().sum().backward()
    plain(*args, **kw).float().square().sum().backward()
    for n, d in master.delta_dict().items():
        assert d.grad is not None and d.grad.dtype == torch.float32, n
        # the cast's backward only widens the bf16 gradient: the same values
        assert torch.equal(d.grad, plain.delta_dict()[n].grad.float()), n


def test_small_steps_accumulate_in_the_master_copy_and_vanish_in_bf16():
    master, plain = _models()
    name = master.linearized[0]
    m, p = master.delta_dict()[name], plain.delta_dict()[name]
    with torch.no_grad():
        m.fill_(0.5)
        p.fill_(0.5)
        for _ in range(10):  # ten SGD steps of 1e-4: below bf16's resolution at 0.5 (2^-9)
            m.add_(1e-4)
            p.add_(1e-4)
    assert torch.equal(p, torch.full_like(p, 0.5))  # every step was rounded away
    assert torch.allclose(m, torch.full_like(m, 0.501), atol=1e-6)


def test_to_moves_the_master_copy_but_keeps_its_dtype_and_values(batch):
    args, kw = batch
    master, _ = _models()
    with torch.no_grad():
        for d in master.delta_dict().values():
            d.fill_(1 / 3)
    before = {n: d.detach().clone() for n, d in master.delta_dict().items()}
    master.to(torch.float16)
    assert next(master.base.parameters()).dtype == torch.float16
    for n, d in master.delta_dict().items():
        assert d.dtype == torch.float32 and torch.equal(d, before[n]), n
    assert master(*args, **kw).dtype == torch.float16


def test_master_dtype_must_be_floating():
    with pytest.raises(ValueError, match="floating dtype"):
        TangentModel(tiny_bert(), "last:1", master_dtype=torch.int32)
