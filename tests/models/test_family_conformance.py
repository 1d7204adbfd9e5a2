"""The checks every model family passes, written once and run over each family's small float64 configs.

What only one family has (special options, unsupported-option errors, its own edge cases) stays in that
family's ``test_<family>.py``, which also owns the builder (and config names) used here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from taft.engine.context import TangentContext
from taft.engine.family import family_for
from taft.engine.reference import max_rel_err, reference_vjp
from taft.tangent_model import TangentModel
from tests.helpers import (
    assert_close,
    check_against_reference,
    check_finite_difference,
    example_inputs,
    mha_fastpath,
    randomize_delta,
    tangent_model,
)
from tests.models import test_bert, test_clip_vision, test_hf_vit, test_open_clip, test_roberta, test_timm_vit

VISION_SCOPES = ("all", "last:1", "attn", "head")


def _selected(m: nn.Module, out) -> Tensor:
    return family_for(m).select_output(out)


@dataclass(frozen=True)
class FamilyCase:
    """One family: how to build its tiny model and which of its configs each check runs on."""

    name: str
    build: Callable[..., nn.Module]  # build(config, dtype=...): tiny random-init model, float64 by default
    last_block: str  # parameter-name prefix of the last block (reinit of scope "last:1")
    configs: tuple[str, ...] = ("default",)  # reference match (every scope) and exact zero-Δ primal
    scopes: tuple[str, ...] = VISION_SCOPES
    fd_config: str = "default"
    fd_batches: tuple[int, ...] = (1, 3)
    float32_configs: tuple[str, ...] = ("default",)
    cls_configs: tuple[str, ...] = ("default",)  # linearize_cls vs force_fallback
    cls_token_config: str | None = "default"  # cls_init vs the embedded CLS token; None: no learned CLS token
    reinit_configs: tuple[str, ...] = ("default",)
    reinit_changes: tuple[str, ...] = ()  # parameters the reinit must change (besides "some in the block")
    vjp_config: str = "default"  # vjp gradient and non-linear mode
    own_output: Callable[[nn.Module, object], Tensor] = _selected  # the tensor the stages compute, from m(...)
    setup: Callable[[], AbstractContextManager] = nullcontext  # around each test
    own_forward: Callable[[], AbstractContextManager] = nullcontext  # around the model's own forward


CASES = [
    FamilyCase(
        "timm",
        test_timm_vit.build,
        last_block="blocks.1.",
        configs=tuple(test_timm_vit.CONFIGS),
        fd_config="clip_like",
        cls_configs=("default", "clip_like"),
        cls_token_config="clip_like",
        reinit_configs=("default", "clip_like"),
        vjp_config="clip_like",
        own_output=lambda m, out: out,
    ),
    FamilyCase(
        "hf_vit",
        test_hf_vit.build,
        last_block="layers.1.",
        float32_configs=("sdpa", "eager"),
        own_output=lambda m, out: out.last_hidden_state,
    ),
    FamilyCase(
        "clip_vision",
        test_clip_vision.build,
        last_block="encoder.layers.1.",  # under "vision_model." in the projection model
        configs=("default", "projection"),
        float32_configs=("sdpa", "eager"),
        reinit_configs=("default", "projection"),
        vjp_config="projection",
    ),
    FamilyCase(
        "open_clip",
        test_open_clip.build,
        last_block="transformer.resblocks.1.",
        configs=tuple(test_open_clip.CONFIGS),
        fd_config="quickgelu_ls_lnd",
        cls_configs=("default", "quickgelu_ls_lnd"),
        reinit_configs=("default", "quickgelu_ls_lnd"),
        reinit_changes=("transformer.resblocks.1.attn.in_proj_weight", "transformer.resblocks.1.attn.out_proj.weight"),
        vjp_config="quickgelu_ls_lnd",
        # torch's fused MHA fast path has no forward-mode derivative (the reference and the jvp fallback need
        # the slow path, same maths); the model's own forward is checked with it on.
        setup=lambda: mha_fastpath(False),
        own_forward=lambda: mha_fastpath(True),
    ),
    FamilyCase(
        "bert",
        lambda config, dtype=torch.float64: test_bert.tiny_bert(dtype=dtype),
        last_block="encoder.layer.1.",
        scopes=("all", "last:1", "last:2", "attn", "re:.*LayerNorm.*", "!re:.*bias,all"),
        fd_batches=(1, 4),
        cls_configs=("default",),
        cls_token_config=None,  # [CLS] is an input token, not a parameter
        own_output=lambda m, out: out.last_hidden_state,
    ),
    FamilyCase(
        "roberta",
        lambda config, dtype=torch.float64: test_roberta.tiny_roberta(dtype=dtype),
        last_block="encoder.layer.1.",
        scopes=("all", "last:1", "last:2", "attn", "!re:.*bias,all"),
        fd_batches=(1, 4),
        cls_token_config=None,  # <s> is an input token, not a parameter
        own_output=lambda m, out: out.last_hidden_state,
    ),
]


def params(*fields: str) -> list:
    """pytest params ``(case, *values)``: every case with every combination of its ``fields`` (a field holds a
    tuple of values or one value; ``None`` leaves the case out)."""
    out = []
    for c in CASES:
        values = [v if isinstance(v, tuple) else (v,) for v in (getattr(c, f) for f in fields)]
        out += [pytest.param(c, *vs, id="-".join(map(str, (c.name, *vs)))) for vs in itertools.product(*values)
                if None not in vs]
    return out


@pytest.fixture()
def case(request) -> Iterator[FamilyCase]:
    """The family case of an (indirect) parametrization, with its setup active for the test."""
    with request.param.setup():
        yield request.param


@pytest.mark.parametrize("case, config, scope", params("configs", "scopes"), indirect=["case"])
def test_matches_reference(case, config, scope):
    m = case.build(config)
    tm = tangent_model(m, scope)
    args, kw = example_inputs(m)
    check_against_reference(tm, *args, **kw)
    assert tm.fallback_modules == []


@pytest.mark.parametrize("case, batch", params("fd_batches"), indirect=["case"])
def test_finite_difference(case, batch):
    m = case.build(case.fd_config)
    tm = tangent_model(m, "all")
    args, kw = example_inputs(m, batch)
    check_finite_difference(tm, *args, **kw)


@pytest.mark.parametrize("case, config", params("configs"), indirect=["case"])
def test_zero_delta_is_exact_primal(case, config):
    m = case.build(config)
    tm = TangentModel(m, "all")
    args, kw = example_inputs(m, 2)
    f0, t = tm.forward_parts(*args, **kw)
    assert torch.count_nonzero(t) == 0
    assert torch.equal(tm(*args, **kw), f0)
    with case.own_forward(), torch.no_grad():
        y = case.own_output(m, m(*args, **kw))
    assert max_rel_err(f0.detach(), y) <= 1e-12


@pytest.mark.parametrize("case, config", params("float32_configs"), indirect=["case"])
def test_float32(case, config):
    m = case.build(config, dtype=torch.float32)
    tm = tangent_model(m, "all", 1e-2)
    args, kw = example_inputs(m, 2)
    check_against_reference(tm, *args, dtype=torch.float32, **kw)


@pytest.mark.parametrize("case, config", params("cls_configs"), indirect=["case"])
def test_linearize_cls_matches_fallback(case, config):
    m = case.build(config)
    args, kw = example_inputs(m)
    tm = tangent_model(m, "last:1", linearize_cls=True)
    f0, t = tm.forward_parts(*args, **kw)
    assert tm.fallback_modules == []
    ref = tangent_model(m, "last:1", linearize_cls=True, force_fallback=True)
    f0r, tr = ref.forward_parts(*args, **kw)
    assert ref.fallback_modules  # the reference really ran the jvp fallback
    assert_close(f0.detach(), f0r.detach(), what="primal")
    assert_close(t.detach(), tr.detach(), what="tangent")


@pytest.mark.parametrize("case, config", params("cls_token_config"), indirect=["case"])
def test_cls_init_is_the_embedded_cls_token(case, config):
    m = case.build(config)
    fam = family_for(m)
    (x,), _ = example_inputs(m, 1)
    ctx = TangentContext(dict(m.named_parameters()), {}, vjp=False)
    with torch.no_grad():
        h = fam.run_stage(ctx, 0, fam.prepare(x)).h.primal
    assert_close(fam.cls_init(), h[0, 0], what="cls")


@pytest.mark.parametrize("case, config", params("reinit_configs"), indirect=["case"])
def test_reinit_matches_reference(case, config):
    m = case.build(config)
    tm = TangentModel(m, "last:1", reinit=True)
    w0 = tm.base_params()
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, w0[n])}
    assert any(n.startswith(case.last_block) or f".{case.last_block}" in n for n in changed), (
        "reinit left the block unchanged")
    assert set(case.reinit_changes) <= changed
    randomize_delta(tm, 0.1)
    args, kw = example_inputs(m)
    check_against_reference(tm, *args, **kw)
    assert tm.fallback_modules == []


@pytest.mark.parametrize("case", params(), indirect=True)
def test_vjp_gradient(case):
    """backward='vjp' gives Jᵀg of the model at w0."""
    m = case.build(case.vjp_config)
    args, kw = example_inputs(m, 2)
    tm = tangent_model(m, "all")
    y = tm(*args, **kw)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    grads = torch.autograd.grad((y * g).sum(), list(tm.delta_dict().values()))
    ref = reference_vjp(tm, g, *args, **kw)
    # one scale for all (the key bias has an exactly-zero gradient: softmax ignores a per-row constant)
    assert_close(torch.cat([a.flatten() for a in grads]), torch.cat([ref[n].flatten() for n in tm.linearized]),
                 what="vjp gradient")


@pytest.mark.parametrize("case", params(), indirect=True)
def test_nonlinear_mode(case):
    """linear=False is f(w0 + Δ) through the same stages."""
    m = case.build(case.vjp_config)
    args, kw = example_inputs(m, 2)
    nl = tangent_model(m, "last:1", linear=False)
    w = nl.base_params()
    for n, d in nl.delta_dict().items():
        w[n] = w[n] + d.detach()
    with torch.no_grad():
        expected = nl.family.select_output(torch.func.functional_call(m, w, args, kw))
    assert_close(nl(*args, **kw).detach(), expected, what="non-linear")


@pytest.mark.parametrize("case", params(), indirect=["case"])
def test_scope_presets(case):
    """``bias`` (BitFit), ``norm`` and ``attn+bias`` select what they name in every family, and are exact."""
    m = case.build("default")
    names = [n for n, _ in m.named_parameters()]
    ln_modules = [n for n, mod in m.named_modules() if isinstance(mod, nn.LayerNorm) and n]
    bias = TangentModel(m, "bias").linearized
    assert bias and all(n.endswith("bias") for n in bias)
    norm = TangentModel(m, "norm").linearized
    assert norm and all(any(n.startswith(p + ".") for p in ln_modules) for n in norm)
    assert {n for n in names if any(n.startswith(p + ".") for p in ln_modules)} >= set(norm)
    attn = set(TangentModel(m, "attn").linearized)
    tm = tangent_model(m, "attn+bias")
    extra = set(tm.linearized) - attn
    assert set(tm.linearized) >= attn and extra and all(n.endswith("bias") for n in extra)
    args, kw = example_inputs(m)
    check_against_reference(tm, *args, **kw)
