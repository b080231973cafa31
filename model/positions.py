"""M-RoPE positions, computed exactly as the installed transformers' Qwen2.5-VL computes them (so student,
teacher and data stage agree), without needing a model instance, and per document for packed batches.
"""

from __future__ import annotations

import functools
import types

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel


def token_types(config, input_ids: torch.Tensor) -> torch.Tensor:
    """0 text, 1 image, 2 video, per token."""
    types_ = torch.zeros_like(input_ids, dtype=torch.int32)
    types_[input_ids == config.image_token_id] = 1
    types_[input_ids == config.video_token_id] = 2
    return types_


def rope_index(config, input_ids: torch.Tensor, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None,
               attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's `get_rope_index` for a [B, T] batch: ([3, B, T] positions, [B, 1] rope deltas)."""
    shim = types.SimpleNamespace(
        config=config, get_vision_position_ids=functools.partial(Qwen2_5_VLModel.get_vision_position_ids, None))
    if image_grid_thw is None and video_grid_thw is None:
        T = input_ids.shape[1]
        if attention_mask is None:
            pos = torch.arange(T, device=input_ids.device).expand(3, input_ids.shape[0], T).clone()
        else:
            pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0).expand(3, -1, -1).clone()
        deltas = pos.max(-1).values[0:1].T + 1 - T
        return pos, deltas
    return Qwen2_5_VLModel.get_rope_index(
        shim, input_ids, mm_token_type_ids=token_types(config, input_ids), image_grid_thw=image_grid_thw,
        video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts, attention_mask=attention_mask)


def packed_rope_index(config, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, image_grid_thw=None,
                      video_grid_thw=None, second_per_grid_ts=None) -> torch.Tensor:
    """[3, 1, T] positions for a packed row: each document starts again at 0, and takes its own images and
    videos (in order) from the grids."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"packed sequences need batch size 1, got {input_ids.shape[0]}")
    ids = input_ids[0]
    bounds = cu_seqlens.tolist()
    images = iter(range(0 if image_grid_thw is None else len(image_grid_thw)))
    videos = iter(range(0 if video_grid_thw is None else len(video_grid_thw)))
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = ids[a:b]
        n_img = _runs(seg == config.image_token_id)
        n_vid = _runs(seg == config.video_token_id)
        img_idx = [next(images) for _ in range(n_img)]
        vid_idx = [next(videos) for _ in range(n_vid)]
        pos, _ = rope_index(
            config, seg[None],
            image_grid_thw[img_idx] if n_img else None,
            video_grid_thw[vid_idx] if n_vid else None,
            second_per_grid_ts[vid_idx] if (n_vid and second_per_grid_ts is not None) else None)
        parts.append(pos)
    return torch.cat(parts, -1)


def _runs(flags: torch.Tensor) -> int:
    """Number of contiguous runs of True (one image or video each)."""
    if flags.numel() == 0:
        return 0
    f = flags.int()
    return int(f[0]) + int(((f[1:] - f[:-1]) == 1).sum())
