"""Fast clipping (ghost norms + book-keeping) equals the per-example-gradient reference: per layer type, per scope,
tangent and non-linear, in float64; and a private run with it equals one with the reference."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from taft.checkpoint import read_delta
from taft.engine.record import recording
from taft.privacy import fit as private_fit
from taft.privacy.ghost import Recorder, clipped_sum
from taft.privacy.grad_sample import per_example_grads
from taft.privacy.optimizer import clip_and_sum, per_example_norms
from taft.train.loop import train
from taft.train.losses import make_loss

from .test_dpsgd import N, _cache, _model
from .test_private_runs import _cfg
from .test_private_runs import data as data  # noqa: F401 (the fixture)

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def _rel(got: dict, want: dict) -> float:
    """Largest error over all tensors relative to the largest entry (BERT's key bias has an exact gradient of 0,
    so a per-tensor relative error would compare rounding noise with rounding noise)."""
    scale = max(float(w.abs().max()) for w in want.values())
    return max(float((got[n] - want[n]).abs().max()) for n in want) / scale


@pytest.mark.parametrize("linear", [True, False], ids=["tangent", "nonlinear"])
@pytest.mark.parametrize("scope", ["last:1", "last:2", "bias", "norm", "head", "attn", "all"])
@pytest.mark.parametrize("loss", ["rsl", "ce"])
@pytest.mark.parametrize("clip", [0.05, 1e6])  # every example clipped / none clipped
def test_clipped_sum_equals_per_example_reference_float64(scope, linear, loss, clip):
    torch.manual_seed(0)
    tm = _model(scope, linear)  # float64 (jittered w0, random Δw)
    cache = _cache(tm)
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    loss_fn = make_loss(loss)
    state = cache.collate(range(N))
    ref = per_example_grads(tm, state, labels, loss_fn)
    got, norms = clipped_sum(tm, state, labels, loss_fn, clip=clip)
    assert set(got) == set(ref)
    assert _rel(got, clip_and_sum(ref, clip)) < 1e-12
    assert torch.allclose(norms, per_example_norms(ref), rtol=1e-12, atol=0)
    for n, d in tm.delta_dict().items():
        assert d.grad is None, f"{n}: fast clipping left a gradient on Δw"


def test_the_fast_path_is_taken_where_it_applies():
    """Linear/LayerNorm scopes are recorded completely (no per-example gradients); embeddings are not."""
    for scope, expect in (("last:1", True), ("bias", True), ("norm", True), ("all", False)):
        tm = _model(scope, True)
        rec = Recorder(tm.linearized)
        with torch.enable_grad(), recording(rec):
            tm.suffix(_cache(tm).collate(range(N)))
        assert rec.covered() == expect, scope


def _check_recorded_layer(layer: nn.Module, x: torch.Tensor, record) -> None:
    """``record(rec, y)`` hands ``layer``'s output to a recorder; its per-example squared norms and weighted sum
    must equal those of gradients taken one example at a time (float64)."""
    torch.manual_seed(3)
    target = torch.randn_like(layer(x))
    rec = Recorder(["weight", "bias"])
    y = layer(x)
    record(rec, y)
    params = [layer.weight, layer.bias]
    per_example = [torch.autograd.grad(((layer(x[i]) - target[i]) ** 2).sum(), params) for i in range(len(x))]
    rec.backward(((y - target) ** 2).sum())
    want_sq = torch.stack([gw.pow(2).sum() + gb.pow(2).sum() for gw, gb in per_example])
    assert torch.allclose(rec.sq_norms(), want_sq, rtol=1e-12)
    f = torch.rand(len(x), dtype=torch.float64)
    out = rec.clipped_sum(f)
    for k, n in enumerate(("weight", "bias")):
        assert torch.allclose(out[n], sum(f[i] * per_example[i][k] for i in range(len(x))), rtol=1e-12), n


@pytest.mark.parametrize("rows", [3, 40])  # T² ≤ d_in·d_out: ghost norm; T² > d_in·d_out: per-example matrices
def test_linear_rule_norms_and_sum(rows):
    torch.manual_seed(1)
    lin = nn.Linear(5, 4).double()
    x = torch.randn(6, rows, 5, dtype=torch.float64)
    _check_recorded_layer(lin, x, lambda rec, y: rec.linear("weight", "bias", x, y))


def test_layer_norm_rule_norms_and_sum():
    torch.manual_seed(2)
    ln = nn.LayerNorm(7).double()
    with torch.no_grad():
        ln.weight.add_(torch.randn(7, dtype=torch.float64))
    x = torch.randn(5, 3, 7, dtype=torch.float64)
    _check_recorded_layer(ln, x, lambda rec, y: rec.layer_norm("weight", "bias", x, ln.eps, y))


@pytest.mark.parametrize("method", ["taft", "nlft"])
def test_private_run_with_fast_clipping_equals_the_reference(data, monkeypatch, method):  # noqa: F811
    out = data[0].parent
    cfg = _cfg(data, method=method, head_init="zeros", epochs=2, threads=1, output_dir=str(out / "fast"))
    fast = train(cfg, progress=False)
    real = private_fit.fit_private

    def reference(*args, **kwargs):
        return real(*args, **{**kwargs, "clipping": "per-example"})

    monkeypatch.setattr(private_fit, "fit_private", reference)
    ref = train(dataclasses.replace(cfg, output_dir=str(out / "ref")), progress=False)
    assert json.dumps(fast.privacy, sort_keys=True) == json.dumps(ref.privacy, sort_keys=True)
    a, b = read_delta(out / "fast" / "delta.safetensors")[0], read_delta(out / "ref" / "delta.safetensors")[0]
    scale = max(float(t.abs().max()) for t in b.values())
    assert scale > 0 and max(float((a[n] - b[n]).abs().max()) for n in b) < 1e-5 * scale
