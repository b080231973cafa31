"""M-RoPE position ids of one document, with the teacher family's rule (its Model's `get_rope_index`).

Text tokens count up by one on all three axes. A run of vision tokens gets (t, h, w) grid positions
offset by the position where it starts; after the run, text resumes at start + max(h, w) / merge. Videos follow
the processor's layout: in "qwen2_5_vl" (Qwen2.5-VL) a video is one run whose temporal axis advances by
`second_per_grid_t * tokens_per_second` per temporal patch, so positions follow real time; in "qwen3_vl"
(Qwen3-VL, Qwen3.5) every temporal patch is its own run, placed as an image is, its time written in the text
before it. Written out here so the loader needs no model; tests hold it to each family's `get_rope_index`.
"""

from __future__ import annotations

import torch


def mrope_position_ids(mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                       video_grid_thw: torch.Tensor | None, second_per_grid_ts: torch.Tensor | None,
                       spatial_merge_size: int = 2, tokens_per_second: float = 2.0,
                       video_layout: str = "qwen2_5_vl") -> torch.Tensor:
    """[T] token types (0 text, 1 image, 2 video) of one document → [3, T] positions (int64)."""
    types = mm_token_type_ids.tolist()
    videos = video_grid_thw.tolist() if video_grid_thw is not None else []
    seconds = second_per_grid_ts.tolist() if second_per_grid_ts is not None else []
    if video_layout == "qwen3_vl":  # one run per temporal patch, its time in the text
        videos = [[1, h, w] for t, h, w in videos for _ in range(t)]
        seconds = [0.0] * len(videos)
    grids = {1: iter(image_grid_thw.tolist() if image_grid_thw is not None else []), 2: iter(videos)}
    seconds = iter(seconds)
    pieces, pos, i = [], 0, 0
    while i < len(types):
        j = i
        while j < len(types) and types[j] == types[i]:
            j += 1
        if types[i] == 0:
            pieces.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
        else:
            t, h, w = next(grids[types[i]])
            h, w = h // spatial_merge_size, w // spatial_merge_size
            step = tokens_per_second * next(seconds) if types[i] == 2 else 1
            tt = (torch.arange(t) * step).long() + pos
            hh, ww = torch.arange(h) + pos, torch.arange(w) + pos
            grid = torch.stack(torch.meshgrid(tt, hh, ww, indexing="ij")).reshape(3, -1)
            if grid.shape[1] != j - i:
                raise ValueError(f"{j - i} vision tokens at {i} but the grid {t}x{h}x{w} has {grid.shape[1]}")
            pieces.append(grid)
            pos += max(h, w)
        i = j
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)


def video_runs(video_grid_thw: torch.Tensor, video_layout: str) -> torch.Tensor:
    """How many runs of video tokens each video (row of video_grid_thw) is in the text: one, or one per temporal
    patch in the "qwen3_vl" layout."""
    return video_grid_thw[:, 0] if video_layout == "qwen3_vl" else torch.ones(len(video_grid_thw), dtype=torch.long)
