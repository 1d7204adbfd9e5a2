"""No silently wrong answers (issue #6 §1): every configuration the closed form does not implement exactly is
either routed to the exact ``torch.func.jvp`` fallback (visible in ``fallback_modules``) or refused with a
:class:`~taft.errors.TaftError` that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    DebertaV2Config,
    DebertaV2Model,
    Dinov2Config,
    Dinov2Model,
    DistilBertConfig,
    DistilBertModel,
    ElectraConfig,
    ElectraModel,
    RobertaConfig,
    RobertaModel,
)

from taft.engine.family import GenericFamily, family_for
from taft.errors import TaftError
from taft.models.bert import BertFamily
from taft.models.classifier import Classifier
from taft.scope import ScopeError
from taft.tangent_model import TangentModel
from tests.helpers import check_against_reference, example_inputs, mha_fastpath, tangent_model
from tests.models.test_bert import tiny_bert

TEXT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
            max_position_embeddings=40)


def _bert(**overrides) -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(**{**TEXT, **overrides})).eval().double()


def _padded(batch: int = 3, T: int = 10, vocab: int = 50, pad: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, T), generator=g)
    mask = torch.ones(batch, T, dtype=torch.long)
    for b in range(1, batch):
        mask[b, T - 2 * b - 1:] = 0
    return ids.masked_fill(mask == 0, pad), mask


# -- 1. BERT decoder / cross-attention: the exact fallback, never the bidirectional closed form ----------------
@pytest.mark.parametrize("overrides", [dict(is_decoder=True), dict(is_decoder=True, add_cross_attention=True)],
                         ids=["decoder", "cross_attention"])
def test_bert_decoder_is_exact(overrides):
    m = _bert(**overrides)
    assert not isinstance(family_for(m), BertFamily)
    ids, mask = _padded()
    for scope in ("all", "last:1"):
        tm = tangent_model(m, scope)
        check_against_reference(tm, ids, attention_mask=mask)
        assert tm.fallback_modules  # the exact fallback ran, and says so


# -- 2. Classifier pooling sees the backbone's mask (generic backbones, positional masks) -----------------------
def _generic_text() -> DistilBertModel:
    """A text encoder with no family (the whole-model fallback); its forward takes the mask second too."""
    torch.manual_seed(0)
    return _distilbert().eval().double()


def _masked_mean(h, mask):
    m = mask[..., None].to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


@pytest.mark.parametrize("scope", ["head", "last:1", "all"])
def test_classifier_mean_pool_on_generic_backbone(scope):
    clf = Classifier(_generic_text(), 3, pooling="mean").double()
    assert clf.backbone is not None and isinstance(family_for(clf).inner, GenericFamily)
    ids, mask = _padded()
    tm = tangent_model(clf, scope)
    check_against_reference(tm, ids, attention_mask=mask)
    with torch.no_grad():
        expected = clf.head(_masked_mean(clf.backbone(ids, attention_mask=mask).last_hidden_state, mask))
        assert torch.allclose(clf(ids, attention_mask=mask), expected)


@pytest.mark.parametrize("backbone", ["bert", "generic"])
def test_classifier_positional_mask(backbone):
    clf = Classifier(tiny_bert() if backbone == "bert" else _generic_text(), 3, pooling="mean").double()
    ids, mask = _padded()
    with torch.no_grad():
        by_kw = clf(ids, attention_mask=mask)
        assert torch.equal(clf(ids, mask), by_kw)
        assert torch.equal(clf.features(ids, mask), clf.features(ids, attention_mask=mask))
    tm = tangent_model(clf, "last:1")
    f0, t = tm.forward_parts(ids, mask)
    f0k, tk = tm.forward_parts(ids, attention_mask=mask)
    assert torch.equal(f0, f0k) and torch.equal(t, tk)
    check_against_reference(tm, ids, mask)


# -- 3. One matching policy: exact type, or a subclass with the same forward, and no hooks --------------------
class _ScaledBert(BertModel):
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.last_hidden_state = 2 * out.last_hidden_state
        return out


class _SameForwardBert(BertModel):
    pass


def test_subclass_overriding_forward_is_not_the_family():
    torch.manual_seed(0)
    m = _ScaledBert(BertConfig(**TEXT)).eval().double()
    assert isinstance(family_for(m), GenericFamily)
    ids, mask = _padded()
    tm = tangent_model(m, "last:1")
    check_against_reference(tm, ids, attention_mask=mask)
    assert tm.fallback_modules


def test_subclass_keeping_forward_is_the_family():
    torch.manual_seed(0)
    m = _SameForwardBert(BertConfig(**TEXT)).eval().double()
    assert isinstance(family_for(m), BertFamily)


def _double_output(module, args, kwargs, out):
    out.last_hidden_state = 2 * out.last_hidden_state
    return out


@pytest.mark.parametrize("where", ["forward_hook", "pre_hook", "instance_forward", "encoder_hook"])
def test_hooks_route_to_the_exact_fallback(where):
    m = _bert()
    if where == "forward_hook":
        m.register_forward_hook(_double_output, with_kwargs=True)
    elif where == "pre_hook":
        m.register_forward_pre_hook(lambda mod, args, kwargs: (args, {**kwargs, "token_type_ids": None}),
                                    with_kwargs=True)
    elif where == "instance_forward":
        fwd = m.forward
        m.forward = lambda *a, **k: _double_output(None, a, k, fwd(*a, **k))
    else:  # a hook on a submodule whose forward the family bypasses
        m.encoder.register_forward_hook(lambda mod, args, out: type(out)(last_hidden_state=2 * out.last_hidden_state))
    assert isinstance(family_for(m), GenericFamily)
    ids, mask = _padded()
    tm = tangent_model(m, "all")
    check_against_reference(tm, ids, attention_mask=mask)


def test_hook_added_after_wrapping_is_refused():
    m = _bert()
    tm = tangent_model(m, "last:1")
    ids, mask = _padded()
    m.register_forward_hook(_double_output, with_kwargs=True)
    with pytest.raises(TaftError, match="hook"):
        tm(ids, attention_mask=mask)


def test_vision_families_share_the_policy():
    from taft.models.clip_vision import tiny_clip_vision
    from taft.models.hf_vit import tiny_hf_vit
    from taft.models.timm_vit import tiny_timm_vit

    for m in (tiny_hf_vit(), tiny_clip_vision(), tiny_timm_vit()):
        assert not isinstance(family_for(m), GenericFamily)
        m.register_forward_hook(lambda mod, args, out: out)
        assert isinstance(family_for(m), GenericFamily), type(m).__name__


# -- 4. Train mode with attention dropout: refused like the other families -----------------------------------
def test_bert_train_mode_with_attention_dropout_is_refused():
    m = _bert().train()
    ids, mask = _padded()
    tm = tangent_model(m, "last:1")
    with pytest.raises(TaftError, match=r"\.eval\(\)"):
        tm(ids, attention_mask=mask)
    m0 = _bert(attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0).train()
    check_against_reference(tangent_model(m0, "last:1"), ids, attention_mask=mask)


# -- 5. Every BertModel.forward argument: supported exactly, or refused by name -------------------------------
def test_bert_position_ids_inputs_embeds_token_types():
    m = _bert()
    ids, mask = _padded()
    tt = (torch.arange(10) >= 5).long().expand(3, -1)
    pos = torch.arange(3, 13).expand(3, -1)
    emb = torch.randn(3, 10, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for scope in ("all", "last:1"):
        tm = tangent_model(m, scope)
        check_against_reference(tm, ids, mask, tt, pos)  # HF's positional order
        check_against_reference(tm, ids, attention_mask=mask, position_ids=pos)
        check_against_reference(tm, inputs_embeds=emb, attention_mask=mask, token_type_ids=tt)
        check_against_reference(tm, None, mask, None, pos, emb)
        assert tm.fallback_modules == []


@pytest.mark.parametrize("kwarg", ["encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values",
                                   "head_mask"])
def test_bert_unsupported_kwargs_are_refused(kwarg):
    m = _bert()
    ids, mask = _padded()
    tm = tangent_model(m, "last:1")
    with pytest.raises(TaftError, match=kwarg):
        tm(ids, attention_mask=mask, **{kwarg: torch.ones(3, 10, 16, dtype=torch.float64)})


def test_bert_format_only_kwargs_are_accepted():
    """Flags that change only the output's format (and ``use_cache``, which an encoder ignores)."""
    m = _bert()
    ids, mask = _padded()
    tm = tangent_model(m, "last:1")
    check_against_reference(tm, ids, attention_mask=mask, use_cache=True, output_attentions=True,
                            output_hidden_states=True, encoder_hidden_states=None)


# -- 6. last:k on common HF encoders with no family: detected blocks, exact forward --------------------------
def _distilbert():
    return DistilBertModel(DistilBertConfig(vocab_size=50, dim=16, n_layers=2, n_heads=4, hidden_dim=32,
                                            max_position_embeddings=40))


def _electra():
    return ElectraModel(ElectraConfig(vocab_size=50, embedding_size=8, hidden_size=16, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=32, max_position_embeddings=40))


def _deberta():
    return DebertaV2Model(DebertaV2Config(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=32, max_position_embeddings=40, relative_attention=True,
                                          pos_att_type=["p2c", "c2p"], position_buckets=8))


def _dinov2():
    return Dinov2Model(Dinov2Config(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=4, mlp_ratio=2))


ENCODERS = {
    "roberta_decoder": (lambda: RobertaModel(RobertaConfig(**{**TEXT, "pad_token_id": 1, "is_decoder": True})),
                        "encoder.layer.1."),  # RoBERTa has a family; its decoders do not
    "distilbert": (_distilbert, "transformer.layer.1."),
    "electra": (_electra, "encoder.layer.1."),
    "deberta_v2": (_deberta, "encoder.layer.1."),
    "dinov2": (_dinov2, "encoder.layer.1."),
}


@pytest.mark.parametrize("arch", list(ENCODERS))
def test_last_k_on_hf_encoders(arch):
    build, last = ENCODERS[arch]
    torch.manual_seed(0)
    m = build().eval().double()
    assert isinstance(family_for(m), GenericFamily)
    tm = tangent_model(m, "last:1")
    assert tm.linearized and all(n.startswith(last) or n.startswith("layernorm.") for n in tm.linearized)
    assert any(n.startswith(last) for n in tm.linearized)
    if arch == "dinov2":
        assert "layernorm.weight" in tm.linearized  # the final norm is part of last_hidden_state
        args, kw = (torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),), {}
    else:
        ids, mask = _padded(pad=1 if arch.startswith("roberta") else 0)
        args, kw = (ids,), {"attention_mask": mask}
    check_against_reference(tm, *args, **kw)
    assert len(TangentModel(m, "last:2").linearized) > len(tm.linearized)
    with pytest.raises(ScopeError, match="1..2"):
        TangentModel(m, "last:3")


def test_last_k_ambiguous_blocks_are_refused():
    class TwoStacks(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
            self.b = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

        def forward(self, x):
            for m in (*self.a, *self.b):
                x = m(x)
            return x

    with pytest.raises(ScopeError, match="blocks"):
        TangentModel(TwoStacks(), "last:1")


def test_reinit_and_cls_on_generic_models_are_refused_or_exact():
    m = _generic_text()
    with pytest.raises(ScopeError, match="linearize_cls"):
        TangentModel(m, "last:1", linearize_cls=True)
    tm = TangentModel(m, "last:1", reinit=True)
    w0 = tm.base_params()
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, w0[n])}
    assert changed and all(n.startswith("transformer.layer.1.") for n in changed)
    ids, mask = _padded()
    check_against_reference(tangent_model(m, "last:1", reinit=True), ids, attention_mask=mask)


# -- the family's example inputs still hold with the new prepare -----------------------------------------------
def test_bert_example_inputs_still_match():
    m = _bert()
    args, kw = example_inputs(m)
    check_against_reference(tangent_model(m, "all"), *args, **kw)


# -- 3 (nested). Rules follow the same policy: methods and children a rule re-implements ------------------------
@pytest.mark.parametrize("change", ["method", "child_hook"])
def test_rule_skips_a_block_whose_bypassed_code_changed(change):
    import open_clip.transformer as oct

    from tests.models import test_open_clip

    class ScaledAttention(oct.ResidualAttentionBlock):  # forward kept, attention (re-implemented) changed
        def attention(self, *args, **kwargs):
            return 2 * super().attention(*args, **kwargs)

    m = test_open_clip.build("default")
    last = len(m.transformer.resblocks) - 1
    block = m.transformer.resblocks[last]
    if change == "method":
        block.__class__ = ScaledAttention
    else:
        block.mlp.register_forward_hook(lambda mod, args, out: 2 * out)
    args, kw = example_inputs(m)
    with mha_fastpath(False):
        tm = tangent_model(m, "last:1")
        check_against_reference(tm, *args, **kw)
    assert tm.fallback_modules == [f"transformer.resblocks.{last}"]
