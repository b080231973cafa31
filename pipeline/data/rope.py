"""M-RoPE position ids of one document, with the teacher's rule (`Qwen2_5_VLModel.get_rope_index`).

Text tokens count up by one on all three axes. A run of vision tokens gets (t, h, w) grid positions
offset by the position where it starts; for video the temporal axis advances by
`second_per_grid_t * tokens_per_second` per temporal patch, so positions follow real time. After the
run, text resumes at start + max(h, w) / merge. Written out here so the loader needs no model.
"""

from __future__ import annotations

import torch


def mrope_position_ids(mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                       video_grid_thw: torch.Tensor | None, second_per_grid_ts: torch.Tensor | None,
                       spatial_merge_size: int = 2, tokens_per_second: float = 2.0) -> torch.Tensor:
    """[T] token types (0 text, 1 image, 2 video) of one document → [3, T] positions (int64)."""
    types = mm_token_type_ids.tolist()
    grids = {1: iter(image_grid_thw.tolist() if image_grid_thw is not None else []),
             2: iter(video_grid_thw.tolist() if video_grid_thw is not None else [])}
    seconds = iter(second_per_grid_ts.tolist() if second_per_grid_ts is not None else [])
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
