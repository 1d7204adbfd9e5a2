"""Hugging Face RoBERTa (``RobertaModel``): BERT's rules and family with RoBERTa's position ids.

transformers 5.x gives RoBERTa its own classes, but every layer runs BERT's code (attention, outputs,
intermediate, layer, encoder and model forward are the same functions up to names), so BERT's closed-form rules
are registered for them. Only the embeddings differ: default positions count the non-padding tokens from
``padding_idx + 1`` (``padding_idx + 1 + t`` for ``inputs_embeds``), computed by the module's own helpers.
Supported inputs and refusals are BERT's (:mod:`taft.models.bert`).
"""

from __future__ import annotations

from torch import nn
from transformers.models.roberta import modeling_roberta as mr

from taft.engine.dual import Dual
from taft.engine.family import register_family
from taft.engine.registry import first_output, register_rule
from taft.models.bert import (
    BertFamily,
    bert_attention_rule,
    bert_embeddings_rule,
    bert_intermediate_rule,
    bert_layer_rule,
    bert_output_rule,
    bert_pooler_rule,
    bert_self_attention_rule,
)

register_rule(mr.RobertaSelfAttention, plain_output=first_output)(bert_self_attention_rule)
register_rule(mr.RobertaAttention, plain_output=first_output)(bert_attention_rule)
register_rule(mr.RobertaSelfOutput, mr.RobertaOutput)(bert_output_rule)
register_rule(mr.RobertaIntermediate)(bert_intermediate_rule)
register_rule(mr.RobertaLayer, methods=("forward", "feed_forward_chunk"))(bert_layer_rule)
register_rule(mr.RobertaPooler)(bert_pooler_rule)


def _primal(x):
    return x.primal if isinstance(x, Dual) else x


@register_rule(mr.RobertaEmbeddings)
def roberta_embeddings_rule(ctx, m: mr.RobertaEmbeddings, name: str, input_ids=None, token_type_ids=None,
                            position_ids=None, inputs_embeds=None, cache_length: int = 0) -> Dual:
    """BERT's embeddings (:func:`bert_embeddings_rule`) at RoBERTa's default positions (ids carry no tangent)."""
    if position_ids is None:
        if input_ids is not None:
            position_ids = m.create_position_ids_from_input_ids(_primal(input_ids), m.padding_idx, cache_length)
        else:
            position_ids = m.create_position_ids_from_inputs_embeds(_primal(inputs_embeds), m.padding_idx)
    return bert_embeddings_rule(ctx, m, name, input_ids, token_type_ids, position_ids, inputs_embeds, cache_length)


@register_family
class RobertaFamily(BertFamily):
    arch = "hf-roberta"
    model_types = (mr.RobertaModel,)

    @classmethod
    def bypassed(cls, model: nn.Module) -> dict[str, tuple[type, ...]]:
        return {"encoder": (mr.RobertaEncoder,)}  # its layers are called one by one

    def cls_token_id(self) -> int:
        return self.model.config.bos_token_id or 0  # <s>
