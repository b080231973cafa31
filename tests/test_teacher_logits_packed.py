"""The teacher on packed rows: every document's logits equal those of the document run alone.

The reference is transformers itself: each document alone, with the positions Qwen2.5-VL computes for
it (get_rope_index from its own image/video grids), no packing involved.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.data.loader import example_from_row, read_manifest, shard_urls
from pipeline.data.shards import ShardReader
from pipeline.teacher_logits.teacher import full_log_probs, packed_inputs, sparse_logits
from tests.test_teacher_logits_helpers import build_small_corpus


@pytest.fixture(scope="module")
def examples(tmp_path_factory, processor):
    manifest_url = build_small_corpus(tmp_path_factory.mktemp("packed"))
    manifest = read_manifest(manifest_url)
    out = []
    for url in shard_urls(manifest_url, manifest)[:2]:
        reader = ShardReader(url)
        out += [example_from_row(reader.row(i), processor) for i in range(len(reader))]
    assert any("pixel_values_videos" in e for e in out) and all(len(e["sample_ids"]) >= 2 for e in out)
    return out


def document_alone(example: dict, d: int, processor) -> dict:
    """Document d of a packed row as its own sequence, with its own images/videos."""
    bounds = example["cu_seqlens"].tolist()
    a, b = bounds[d], bounds[d + 1]
    ids = example["input_ids"][:, a:b]
    inputs = {"input_ids": ids, "mm_token_type_ids": example["mm_token_type_ids"][:, a:b]}
    for kind, pad, pixels, grids in (("image", processor.image_token_id, "pixel_values", "image_grid_thw"),
                                     ("video", processor.video_token_id, "pixel_values_videos", "video_grid_thw")):
        if grids not in example:
            continue
        runs_before = _runs(example["input_ids"][0, :a] == pad)
        runs_here = _runs(ids[0] == pad)
        if not runs_here:
            continue
        g = example[grids]
        patches = g.prod(-1)
        start = int(patches[:runs_before].sum())
        inputs[pixels] = example[pixels][start:start + int(patches[runs_before:runs_before + runs_here].sum())]
        inputs[grids] = g[runs_before:runs_before + runs_here]
        if kind == "video":
            inputs["second_per_grid_ts"] = example["second_per_grid_ts"][runs_before:runs_before + runs_here]
    return inputs


def _runs(flags: torch.Tensor) -> int:
    f = flags.int()
    return int(f[:1].sum()) + int(((f[1:] - f[:-1]) == 1).sum()) if len(f) else 0


def reference_log_probs(model, examples, processor) -> torch.Tensor:
    parts = []
    with torch.no_grad():
        for e in examples:
            for d in range(len(e["sample_ids"])):
                logits = model(**document_alone(e, d, processor), use_cache=False).logits[0]
                parts.append(torch.log_softmax(logits.float(), -1))
    return torch.cat(parts)


def test_packed_rows_equal_each_document_alone(tiny_teacher, examples):
    model, processor = tiny_teacher
    reference = reference_log_probs(model, examples, processor)
    # all rows of two shards in one forward: rows concatenate as documents do
    inputs = packed_inputs(examples, torch.device("cpu"))
    everywhere = torch.arange(inputs["input_ids"].shape[1])
    packed = full_log_probs(model, inputs, everywhere)
    assert packed.shape == reference.shape
    assert (packed - reference).abs().max() < 1e-4
    # and the sparse path (the stage's) reads the same distribution, its vision tower running every window and
    # frame in a few SDPA calls (model.cuda_graphs) where transformers launches one per window
    from model.cuda_graphs import VISION_ATTENTION

    used = []
    block = model.model.visual.blocks[0].attn
    hook = block.register_forward_pre_hook(lambda m, *_: used.append(m.config._attn_implementation))
    try:
        idx, lp, _ = sparse_logits(model, inputs, everywhere, k=5, chunk=64)
    finally:
        hook.remove()
    assert used and set(used) == {VISION_ATTENTION}  # images and videos: one tower call each
    assert model.model.visual.config._attn_implementation != VISION_ATTENTION
    assert torch.allclose(lp, reference.gather(1, idx), atol=1e-4)
    assert torch.allclose(lp, reference.topk(5).values, atol=1e-4)


def test_without_the_text_position_row_documents_see_each_other(tiny_teacher, examples):
    """The check above can fail: dropping row 0 of the [4, 1, T] positions removes the packed mask."""
    model, processor = tiny_teacher
    reference = reference_log_probs(model, examples[:1], processor)
    inputs = packed_inputs(examples[:1], torch.device("cpu"))
    inputs["position_ids"] = inputs["position_ids"][1:]
    with torch.no_grad():
        leaked = torch.log_softmax(model(**inputs, use_cache=False).logits[0].float(), -1)
    first = int(examples[0]["cu_seqlens"][1])
    assert (leaked[:first] - reference[:first]).abs().max() < 1e-4  # the first document has nothing before it
    assert (leaked[first:] - reference[first:]).abs().max() > 1e-2


def test_the_student_objective_runs_the_vision_tower_grouped_and_scores_what_transformers_computes(tiny_student,
                                                                                                   examples):
    """Stages I-b to III: a packed row with pictures and videos; the loss and the vision tower's gradients equal
    those of the student's plain forward, whose vision tower transformers runs one window at a time."""
    from model.cuda_graphs import VISION_ATTENTION
    from pipeline.train.objectives import StudentObjective

    student = copy.deepcopy(tiny_student).float().train()
    row = next(e for e in examples if "pixel_values_videos" in e)
    keep = ("input_ids", "labels", "position_ids", "cu_seqlens", "mm_token_type_ids", "pixel_values",
            "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    batch = {k: row[k] for k in keep if row.get(k) is not None}
    assert (batch["labels"] != -100).any()
    used = []
    hook = student.model.visual.blocks[0].attn.register_forward_pre_hook(
        lambda m, *_: used.append(m.config._attn_implementation))
    loss, _ = StudentObjective(student, "ce")(batch)
    hook.remove()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if ".visual." in n and p.grad is not None}
    student.zero_grad()
    assert used and set(used) == {VISION_ATTENTION}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = student(**inputs).logits[0]
    ref = torch.nn.functional.cross_entropy(logits[:-1], batch["labels"][0, 1:], ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    assert grads and all(torch.allclose(g, dict(student.named_parameters())[n].grad, atol=1e-5, rtol=1e-4)
                         for n, g in grads.items())
