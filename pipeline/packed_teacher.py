"""The frozen teacher on packed rows (several documents in one row, kept apart), as the teacher-logit stage and
Stage I-a run it, whatever its family.

A packed row arrives as the loader makes it: input_ids [1, T], M-RoPE position_ids [3, 1, T] restarting in every
document, the documents' boundaries cu_seqlens, and the documents' images and videos. Its teacher runs it one of
two ways, as its family says (`Family.packs_rows`):

- its own transformers forward, given position_ids [4, 1, T]: row 0 the text positions restarting at 0 in every
  document, from which transformers builds the block-diagonal causal mask (only when it makes no KV cache, hence
  use_cache=False; with a cache, documents would attend to each other silently), rows 1-3 the M-RoPE positions;
- the teacher rebuilt as its exact student (`model.exact_student`: its own layout, every attention a window as long
  as the teacher's context), which takes cu_seqlens and restarts every layer, attention and linear alike, at each
  document: Qwen3.5, whose linear layers transformers runs across document boundaries.

Either way the model computes, for every document, what the teacher computes on that document alone
(tests/test_teacher_logits_packed.py, tests/test_families_pipeline.py).
"""

from __future__ import annotations

import torch

VISION_INPUTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


class PackedTeacher:
    """`model`: the module that runs packed rows (the teacher itself, or its exact student); `takes_boundaries`:
    whether it is given cu_seqlens. The exact student is a copy of the teacher's weights: build it where both fit
    (the stages build it on the CPU, then move `model`), and drop the teacher once it is built."""

    def __init__(self, teacher):
        from model import exact_student, family_of

        self.takes_boundaries = not family_of(teacher.config).packs_rows
        if self.takes_boundaries:
            self.model = exact_student(teacher, teacher.config.text_config.max_position_embeddings).eval()
        else:
            self.model = teacher
        self.model.requires_grad_(False)

    def mixer(self, layer_idx: int) -> torch.nn.Module:
        """The token mixer of layer `layer_idx` (attention, or the teacher's own linear layer) in the model that
        runs: what Stage I-a hooks to read each layer's input and output."""
        from model import teacher_mixer

        return teacher_mixer(self.model, layer_idx)

    def inputs(self, row: dict) -> dict:
        """The model's keyword arguments for one packed row (loader keys; labels and bookkeeping are ignored)."""
        return packed_model_inputs(row, self.takes_boundaries)

    def hidden_states(self, row: dict) -> torch.Tensor:
        """The decoder's last hidden states [1, T, hidden] over the row (no LM head)."""
        from model.cuda_graphs import grouped_vision

        with grouped_vision(self.model):
            return self.model.model(**self.inputs(row), use_cache=False).last_hidden_state


def packed_model_inputs(row: dict, takes_boundaries: bool) -> dict:
    """A packed row's model inputs: position_ids [4, 1, T] (text positions first), and cu_seqlens where the model
    takes the boundaries."""
    out = {"input_ids": row["input_ids"],
           "position_ids": torch.cat([text_positions(row["cu_seqlens"]).to(row["position_ids"]), row["position_ids"]],
                                     0)}
    if row.get("mm_token_type_ids") is not None:
        out["mm_token_type_ids"] = row["mm_token_type_ids"]
    out.update({k: row[k] for k in VISION_INPUTS if row.get(k) is not None})
    if takes_boundaries:
        out["cu_seqlens"] = row["cu_seqlens"]
    return out


def text_positions(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[1, 1, T]: 0, 1, 2, ... restarting at every document boundary."""
    cu = cu_seqlens.long()
    return torch.cat([torch.arange(int(n), device=cu.device) for n in (cu[1:] - cu[:-1]).tolist()]).view(1, 1, -1)
