"""The multi-task suite on a tiny BERT (float64): α = 0, linearity in tangent space, origin checks, the α search
never reading test, and normalized accuracy by hand."""

from __future__ import annotations

import pytest
import torch

from taft.arithmetic import (
    MultiTaskSuite,
    TaskVector,
    TaskVectorError,
    choose_addition_alpha,
    choose_negation_alpha,
    combine,
    normalized_accuracy,
    task_addition,
    task_negation,
    tune,
)
from taft.data.examples import DatasetSplits, TextDataset, TextExample
from taft.errors import TaftError
from taft.zoo import load_tokenizer, tiny_bert

WORDS = ["good", "bad", "movie", "plot", "who", "where", "when", "great", "awful", "fine", "film", "city"]


def _dataset(name: str, n: int, classes: int, seed: int) -> TextDataset:
    g = torch.Generator().manual_seed(seed)
    ex = []
    for i in range(n):
        k = int(torch.randint(3, 9, (1,), generator=g))
        words = [WORDS[int(j)] for j in torch.randint(len(WORDS), (k,), generator=g)]
        ex.append(TextExample(f"{name}-{seed}-{i}", " ".join(words), i % classes))
    return TextDataset(name, ex, classes)


class Untouchable:
    """A test split that fails the moment anything reads it."""

    def __getattr__(self, name):
        raise AssertionError(f"the test split was read ({name})")

    def __len__(self):
        raise AssertionError("the test split was read (len)")


def _suite(test_split: bool = True) -> MultiTaskSuite:
    splits = {
        t: DatasetSplits(_dataset(t, 24, c, 3 * i), _dataset(t, 12, c, 3 * i + 1),
                         _dataset(t, 12, c, 3 * i + 2) if test_split else Untouchable())
        for i, (t, c) in enumerate((("pos", 2), ("qtype", 3)))
    }
    desc = {"pos": ["bad", "good"], "qtype": ["who", "where", "when"]}
    return MultiTaskSuite(tiny_bert().double(), load_tokenizer("tiny-bert"), splits, desc, max_length=16,
                          batch_size=8, eval_batch_size=5)


@pytest.fixture(scope="module")
def suite() -> MultiTaskSuite:
    return _suite()


@pytest.fixture(scope="module")
def vectors(suite) -> dict[str, list[TaskVector]]:
    torch.manual_seed(0)
    return {m: [suite.finetune(t, m, lr=3e-3, epochs=1).vector for t in suite.tasks]
            for m in ("nonlinear", "ntk", "linear-layers")}


@pytest.mark.parametrize("mode", ["nonlinear", "ntk", "linear-layers"])
def test_alpha_zero_gives_base_exactly(suite, vectors, mode):
    tm = suite.tangent_model(mode)
    cache, _ = suite.data("pos", "val", tm)
    state = cache.collate(list(range(len(cache))))
    base = tm.suffix(state).detach()
    tm.load_delta(combine(vectors[mode], 0.0))
    try:
        assert torch.equal(tm.suffix(state).detach(), base)
    finally:
        tm.load_delta(combine(vectors[mode], 0.0))
    # and the wrapper at Δw = 0 is the plain encoder (float64)
    ids = suite.tokenizer(["good movie", "who is where"], padding=True, return_tensors="pt")
    plain = suite.encoder(ids["input_ids"], attention_mask=ids["attention_mask"])
    assert (tm(ids["input_ids"], attention_mask=ids["attention_mask"]) - plain).abs().max() < 1e-12


def test_vectors_change_the_model(suite, vectors):
    z0 = suite.outputs("nonlinear", "pos", "val")
    z1 = suite.outputs("nonlinear", "pos", "val", vectors["nonlinear"][:1], [1.0])
    assert (z1 - z0).abs().max() > 1e-6


@pytest.mark.parametrize("mode", ["ntk", "nonlinear"])
def test_memoized_tangent_outputs_equal_a_direct_pass(suite, vectors, mode):
    """Σ cᵢ(J·τᵢ) from memoized passes = one pass with Δw = Σ cᵢτᵢ (tangent space is linear in Δw)."""
    vs, coefs = vectors[mode], [0.7, -1.3]
    got = suite.outputs(mode, "qtype", "val", vs, coefs)
    tm = suite.tangent_model(mode)
    cache, _ = suite.data("qtype", "val", tm)
    tm.load_delta(combine(vs, coefs))
    try:
        with torch.no_grad():
            want = torch.cat([tm.suffix(cache.collate([i])) for i in range(len(cache))])
    finally:
        tm.load_delta(combine(vs, 0.0))
    assert (got - want).abs().max() < 1e-10


def test_other_base_and_mode_refused(suite, vectors):
    v = vectors["nonlinear"][0]
    alien = TaskVector(v.tensors, v.mode, "0" * 64, v.task)
    with pytest.raises(TaskVectorError, match="another base"):
        suite.outputs("nonlinear", "pos", "val", [alien], [1.0])
    with pytest.raises(TaskVectorError, match="cannot be applied"):
        suite.outputs("ntk", "pos", "val", [v], [1.0])  # a weight-space vector in tangent space
    with pytest.raises(TaskVectorError, match="different spaces"):
        task_addition(suite, [vectors["nonlinear"][0], vectors["ntk"][1]], alphas=[0.0, 1.0])


def test_normalized_accuracy_by_hand():
    merged, single = {"a": 0.6, "b": 0.45}, {"a": 0.8, "b": 0.9}
    assert normalized_accuracy(merged, single) == pytest.approx({"a": 0.75, "b": 0.5}, abs=1e-15)
    with pytest.raises(TaskVectorError):
        normalized_accuracy({"c": 0.5}, single)


def test_addition_result_normalization_matches_hand(suite, vectors):
    res = task_addition(suite, vectors["linear-layers"], alphas=[0.0, 0.5, 1.0])
    for t in res.tasks:
        assert res.test_normalized[t] == pytest.approx(res.test_abs[t] / res.single_test[t], abs=1e-15)
        # the single-task accuracy is the fine-tuned model on its own task, counted by hand
        v = next(x for x in vectors["linear-layers"] if x.task == t)
        z = suite.outputs("linear-layers", t, "test", [v], [1.0])
        y = suite.labels("linear-layers", t, "test")
        correct = sum(int(p == q) for p, q in zip(suite.logits(z, t).argmax(-1).tolist(), y.tolist(), strict=True))
        assert res.single_test[t] == correct / len(y)
    assert res.alpha == choose_addition_alpha(res.val_by_alpha, res.single_val)


def test_selection_rules_by_hand():
    val = {0.0: {"a": 0.5, "b": 0.5}, 0.5: {"a": 0.8, "b": 0.6}, 1.0: {"a": 0.9, "b": 0.3}}
    # normalized means: 0 → (0.5/0.9 + 0.5/0.6)/2 = 0.694; 0.5 → (0.889 + 1.0)/2 = 0.944; 1 → (1 + 0.5)/2 = 0.75
    assert choose_addition_alpha(val, {"a": 0.9, "b": 0.6}) == 0.5
    target = {0.0: 0.9, 0.5: 0.4, 1.0: 0.1}
    control = {0.0: 0.8, 0.5: 0.78, 1.0: 0.5}
    assert choose_negation_alpha(target, control, control_zero_shot=0.8, threshold=0.95) == 0.5
    assert choose_negation_alpha(target, control, control_zero_shot=0.8, threshold=0.5) == 1.0
    assert choose_negation_alpha(target, {a: 0.0 for a in control}, control_zero_shot=0.8) == 0.0


def test_alpha_search_never_reads_test(vectors):
    blind = _suite(test_split=False)
    # the same encoder, so the vectors fit; a rebuilt suite has the same fingerprint
    vs = vectors["ntk"]
    res = task_addition(blind, vs, alphas=[0.0, 0.5, 1.0], evaluate_test=False)
    assert res.test_abs is None and res.alpha in (0.0, 0.5, 1.0)
    neg = task_negation(blind, vs[0], "qtype", alphas=[0.0, 0.5, 1.0], evaluate_test=False)
    assert neg.test is None
    with pytest.raises(AssertionError, match="test split was read"):  # the guard works: reading test fails
        task_addition(blind, vs, alphas=[0.0, 1.0], evaluate_test=True)


def test_vector_on_another_pretrained_encoder_refused(vectors):
    splits = {"pos": DatasetSplits(_dataset("pos", 8, 2, 0), _dataset("pos", 8, 2, 1), _dataset("pos", 8, 2, 2))}
    other = MultiTaskSuite(tiny_bert(seed=1).double(), load_tokenizer("tiny-bert"), splits, {"pos": ["bad", "good"]},
                           max_length=16)
    assert other.base_fingerprint() != _suite().base_fingerprint()
    with pytest.raises(TaskVectorError, match="another base"):
        other.accuracy("linear-layers", "pos", "val", vectors["linear-layers"][:1], [1.0])
    # forced, it applies (same names and shapes)
    other.accuracy("linear-layers", "pos", "val", vectors["linear-layers"][:1], [1.0], allow_mixed=True)


def test_checkpoints_are_early_stopping_points_of_one_schedule(suite):
    """A checkpoint at epoch 1 of a 2-epoch run is the run stopped there (same schedule); keeping checkpoints does
    not change the final vector; another seed gives another vector; points outside the run are refused."""
    full = suite.finetune("pos", "linear-layers", lr=3e-3, epochs=2, checkpoints=(0.5, 1))
    plain = suite.finetune("pos", "linear-layers", lr=3e-3, epochs=2)
    stopped = suite.finetune("pos", "linear-layers", lr=3e-3, epochs=2, stop=1)
    assert sorted(full.checkpoints) == [0.5, 1.0]
    assert stopped.steps == full.steps // 2 == 3  # 24 sentences, batch 8
    for n, t in full.vector.tensors.items():
        assert torch.equal(t, plain.vector.tensors[n])
        assert torch.equal(full.checkpoints[1.0].tensors[n], stopped.vector.tensors[n])
    assert not all(torch.equal(full.checkpoints[1.0].tensors[n], t) for n, t in full.vector.tensors.items())
    assert stopped.vector.info["stopped_at_epoch"] == "1.0" and stopped.vector.info["epochs"] == "2"
    other = suite.finetune("pos", "linear-layers", lr=3e-3, epochs=2, stop=1, seed=7)
    assert not all(torch.equal(other.vector.tensors[n], t) for n, t in stopped.vector.tensors.items())
    with pytest.raises(TaftError, match="outside the run"):
        suite.finetune("pos", "linear-layers", lr=3e-3, epochs=1, checkpoints=(2,))


def test_tune_picks_the_validation_argmax_without_reading_test():
    """lr × length chosen on validation: the kept vector is the argmax of the recorded grid, it is bitwise the
    vector of that grid point, and the test split (which raises on access) is never read."""
    suite = _suite(test_split=False)
    tr = tune(suite, "qtype", "linear-layers", lrs=[1e-3, 1e-2], lengths=[0.5, 1, 2])
    flat = {(lr, n): a for lr, row in tr.grid_val.items() for n, a in row.items()}
    assert set(flat) == {(lr, n) for lr in (1e-3, 1e-2) for n in (0.5, 1.0, 2.0)}
    assert tr.val == max(flat.values()) == flat[(tr.lr, tr.epochs)]
    first = next(k for k, a in flat.items() if a == tr.val)  # ties: the earlier grid point
    assert (tr.lr, tr.epochs) == first
    assert all(torch.equal(t, tr.vectors[first].tensors[n]) for n, t in tr.vector.tensors.items())
    assert tr.vector.info["stopped_at_epoch"] == str(tr.epochs)
    with pytest.raises(TaftError, match="past the 1-epoch schedule"):
        tune(suite, "qtype", "linear-layers", lrs=[1e-3], lengths=[2], epochs=1)
    with pytest.raises(TaftError, match="positive"):
        tune(suite, "qtype", "linear-layers", lrs=[], lengths=[1])


@pytest.mark.parametrize(("kw", "message"), [
    ({"epochs": 1, "checkpoints": (0.5, 0.6)}, "end at the same step"),  # 3 steps per epoch: both round to step 2
    ({"epochs": 2, "checkpoints": (1.5,), "stop": 1}, "after the run stops"),
    ({"epochs": 1, "checkpoints": (1.1,)}, "outside the run"),
    ({"epochs": 1, "checkpoints": (float("nan"),)}, "outside the run"),
])
def test_checkpoints_that_cannot_be_kept_are_refused(suite, kw, message):
    with pytest.raises(TaftError, match=message):
        suite.finetune("pos", "linear-layers", lr=3e-3, **kw)
