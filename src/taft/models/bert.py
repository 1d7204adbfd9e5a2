"""Hugging Face BERT (``BertModel``; the embedded default all-MiniLM-L6-v2): rules and family.

Post-LN blocks: ``a = LN(x + W_o·MHA(x))``, ``y = LN(a + W_2·GELU(W_1·a))``. The family's output is
``last_hidden_state`` (the pooler is not used by sentence-embedding models and is left out of every scope).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.models.bert import modeling_bert as mb

from taft.engine.dual import Dual, dual_add, dual_map
from taft.engine.family import Family, Stage, State, register_family
from taft.engine.registry import register_rule
from taft.rules.attention import additive_mask, separate_qkv_attention


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@register_rule(mb.BertEmbeddings)
def bert_embeddings_rule(ctx, m: mb.BertEmbeddings, name: str, input_ids, token_type_ids=None) -> Dual:
    input_ids = input_ids.primal if isinstance(input_ids, Dual) else input_ids
    B, T = input_ids.shape
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    position_ids = m.position_ids[:, :T]  # (1, T)
    h = dual_add(
        ctx.call(m.word_embeddings, f"{name}.word_embeddings", input_ids),
        ctx.call(m.token_type_embeddings, f"{name}.token_type_embeddings", token_type_ids),
        ctx.call(m.position_embeddings, f"{name}.position_embeddings", position_ids),
    )  # (B, T, D)
    h = ctx.call(m.LayerNorm, f"{name}.LayerNorm", h)
    return ctx.call(m.dropout, f"{name}.dropout", h)


@register_rule(mb.BertSelfAttention, plain_output=_first)
def bert_self_attention_rule(ctx, m: mb.BertSelfAttention, name: str, h: Dual, mask: Tensor | None) -> Dual:
    return separate_qkv_attention(ctx, m, name, h, ("query", "key", "value"), head_dim=m.attention_head_size,
                                  scale=m.scaling, mask=additive_mask(mask, h.primal.dtype))


@register_rule(mb.BertSelfOutput, mb.BertOutput)
def bert_output_rule(ctx, m, name: str, h: Dual, residual: Dual) -> Dual:
    h = ctx.call(m.dense, f"{name}.dense", h)
    h = ctx.call(m.dropout, f"{name}.dropout", h)
    return ctx.call(m.LayerNorm, f"{name}.LayerNorm", dual_add(h, residual))


@register_rule(mb.BertAttention, plain_output=_first)
def bert_attention_rule(ctx, m: mb.BertAttention, name: str, h: Dual, mask: Tensor | None) -> Dual:
    if m.is_cross_attention:
        raise NotImplementedError("bert attention rule: cross-attention is not supported")
    a = ctx.call(m.self, f"{name}.self", h, mask)
    return ctx.call(m.output, f"{name}.output", a, h)


@register_rule(mb.BertIntermediate)
def bert_intermediate_rule(ctx, m: mb.BertIntermediate, name: str, h: Dual) -> Dual:
    h = ctx.call(m.dense, f"{name}.dense", h)
    return ctx.call(m.intermediate_act_fn, f"{name}.intermediate_act_fn", h)


@register_rule(mb.BertLayer)
def bert_layer_rule(ctx, m: mb.BertLayer, name: str, h: Dual, mask: Tensor | None) -> Dual:
    if m.add_cross_attention:
        raise NotImplementedError("bert layer rule: cross-attention (decoder) layers are not supported")
    a = ctx.call(m.attention, f"{name}.attention", h, mask)
    i = ctx.call(m.intermediate, f"{name}.intermediate", a)
    return ctx.call(m.output, f"{name}.output", i, a)


@register_rule(mb.BertPooler)
def bert_pooler_rule(ctx, m: mb.BertPooler, name: str, h: Dual) -> Dual:
    h = dual_map(h, lambda x: x[:, 0])
    return ctx.call(m.activation, f"{name}.activation", ctx.call(m.dense, f"{name}.dense", h))


@register_family
class BertFamily(Family):
    arch = "hf-bert"
    model_types = (mb.BertModel,)

    def stages(self) -> list[Stage]:
        n = len(self.model.encoder.layer)
        return [Stage("embeddings", (self.q("embeddings"),))] + [
            Stage(f"encoder.layer.{i}", (self.q(f"encoder.layer.{i}"),), block=True) for i in range(n)
        ]

    def attn_linear_weights(self) -> list[str]:
        out = []
        for i in range(len(self.model.encoder.layer)):
            p = self.q(f"encoder.layer.{i}.attention")
            out += [f"{p}.self.query.weight", f"{p}.self.key.weight", f"{p}.self.value.weight"]
            out.append(f"{p}.output.dense.weight")
        return out

    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def cls_init(self) -> Tensor:
        cfg = self.model.config
        cls_id = getattr(cfg, "cls_token_id", None) or 101  # [CLS] in the BERT uncased vocab
        cls_id = cls_id if cls_id < cfg.vocab_size else 0  # toy vocabularies: any fixed token will do
        ids = torch.tensor([[cls_id]], device=self.model.embeddings.word_embeddings.weight.device)
        with torch.no_grad():
            return self.model.embeddings(input_ids=ids)[0, 0].detach().clone()

    def reinit_module(self, module) -> None:
        for m in module.modules():
            self.model._init_weights(m)

    def select_output(self, out) -> Tensor:
        return out.last_hidden_state

    def example_inputs(self, batch: int, generator: torch.Generator) -> tuple[tuple, dict]:
        cfg = self.model.config
        T = 12
        ids = torch.randint(1, cfg.vocab_size, (batch, T), generator=generator)
        mask = torch.ones(batch, T, dtype=torch.long)
        for b in range(1, batch):  # every row after the first is padded to a different length
            mask[b, T - 1 - (b * 3) % (T - 2) :] = 0
        ids = ids.masked_fill(mask == 0, cfg.pad_token_id or 0)
        dev = self.model.embeddings.word_embeddings.weight.device
        return (ids.to(dev),), {"attention_mask": mask.to(dev)}

    def prepare(self, input_ids, attention_mask=None, token_type_ids=None) -> State:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        aux = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return State(None, aux)

    def run_stage(self, ctx, i: int, state: State) -> State:
        m = self.model
        if i == 0:
            h = ctx.call(m.embeddings, self.q("embeddings"), state.aux["input_ids"], state.aux["token_type_ids"])
            return State(h, state.aux)
        mask = additive_mask(state.aux["attention_mask"], state.h.primal.dtype)
        h = ctx.call(m.encoder.layer[i - 1], self.q(f"encoder.layer.{i - 1}"), state.h, mask)
        return State(h, state.aux)
