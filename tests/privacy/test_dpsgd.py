"""DP-SGD on Δw: per-example gradients, clipping, noise and the private step against the ordinary one."""

from __future__ import annotations

import math

import pytest
import torch

from taft.models.classifier import Classifier
from taft.privacy.grad_sample import per_example_grads
from taft.privacy.optimizer import DPOptimizer, clip_and_sum, gaussian_noise, per_example_norms
from taft.tangent_model import TangentModel
from taft.train.cache import FeatureCache
from taft.train.losses import make_loss
from taft.zoo import tiny_bert
from tests.helpers import assert_close, jitter_params, randomize_delta

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

N, C = 6, 3


def _cache(tm) -> FeatureCache:
    """Prefix features of N padded token sequences of different lengths (float64)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1000, (N, 9), generator=g)
    mask = torch.ones(N, 9, dtype=torch.long)
    for b in range(N):
        mask[b, 9 - 2 * (b % 4):] = 0  # lengths 9, 7, 5, 3, 9, 7
    ids = ids.masked_fill(mask == 0, 0)
    return FeatureCache.build(tm, [(list(range(N)), (ids,), {"attention_mask": mask})], N, progress=False)


def _model(scope: str, linear: bool) -> TangentModel:
    clf = Classifier(tiny_bert(seed=0), C, pooling="mean", normalize=True)
    jitter_params(clf, 2)
    tm = TangentModel(clf, scope, linear=linear).eval()
    randomize_delta(tm, 0.05)
    return tm


@pytest.fixture(params=[("last:1", True), ("last:1", False), ("bias", True), ("head", False)],
                ids=["tangent-last1", "nonlinear-last1", "tangent-bias", "nonlinear-head"])
def setup(request):
    scope, linear = request.param
    tm = _model(scope, linear)
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    return tm, _cache(tm), labels


@pytest.mark.parametrize("loss", ["rsl", "ce"])
def test_per_example_grads_equal_one_at_a_time(setup, loss):
    tm, cache, labels = setup
    loss_fn = make_loss(loss)
    grads = per_example_grads(tm, cache.collate(range(N)), labels, loss_fn)
    for i in range(N):
        tm.zero_grad()
        loss_fn(tm.suffix(cache.collate([i])), labels[i : i + 1]).backward()  # example i alone, unpadded
        # one flat vector: some entries are exactly zero in theory (key biases under softmax), so the error is
        # relative to the largest entry of the whole gradient
        flat = torch.cat([grads[n][i].flatten() for n in tm.linearized])
        ref = torch.cat([d.grad.flatten() for d in tm.delta_dict().values()])
        assert_close(flat, ref, what=f"example {i} ({'tangent' if tm.linear else 'non-linear'})")
    assert min(per_example_norms(grads)) > 1e-4, "zero gradients: the comparison would be vacuous"


def test_tangent_and_nonlinear_grads_differ_away_from_w0():
    """The tangent per-example gradient is J(w0)ᵀ∇ℓ at the tangent output, not the non-linear one at w0 + Δ."""
    lin, non = _model("last:1", True), _model("last:1", False)
    cache, labels = _cache(lin), torch.tensor([0, 1, 2, 1, 0, 2])
    a = per_example_grads(lin, cache.collate(range(N)), labels, make_loss("rsl"))
    b = per_example_grads(non, cache.collate(range(N)), labels, make_loss("rsl"))
    diff = max((a[n] - b[n]).abs().max().item() for n in a)
    assert diff > 1e-6


def test_clipping_bounds_every_norm():
    g = torch.Generator().manual_seed(0)
    scale = torch.logspace(-3, 2, 50, dtype=torch.float64)  # norms from ~1e-3 to ~1e3
    grads = {"a": torch.randn(50, 4, 3, generator=g, dtype=torch.float64) * scale[:, None, None],
             "b": torch.randn(50, 7, generator=g, dtype=torch.float64) * scale[:, None]}
    clip = 1.5
    norms = per_example_norms(grads)
    assert (norms > clip).sum() > 10 and (norms < clip).sum() > 10  # both sides of the bound are exercised
    for i in range(50):
        one = clip_and_sum({n: v[i : i + 1] for n, v in grads.items()}, clip)
        norm = math.sqrt(sum(v.pow(2).sum().item() for v in one.values()))
        assert norm <= clip * (1 + 1e-12)
        if norms[i] < clip:  # below the bound: untouched
            assert abs(norm - norms[i].item()) <= 1e-5 * norms[i].item()


def test_noise_norm_is_within_15_percent_of_expectation():
    like = {"w": torch.zeros(300, 100), "b": torch.zeros(1000)}
    d = 31_000
    sigma, clip = 1.3, 0.7
    opt = DPOptimizer(torch.optim.SGD([torch.zeros(1)], lr=1.0), like, clip=clip, noise_multiplier=sigma,
                      expected_batch_size=1, generator=torch.Generator().manual_seed(0))
    noise = opt.noisy_gradient()  # nothing accumulated: a zero gradient plus noise
    norm = math.sqrt(sum(v.pow(2).sum().item() for v in noise.values()))
    expected = sigma * clip * math.sqrt(d)
    assert abs(norm - expected) <= 0.15 * expected, (norm, expected)
    assert gaussian_noise(like, 0.0, None)["w"].abs().max() == 0


@pytest.mark.parametrize("linear", [True, False], ids=["tangent", "nonlinear"])
@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_noiseless_unclipped_private_step_equals_the_ordinary_step(linear, optim):
    """σ = 0 and C = 1e20, a batch of exactly the expected size: DP-SGD is plain mini-batch training."""
    make = (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)) if optim == "sgd" else (
        lambda ps: torch.optim.Adam(ps, lr=1e-2))
    loss_fn, labels = make_loss("rsl"), torch.tensor([0, 1, 2, 1, 0, 2])
    # key biases have an exactly-zero gradient (softmax is shift-invariant): Adam would rescale round-off to steps
    scope = "last:1,!re:.*key\\.bias"
    plain, private = _model(scope, linear), _model(scope, linear)
    cache = _cache(plain)
    state = cache.collate(range(N))
    opt_plain = make(list(plain.delta_dict().values()))
    dp = DPOptimizer(make(list(private.delta_dict().values())), private.delta_dict(), clip=1e20, noise_multiplier=0.0,
                     expected_batch_size=N)
    for _ in range(3):
        opt_plain.zero_grad()
        loss_fn(plain.suffix(state), labels).backward()
        opt_plain.step()
        dp.accumulate(per_example_grads(private, cache.collate(range(4)), labels[:4], loss_fn))  # two micro-batches
        dp.accumulate(per_example_grads(private, cache.collate(range(4, N)), labels[4:], loss_fn))
        dp.step()
        dp.zero_grad()
    moved = 0.0
    for n, d in plain.delta_dict().items():
        assert_close(private.delta_dict()[n].detach(), d.detach(), what=f"Δw {n}")
        moved = max(moved, (d.detach() - _model(scope, linear).delta_dict()[n]).abs().max().item())
    assert moved > 1e-4, "the steps did not move Δw: the comparison would be vacuous"


def test_empty_batch_is_a_step_on_noise_alone():
    like = {"w": torch.zeros(5, dtype=torch.float64)}
    p = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = DPOptimizer(torch.optim.SGD([p], lr=1.0), {"w": p}, clip=2.0, noise_multiplier=0.5, expected_batch_size=4,
                      generator=torch.Generator().manual_seed(3))
    opt.step()
    expected = gaussian_noise(like, 0.5 * 2.0, torch.Generator().manual_seed(3))["w"] / 4
    assert torch.allclose(p.detach(), -expected, rtol=0, atol=1e-15)
    assert p.detach().abs().max() > 0


@pytest.mark.parametrize("options", [{"reinit": True}, {"linearize_cls": True}], ids=["reinit", "cls"])
def test_tangent_per_example_grads_keep_reinit_and_cls_token(options):
    """The tangent path takes J(w0)ᵀ from a non-linear twin: its w0 must be the re-initialized block / fresh CLS."""
    clf = jitter_params(Classifier(tiny_bert(seed=0), C, pooling="mean", normalize=True), 2)
    tm = TangentModel(clf, "last:1", seed=5, **options).eval()
    randomize_delta(tm, 0.05)
    cache, labels, loss_fn = _cache(tm), torch.tensor([0, 1, 2, 1, 0, 2]), make_loss("rsl")
    grads = per_example_grads(tm, cache.collate(range(N)), labels, loss_fn)
    for i in (0, 3):
        tm.zero_grad()
        loss_fn(tm.suffix(cache.collate([i])), labels[i : i + 1]).backward()
        flat = torch.cat([grads[n][i].flatten() for n in tm.linearized])
        ref = torch.cat([d.grad.flatten() for d in tm.delta_dict().values()])
        assert_close(flat, ref, what=f"example {i} ({options})")
