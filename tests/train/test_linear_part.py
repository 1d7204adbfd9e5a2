"""Predictions from the linearized part only (``prediction=linear-part``): the output is J(x; w0)·Δw alone, its
gradients, private clipping and composition stay exact, and a run keeps the setting through save and eval."""

from __future__ import annotations

import json

import pytest
import torch

from taft.cli import main
from taft.config import ConfigError, TrainConfig
from taft.delta import weighted_average
from taft.models.classifier import Classifier
from taft.privacy.ghost import clipped_sum
from taft.privacy.grad_sample import per_example_grads
from taft.privacy.optimizer import clip_and_sum
from taft.tangent_model import TangentModel
from taft.train.loop import train
from taft.train.losses import make_loss
from taft.zoo import tiny_bert
from tests.helpers import jitter_params, randomize_delta
from tests.privacy.test_dpsgd import N, _cache
from tests.privacy.test_private_runs import _cfg
from tests.privacy.test_private_runs import data as data  # noqa: F401 (the fixture)

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def _tm(output: str, backward: str = "vjp", scope: str = "last:1") -> TangentModel:
    clf = Classifier(tiny_bert(seed=0), 3, pooling="mean", normalize=True).double()
    jitter_params(clf, 2)
    tm = TangentModel(clf, scope, output=output, backward=backward).eval()
    randomize_delta(tm, 0.05)
    return tm


def test_output_is_the_jvp_alone_float64():
    tm = _tm("linear-part")
    state = _cache(tm).collate(range(N))
    f0, t = tm.suffix_parts(state)
    assert f0.abs().max() > 0.1  # the dropped term is not zero: the test could fail
    assert torch.equal(tm.suffix(state), t)
    full = _tm("full")
    full.load_delta(tm.delta_dict())
    assert torch.allclose(full.suffix(state) - f0, tm.suffix(state), rtol=0, atol=1e-13)


@pytest.mark.parametrize("scope", ["last:1", "bias", "head"])
def test_gradients_equal_the_tangent_reference_float64(scope):
    """The VJP backward through the plain network at w0 gives ∂ℓ(J·Δw)/∂Δw of the tangent pass itself."""
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    grads = {}
    for backward in ("vjp", "tangent"):
        torch.manual_seed(0)
        tm = _tm("linear-part", backward, scope)
        make_loss("ce")(tm.suffix(_cache(tm).collate(range(N))), labels).backward()
        grads[backward] = {n: p.grad for n, p in tm.delta.items()}
    for n, g in grads["tangent"].items():
        assert torch.allclose(grads["vjp"][n], g, rtol=1e-10, atol=1e-14), n


@pytest.mark.parametrize("clip", [0.05, 1e6])
def test_fast_clipping_equals_the_per_example_reference(clip):
    tm = _tm("linear-part")
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    state = _cache(tm).collate(range(N))
    loss = make_loss("ce")
    ref = per_example_grads(tm, state, labels, loss)
    got, _ = clipped_sum(tm, state, labels, loss, clip=clip)
    want = clip_and_sum(ref, clip)
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-10, atol=1e-14), n
    # and the per-example gradients are those of the linear part, not of f(x; w0) + J·Δw
    full = _tm("full")
    full.load_delta(tm.delta_dict())
    ref_full = per_example_grads(full, state, labels, loss)
    assert any(not torch.allclose(ref[n], ref_full[n]) for n in ref)


def test_composition_is_the_ensemble_float64():
    tms = [_tm("linear-part") for _ in range(3)]
    for i, tm in enumerate(tms):
        torch.manual_seed(10 + i)
        randomize_delta(tm, 0.05)
    state = _cache(tms[0]).collate(range(N))
    weights = [1.0, 2.0, 3.0]
    outs = [tm.suffix(state) for tm in tms]
    ensemble = sum(w * o for w, o in zip(weights, outs, strict=True)) / sum(weights)
    tms[0].load_delta(weighted_average([tm.delta_dict() for tm in tms], weights))
    assert torch.allclose(tms[0].suffix(state), ensemble, rtol=0, atol=1e-12)


def test_refused_where_there_is_no_linear_part():
    with pytest.raises(ConfigError, match="only a tangent model"):
        TrainConfig(model="tiny-bert", data="x", method="nlft", prediction="linear-part")
    with pytest.raises(ConfigError, match="prediction='both' is not valid"):
        TrainConfig(model="tiny-bert", data="x", prediction="both")
    clf = Classifier(tiny_bert(seed=0), 3)
    with pytest.raises(ValueError, match="only a tangent model"):
        TangentModel(clf, "last:1", linear=False, output="linear-part")


def test_a_private_run_keeps_the_setting_through_save_and_eval(data, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "r"
    r = train(_cfg(data, prediction="linear-part", output_dir=str(out)), progress=False)
    assert "prediction: linear-part" in (out / "config.yaml").read_text()
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == r.test_acc
    full = train(_cfg(data), progress=False)  # the same run predicting with f(x; w0) + J·Δw differs
    assert full.epochs[-1]["delta_norm"] != r.epochs[-1]["delta_norm"]
