"""Generation over the constant-size cache: one prefill over the whole prompt (text, images, video frames),
then one token per step, greedy or sampled, until every row has said its end-of-turn token.

Positions are explicit: the prompt's M-RoPE positions come from `rope_index` (the same function training
used), and each generated token takes the position after the previous one. After images or video the
next position is not the number of tokens seen, so it is carried per row rather than read off the cache.
Decode steps run eagerly through the model's forward, or as CUDA graph replays (`cuda_graphs=True`).
"""

from __future__ import annotations

import torch

from .cuda_graphs import CUDAGraphDecoder
from .packed import pack_projections
from .positions import rope_index

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


@torch.no_grad()
def prefill(model, inputs: dict, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the prompt into `cache`. Returns (last-token logits [B, vocab], next M-RoPE positions [3, B])."""
    device = next(model.parameters()).device
    ids = inputs["input_ids"].to(device)
    mask = inputs.get("attention_mask")
    mask = None if mask is None or bool(mask.all()) else mask.to(device)
    vision = {k: inputs[k].to(device) for k in VISION_KEYS if inputs.get(k) is not None}
    grids = [inputs.get(k) for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")]
    positions, _ = rope_index(model.config, ids.cpu(), *(None if g is None else g.cpu() for g in grids),
                              attention_mask=None if mask is None else mask.cpu())
    positions = positions.to(device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1, **vision)
    # the prompt ends in text (the assistant header) in every row, so the next position follows the last one
    return out.logits[:, -1], positions[:, :, -1] + 1


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row [B]: argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, inputs: dict, max_new_tokens: int = 128, eos_token_id=None, pad_token_id: int | None = None,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             cuda_graphs: bool = False, streamer=None) -> torch.Tensor:
    """New tokens [B, n ≤ max_new_tokens] for a processed prompt (the processor's output: input_ids,
    attention_mask, and pixel values with their grids). Rows that finish early are padded. `streamer` (batch 1;
    transformers' streamer protocol, e.g. TextStreamer) gets each new token as it is chosen."""
    eos = _as_set(eos_token_id if eos_token_id is not None else model.generation_config.eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (model.generation_config.pad_token_id or 0)
    generator = None
    device = next(model.parameters()).device
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    pack_projections(model)
    cache = model.new_cache()
    logits, next_pos = prefill(model, inputs, cache)
    step = _graph_steps(model, cache, next_pos) if cuda_graphs else _eager_steps(model, cache, next_pos)
    B = logits.shape[0]
    eos_ids = torch.tensor(sorted(eos), device=device, dtype=torch.long) if eos else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_p, generator)
        token = torch.where(done, torch.full_like(token, pad), token)
        out.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
        if eos_ids is not None:
            done |= torch.isin(token, eos_ids)
            if bool(done.all()):
                break
        if i + 1 < max_new_tokens:
            logits = step(token)
    if streamer is not None:
        streamer.end()
    return torch.stack(out, 1) if out else torch.zeros(B, 0, dtype=torch.long, device=device)


def _eager_steps(model, cache, next_pos):
    position = next_pos.clone()

    def step(token):
        logits = model(input_ids=token[:, None], position_ids=position[:, :, None], cache=cache, use_cache=True).logits
        position.add_(1)
        return logits[:, -1]

    return step


def _graph_steps(model, cache, next_pos):
    decoder = CUDAGraphDecoder(model, batch_size=next_pos.shape[1], use_graph=True)
    decoder.load(cache, next_pos)
    return lambda token: decoder.step(token).clone()


def _as_set(ids) -> set[int]:
    if ids is None:
        return set()
    return {int(i) for i in ids} if isinstance(ids, (list, tuple, set)) else {int(ids)}
