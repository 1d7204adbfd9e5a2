"""nn.Conv2d rule (``ẏ = conv(ẋ, W) + conv(x, Ẇ) + ḃ``), patch embeddings and a general conv, vs torch.func.jvp."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from taft.engine.dual import Dual
from tests.rules import _rule_harness as rh

NAME = "patch_embed.proj"
LAYOUTS = ("contiguous", "channels_last", "strided")


def make_input(shape, g, dtype, layout):
    if layout == "channels_last":
        x = rh.rand(shape, g, dtype).contiguous(memory_format=torch.channels_last)
    else:
        x = rh.rand(shape, g, dtype, layout if layout == "contiguous" else "strided")
    return x


@st.composite
def patch_case(draw):
    b, c_in, c_out = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 6))
    patch, gh, gw = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return b, c_in, c_out, patch, gh, gw


def make_patch_embed(c_in, c_out, patch, bias, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(c_in, c_out, kernel_size=patch, stride=patch, bias=bias).to(dtype)


@pytest.mark.parametrize("case", ["input", "param", "both"])
@pytest.mark.parametrize("dtype", rh.DTYPES)
@rh.RULE_SETTINGS
@given(shape=patch_case(), bias=st.booleans(), which=st.sampled_from([("weight",), ("bias",), ("weight", "bias")]),
       layout=st.sampled_from(LAYOUTS), seed=rh.SEEDS)
def test_patch_embed_matches_jvp(case, dtype, shape, bias, which, layout, seed):
    b, c_in, c_out, patch, gh, gw = shape
    g = rh.gen(seed)
    conv = make_patch_embed(c_in, c_out, patch, bias, dtype, seed)
    x = make_input((b, c_in, patch * gh, patch * gw), g, dtype, layout)
    params = rh.module_params(conv, NAME)
    if not bias:
        which = ("weight",)
    deltas = rh.make_deltas(params, which, g) if case in ("param", "both") else {}
    xdot = make_input(x.shape, g, dtype, layout) if case in ("input", "both") else None
    out, _ = rh.check_rule(conv, NAME, params, deltas, x, xdot)
    assert out.primal.shape == (b, c_out, gh, gw)


@rh.RULE_SETTINGS
@given(shape=patch_case(), bias=st.booleans(), layout=st.sampled_from(LAYOUTS), seed=rh.SEEDS)
def test_patch_embed_no_tangent(shape, bias, layout, seed):
    b, c_in, c_out, patch, gh, gw = shape
    g = rh.gen(seed)
    conv = make_patch_embed(c_in, c_out, patch, bias, seed=seed)
    x = make_input((b, c_in, patch * gh, patch * gw), g, torch.float64, layout)
    params = rh.module_params(conv, NAME)
    rh.check_rule_no_tangent(conv, NAME, params, x, exact=False)


@rh.RULE_SETTINGS
@given(shape=patch_case(), bias=st.booleans(), seed=rh.SEEDS)
def test_patch_embed_finite_difference(shape, bias, seed):
    b, c_in, c_out, patch, gh, gw = shape
    g = rh.gen(seed)
    conv = make_patch_embed(c_in, c_out, patch, bias, seed=seed)
    x = rh.rand((b, c_in, patch * gh, patch * gw), g)
    rh.check_full_finite_difference(conv, NAME, x, g)


@pytest.mark.parametrize("dtype", rh.DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "kw",
    [dict(kernel_size=3, padding=1), dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),
     dict(kernel_size=3, padding="same"), dict(kernel_size=1, groups=2)],
    ids=["pad1", "asym", "same", "groups"],
)
def test_general_conv_matches_jvp(dtype, bias, kw):
    """The rule forwards stride/padding/dilation/groups unchanged, so it is not patch-embedding only."""
    g = rh.gen(51)
    torch.manual_seed(51)
    conv = nn.Conv2d(4, 6, bias=bias, **kw).to(dtype)
    x = rh.rand((2, 4, 7, 6), g, dtype)
    params = rh.module_params(conv, NAME)
    deltas = rh.make_deltas(params, ["weight", "bias"] if bias else ["weight"], g)
    _, ty = rh.check_rule(conv, NAME, params, deltas, x, rh.rand(x.shape, g, dtype))
    assert ty.abs().max() > 0.1


def test_patch_embed_bias_only_tangent_is_constant_per_channel():
    g = rh.gen(52)
    conv = make_patch_embed(3, 4, 2, True, seed=52)
    x = rh.rand((2, 3, 6, 4), g)
    params = rh.module_params(conv, NAME)
    deltas = rh.make_deltas(params, ["bias"], g)
    out = rh.run_rule(conv, NAME, params, deltas, Dual(x, None))
    assert out.tangent.shape == (2, 4, 3, 2)
    assert torch.equal(out.tangent, deltas[f"{NAME}.bias"][:, None, None].expand(2, 4, 3, 2))


def test_patch_embed_concrete_and_reference_nonzero():
    """One 2×2 patch, W = 1, b = 0: y = Σx, ẏ = Σẋ + Σ(x·Ẇ)."""
    conv = make_patch_embed(1, 1, 2, True)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.zero_()
    params = rh.module_params(conv, NAME)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    xdot = torch.tensor([[[[0.5, 0.0], [0.0, 0.5]]]], dtype=torch.float64)
    dw = torch.tensor([[[[1.0, 0.0], [0.0, -1.0]]]], dtype=torch.float64)
    deltas = {f"{NAME}.weight": dw, f"{NAME}.bias": torch.tensor([10.0], dtype=torch.float64)}
    out = rh.run_rule(conv, NAME, params, deltas, Dual(x, xdot))
    assert out.primal.item() == 10.0
    assert out.tangent.item() == 1.0 + (1.0 - 4.0) + 10.0
    _, ty = rh.check_rule(conv, NAME, params, deltas, x, xdot)
    assert ty.abs().max() > 0


def test_batch1_single_patch_non_contiguous():
    rh.check_non_contiguous(make_patch_embed(3, 5, 4, True, seed=53), NAME, (1, 3, 4, 4), seed=53)


def test_non_zero_padding_mode_not_supported():
    conv = nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect").double()
    params = rh.module_params(conv, NAME)
    x = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(NotImplementedError):
        rh.run_rule(conv, NAME, params, {}, Dual(x, x))
