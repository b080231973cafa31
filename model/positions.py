"""M-RoPE positions, computed exactly as the installed transformers computes them for the model's teacher family
(so student, teacher and data stage agree), without needing a model instance, and per document for packed
batches. The family's `rope_index` is its teacher Model's `get_rope_index`: sectioned M-RoPE with time from
`second_per_grid_ts` (Qwen2.5-VL), or one grid per video frame with time in the text (Qwen3-VL, Qwen3.5).
"""

from __future__ import annotations

import torch


def _family(config):
    from .families import family_of

    return family_of(config)


def token_types(config, input_ids: torch.Tensor) -> torch.Tensor:
    """0 text, 1 image, 2 video, per token."""
    types_ = torch.zeros_like(input_ids, dtype=torch.int32)
    types_[input_ids == config.image_token_id] = 1
    types_[input_ids == config.video_token_id] = 2
    return types_


def rope_index(config, input_ids: torch.Tensor, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None,
               attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's `get_rope_index` for a [B, T] batch: ([3, B, T] positions, [B, 1] rope deltas)."""
    if image_grid_thw is None and video_grid_thw is None:
        T = input_ids.shape[1]
        if attention_mask is None:
            pos = torch.arange(T, device=input_ids.device).expand(3, input_ids.shape[0], T).clone()
        else:
            pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0).expand(3, -1, -1).clone()
        deltas = pos.max(-1).values[0:1].T + 1 - T
        return pos, deltas
    return _family(config).rope_index(config, input_ids, token_types(config, input_ids), image_grid_thw,
                                      video_grid_thw, second_per_grid_ts, attention_mask)


def packed_rope_index(config, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, image_grid_thw=None,
                      video_grid_thw=None, second_per_grid_ts=None) -> torch.Tensor:
    """[3, 1, T] positions for a packed row: each document starts again at 0, and takes its own images and
    videos (in order) from the grids."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"packed sequences need batch size 1, got {input_ids.shape[0]}")
    family = _family(config)
    ids = input_ids[0]
    bounds = cu_seqlens.tolist()
    next_image, next_video = 0, 0
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = ids[a:b]
        n_img = _runs(seg == config.image_token_id)
        img_idx = list(range(next_image, next_image + n_img))
        next_image += n_img
        vid_idx, runs = [], _runs(seg == config.video_token_id)
        while runs > 0:  # a video becomes one run of tokens, or one per frame (family.video_runs)
            if video_grid_thw is None or next_video >= len(video_grid_thw):
                raise ValueError(f"document {len(parts)} of the packed row has more video token runs than "
                                 "video_grid_thw has videos")
            runs -= family.video_runs(video_grid_thw[next_video])
            vid_idx.append(next_video)
            next_video += 1
        pos, _ = rope_index(
            config, seg[None],
            image_grid_thw[img_idx] if n_img else None,
            video_grid_thw[vid_idx] if vid_idx else None,
            second_per_grid_ts[vid_idx] if (vid_idx and second_per_grid_ts is not None) else None)
        parts.append(pos)
    return torch.cat(parts, -1)


def _runs(flags: torch.Tensor) -> int:
    """Number of contiguous runs of True (one image or video each)."""
    if flags.numel() == 0:
        return 0
    f = flags.int()
    return int(f[0]) + int(((f[1:] - f[:-1]) == 1).sum())
