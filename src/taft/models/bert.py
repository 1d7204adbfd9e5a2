"""Hugging Face BERT (``BertModel``; the embedded default all-MiniLM-L6-v2): rules and family.

Post-LN blocks: ``a = LN(x + W_o·MHA(x))``, ``y = LN(a + W_2·GELU(W_1·a))``. The family's output is
``last_hidden_state`` (the pooler is not used by sentence-embedding models and is left out of every scope).

Inputs: every argument of ``BertModel.forward`` that changes ``last_hidden_state`` of an encoder —
``input_ids`` or ``inputs_embeds``, ``attention_mask`` (2-D padding or 4-D additive), ``token_type_ids``,
``position_ids`` — in HF's positional order; output-format flags are accepted. Not the family's
(the exact generic fallback runs instead): decoders (``is_decoder``: causal self-attention, cross-attention).
Refused (:class:`~taft.errors.UnsupportedError`): ``encoder_hidden_states``, caches and any other argument;
attention-probability dropout in training mode. Refused (:class:`~taft.errors.TaftError`): a row of the batch with
no token to attend to (an all-zero padding mask, or a 4-D mask with a fully masked query): what the model computes
for it depends on its attention implementation (eager attends uniformly to the padding, SDPA returns zeros), and
mean pooling has no token to average for it anyway.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.models.bert import modeling_bert as mb

from taft.engine.dual import Dual, dual_add, dual_map, is_batched
from taft.engine.family import HF_FORMAT_ONLY, Family, Stage, State, refuse_arguments, register_family, reinit_hf
from taft.engine.registry import first_output, register_rule
from taft.errors import TaftError, UnsupportedError
from taft.rules.attention import additive_mask, separate_qkv_attention

# BertModel.forward arguments that never change an encoder's last_hidden_state (an encoder ignores use_cache).
_FORMAT_ONLY = HF_FORMAT_ONLY | {"use_cache"}
_EMBEDDING_INPUTS = ("input_ids", "token_type_ids", "position_ids", "inputs_embeds")


@register_rule(mb.BertEmbeddings)
def bert_embeddings_rule(ctx, m: mb.BertEmbeddings, name: str, input_ids=None, token_type_ids=None,
                         position_ids=None, inputs_embeds=None, cache_length: int = 0) -> Dual:
    """``e = LN(E_w[ids] (or inputs_embeds) + E_t[types] + E_p[positions])``: Embedding rules, then LayerNorm.
    Default positions ``cache_length..cache_length+T``; default token types from the model's buffer (zeros)."""
    input_ids = input_ids.primal if isinstance(input_ids, Dual) else input_ids
    words = (ctx.call(m.word_embeddings, f"{name}.word_embeddings", input_ids) if inputs_embeds is None
             else Dual(inputs_embeds.primal if isinstance(inputs_embeds, Dual) else inputs_embeds, None))
    B, T = words.primal.shape[:2]
    if position_ids is None:
        position_ids = m.position_ids[:, cache_length:cache_length + T]  # (1, T)
    if token_type_ids is None:  # as BertEmbeddings.forward: the buffer, gathered at the positions
        buffered = m.token_type_ids.expand(position_ids.shape[0], -1)
        token_type_ids = torch.gather(buffered, dim=1, index=position_ids).expand(B, T)
    h = dual_add(
        words,
        ctx.call(m.token_type_embeddings, f"{name}.token_type_embeddings", token_type_ids),
        ctx.call(m.position_embeddings, f"{name}.position_embeddings", position_ids),
    )  # (B, T, D)
    h = ctx.call(m.LayerNorm, f"{name}.LayerNorm", h)
    return ctx.call(m.dropout, f"{name}.dropout", h)


@register_rule(mb.BertSelfAttention, plain_output=first_output)
def bert_self_attention_rule(ctx, m: mb.BertSelfAttention, name: str, h: Dual, mask: Tensor | None) -> Dual:
    """``O = softmax(s·QKᵀ + M)V`` with ``Q, K, V`` the Linear rules (:func:`separate_qkv_attention`)."""
    if m.training and m.dropout.p > 0.0:
        raise UnsupportedError(
            f"BERT attention rule ({name}): attention-probability dropout in training mode is not supported; call "
            "model.eval() (or set attention_probs_dropout_prob=0) before the tangent forward"
        )
    if m.is_causal:
        raise UnsupportedError(f"BERT attention rule ({name}): causal self-attention is not supported")
    return separate_qkv_attention(ctx, m, name, h, ("query", "key", "value"), head_dim=m.attention_head_size,
                                  scale=m.scaling, mask=additive_mask(mask, h.primal.dtype))


@register_rule(mb.BertSelfOutput, mb.BertOutput)
def bert_output_rule(ctx, m, name: str, h: Dual, residual: Dual) -> Dual:
    h = ctx.call(m.dense, f"{name}.dense", h)
    h = ctx.call(m.dropout, f"{name}.dropout", h)
    return ctx.call(m.LayerNorm, f"{name}.LayerNorm", dual_add(h, residual))


@register_rule(mb.BertAttention, plain_output=first_output)
def bert_attention_rule(ctx, m: mb.BertAttention, name: str, h: Dual, mask: Tensor | None) -> Dual:
    if m.is_cross_attention:
        raise UnsupportedError(f"BERT attention rule ({name}): cross-attention is not supported")
    a = ctx.call(m.self, f"{name}.self", h, mask)
    return ctx.call(m.output, f"{name}.output", a, h)


@register_rule(mb.BertIntermediate)
def bert_intermediate_rule(ctx, m: mb.BertIntermediate, name: str, h: Dual) -> Dual:
    h = ctx.call(m.dense, f"{name}.dense", h)
    return ctx.call(m.intermediate_act_fn, f"{name}.intermediate_act_fn", h)


@register_rule(mb.BertLayer, methods=("forward", "feed_forward_chunk"))
def bert_layer_rule(ctx, m: mb.BertLayer, name: str, h: Dual, mask: Tensor | None) -> Dual:
    if m.add_cross_attention or m.is_decoder:
        raise UnsupportedError(f"BERT layer rule ({name}): decoder layers (causal, cross-attention) are not supported")
    a = ctx.call(m.attention, f"{name}.attention", h, mask)
    i = ctx.call(m.intermediate, f"{name}.intermediate", a)
    return ctx.call(m.output, f"{name}.output", i, a)


@register_rule(mb.BertPooler)
def bert_pooler_rule(ctx, m: mb.BertPooler, name: str, h: Dual) -> Dual:
    h = dual_map(h, lambda x: x[:, 0])
    return ctx.call(m.activation, f"{name}.activation", ctx.call(m.dense, f"{name}.dense", h))


def _refuse_rows_without_tokens(arch: str, attention_mask: Tensor) -> None:
    """A :class:`TaftError` naming the first row of the batch whose tokens attend to nothing: a 2-D padding mask
    of zeros only, or a 4-D mask with a query row masked everywhere (bool False, or additive ``-inf``). The model's
    own output for such a row is whatever its attention kernel makes of an empty softmax (uniform weights in eager
    attention, zeros in SDPA), so no closed form can promise to match it. A vmapped mask is not checked (its
    values cannot steer Python); additive 4-D masks with finite fills (HF's ``finfo.min``) give uniform weights in
    every implementation and are allowed."""
    if is_batched(attention_mask):
        return
    if attention_mask.dim() == 2:
        attends = attention_mask.to(torch.bool).any(dim=-1)  # (B,)
    elif attention_mask.dtype == torch.bool:
        attends = attention_mask.any(dim=-1).flatten(1).all(dim=1)  # every query of the row sees a token
    else:
        attends = ~torch.isneginf(attention_mask).all(dim=-1).flatten(1).any(dim=1)
    if not bool(attends.all()):
        row = int((~attends).nonzero()[0, 0])
        raise TaftError(f"{arch} family: row {row} of the batch has no token to attend to (all padding: its "
                        f"attention mask masks every token); drop that row, or keep at least one token unmasked "
                        f"(a tokenizer's [CLS] and [SEP] always are)")


@register_family
class BertFamily(Family):
    arch = "hf-bert"
    model_types = (mb.BertModel,)
    own_methods = ("forward", "_create_attention_masks")

    @classmethod
    def bypassed(cls, model) -> dict[str, tuple[type, ...]]:
        return {"encoder": (mb.BertEncoder,)}  # its layers are called one by one

    @classmethod
    def unsupported(cls, model) -> str | None:
        if model.config.is_decoder or model.config.add_cross_attention:
            return "is_decoder / add_cross_attention (causal self-attention, cross-attention) is not implemented"
        return None

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

    def cls_token_id(self) -> int:
        return getattr(self.model.config, "cls_token_id", None) or 101  # [CLS] in the BERT uncased vocab

    def cls_init(self) -> Tensor:
        cfg = self.model.config
        cls_id = self.cls_token_id()
        cls_id = cls_id if cls_id < cfg.vocab_size else 0  # toy vocabularies: any fixed token will do
        ids = torch.tensor([[cls_id]], device=self.model.embeddings.word_embeddings.weight.device)
        with torch.no_grad():
            return self.model.embeddings(input_ids=ids)[0, 0].detach().clone()

    def reinit_module(self, module) -> None:
        reinit_hf(self.model, module)

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

    def prepare(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, **kwargs) -> State:
        """``BertModel.forward``'s arguments, in its order (see the module docstring for what is supported)."""
        refuse_arguments(self.arch, kwargs, _FORMAT_ONLY)
        self._mask_memo = None  # a mask changed in place between calls is never served stale
        if (input_ids is None) == (inputs_embeds is None):
            raise TaftError("BERT family: pass exactly one of input_ids or inputs_embeds")
        ref = input_ids if input_ids is not None else inputs_embeds
        B, T = ref.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=ref.device)
        elif attention_mask.dim() not in (2, 4):
            raise TaftError(f"BERT family: attention_mask must be (batch, tokens) or 4-D additive, got shape "
                            f"{tuple(attention_mask.shape)}")
        _refuse_rows_without_tokens(self.arch, attention_mask)
        if position_ids is not None:
            position_ids = position_ids.expand(B, T)  # (B, T): one row per example (the prefix cache splits rows)
        aux = {"input_ids": input_ids, "inputs_embeds": inputs_embeds, "token_type_ids": token_type_ids,
               "position_ids": position_ids, "attention_mask": attention_mask}
        return State(None, aux)

    def run_stage(self, ctx, i: int, state: State) -> State:
        m = self.model
        if i == 0:
            kw = {k: state.aux.get(k) for k in _EMBEDDING_INPUTS if state.aux.get(k) is not None}
            h = ctx.call(m.embeddings, self.q("embeddings"), **kw)
            return State(h, state.aux)
        mask = self._layer_mask(state.aux["attention_mask"], state.h.primal.dtype)
        h = ctx.call(m.encoder.layer[i - 1], self.q(f"encoder.layer.{i - 1}"), state.h, mask)
        return State(h, state.aux)

    def _layer_mask(self, attention_mask: Tensor, dtype: torch.dtype) -> Tensor | None:
        """The additive mask every layer gets, built once per forward; ``None`` when a padding mask pads nothing
        (the same attention, and the fused kernels run without a mask, as HF's own SDPA path does)."""
        memo = getattr(self, "_mask_memo", None)
        if memo is not None and memo[0] is attention_mask and memo[1] == dtype:
            return memo[2]
        # under vmap (shards trained together) the mask is batched and its values cannot steer Python
        no_padding = (attention_mask.dim() == 2 and not is_batched(attention_mask)
                      and bool(attention_mask.all()))
        mask = None if no_padding else additive_mask(attention_mask, dtype)
        self._mask_memo = (attention_mask, dtype, mask)
        return mask
