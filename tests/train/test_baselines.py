"""Baselines that share the TAFT wrapper: NLFT, FC, LoRA and (IA)³ adapters through peft."""

from __future__ import annotations

import pytest
import torch

from taft.config import TrainConfig
from taft.train.loop import build_classifier, make_tangent_model
from taft.train.text import padded_batch, tokenize
from taft.zoo import load_model, load_tokenizer

TEXTS = ["a gripping , funny film", "dull", "one of the worst movies of the year"]


@pytest.fixture(scope="module")
def clf_and_batch():
    tok = load_tokenizer("tiny-bert")
    clf = build_classifier(TrainConfig(model="tiny-bert", head_init="random"), load_model("tiny-bert"), tok, 3, None)
    return clf.eval(), padded_batch(tokenize(tok, TEXTS, 32))


@pytest.mark.parametrize("method,pattern", [("lora", ".lora_"), ("adapter", ".ia3_l.")])
def test_peft_baselines_train_only_their_parameters(clf_and_batch, method, pattern):
    clf, batch = clf_and_batch
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    tm = make_tangent_model(TrainConfig(model="tiny-bert", method=method, scope="last:1"), clf).eval()
    names = tm.linearized
    assert names and all(pattern in n or n.startswith("head.") for n in names)
    assert any(pattern in n for n in names) and all("layer.1." in n for n in names if pattern in n)
    assert not tm.linear
    # Δ = 0: LoRA (B = 0) and (IA)³ (scales = 1) start exactly at the base classifier.
    with torch.no_grad():
        assert torch.allclose(tm(**batch), clf(**batch), atol=1e-6)
    # one step moves the output, and the user's classifier is untouched (peft works on a copy)
    opt = torch.optim.Adam(tm.delta_dict().values(), lr=1e-2)
    tm(**batch).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(tm(**batch), clf(**batch), atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in clf.state_dict().items())


def test_fc_is_the_head_only_and_nlft_the_block(clf_and_batch):
    clf, _ = clf_and_batch
    fc = make_tangent_model(TrainConfig(model="tiny-bert", method="fc"), clf)
    assert fc.linearized == ["head.weight", "head.bias"] and not fc.linear
    nl = make_tangent_model(TrainConfig(model="tiny-bert", method="nlft", scope="last:1"), clf)
    tf = make_tangent_model(TrainConfig(model="tiny-bert", method="taft", scope="last:1"), clf)
    assert nl.linearized == tf.linearized and not nl.linear and tf.linear
