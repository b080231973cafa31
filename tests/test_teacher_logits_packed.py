"""The teacher on packed rows: every document's logits equal those of the document run alone.

The reference is transformers itself: each document alone, with the positions Qwen2.5-VL computes for
it (get_rope_index from its own image/video grids), no packing involved.
"""

from __future__ import annotations

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
    # and the sparse path reads the same distribution
    idx, lp, _ = sparse_logits(model, inputs, everywhere, k=5, chunk=64)
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
