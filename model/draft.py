"""A draft model for speculative decoding made of the model itself: its first decoder layers, embeddings, final
norm and LM head (and its vision tower), shared rather than copied, so the draft costs no weight memory. Passed as
`generate(assistant_model=draft)`, it proposes tokens that the whole model then checks in one forward; the output
is the model's own greedy decoding, token for token (the draft only changes how fast it comes).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def layer_skip_draft(model, num_layers: int = 2, num_assistant_tokens: int | None = None):
    """The draft of `model` (a student: InfiniteVL*ForConditionalGeneration) that runs only its first `num_layers`
    decoder layers. `num_assistant_tokens`: the draft length per round (default: transformers' own, 20)."""
    text = model.config.get_text_config(decoder=True)
    if not 1 <= num_layers < text.num_hidden_layers:
        raise ValueError(f"num_layers must be between 1 and {text.num_hidden_layers - 1} (the model has "
                         f"{text.num_hidden_layers} decoder layers), got {num_layers}")
    config = copy.deepcopy(model.config)
    draft_text = config.get_text_config(decoder=True)
    draft_text.num_hidden_layers = num_layers
    draft_text.layer_types = list(text.layer_types[:num_layers])
    with torch.device("meta"):
        draft = type(model)(config)
    source, target = model.model.language_model, draft.model.language_model
    draft.model.visual = model.model.visual
    target.embed_tokens, target.norm, target.rotary_emb = source.embed_tokens, source.norm, source.rotary_emb
    target.layers = nn.ModuleList(source.layers[:num_layers])
    draft.lm_head = model.lm_head
    left = [name for name, t in list(draft.named_parameters()) + list(draft.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"layer_skip_draft left tensors unshared: {left[:5]}")
    draft.generation_config = copy.deepcopy(model.generation_config)
    if num_assistant_tokens is not None:
        draft.generation_config.num_assistant_tokens = num_assistant_tokens
    return draft.eval()
