"""Every source format, read from a real S3 server, tokenized exactly as the teacher's processor does."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import s3fs
import torch
from PIL import Image

from pipeline.data import media, synthetic
from pipeline.data.config import CorpusConfig, SourceConfig
from pipeline.data.loader import example_from_row
from pipeline.data.shards import pack_row
from pipeline.data.sources import count_records, read_record
from pipeline.data.tokenize import IGNORE_INDEX, load_processor, tokenize_record

MAX_PX = 28 * 28 * 64


@pytest.fixture(scope="module")
def proc():
    return load_processor("tiny")


@pytest.fixture(scope="module")
def remote(s3, tmp_path_factory):
    """Synthetic sources of every kind, uploaded to the bucket; returns their s3:// roots."""
    local = tmp_path_factory.mktemp("sources")
    synthetic.write_llava(local / "llava_jsonl", 6, seed=1, fmt="jsonl")
    synthetic.write_llava(local / "llava_json", 4, seed=2, fmt="json")
    synthetic.write_parquet(local / "parquet", 5, seed=3, rows_per_file=2)
    synthetic.write_videos(local / "videos", 2, seed=4, seconds=2.0, fps=8)
    synthetic.write_documents(local / "pdf", 2, seed=5, pages=3, pdf=True)
    synthetic.write_documents(local / "folders", 2, seed=6, pages=3, pdf=False)
    root = s3.fresh("sources")
    fs = s3fs.S3FileSystem(**s3.storage_options)
    fs.put(str(local) + "/", root.removeprefix("s3://") + "/", recursive=True)
    return root, local


def corpus(source: SourceConfig, **kw) -> CorpusConfig:
    return CorpusConfig(name="t", output="unused", sources=[source], max_pixels=MAX_PX, **kw)


def sample_of(source, index, s3, proc, **kw):
    config = corpus(source, **kw)
    record = read_record(source, index, s3.storage_options)
    return record, tokenize_record(record, source, config, proc, f"{source.name}:{index}", s3.storage_options)


def supervised_spans(sample, proc) -> list[str]:
    spans, current = [], []
    for tok, lab in zip(sample.input_ids, sample.labels):
        if lab != IGNORE_INDEX:
            assert lab == tok
            current.append(tok)
        elif current:
            spans.append(proc.tokenizer.decode(current))
            current = []
    return spans + ([proc.tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_llava_annotations_match_the_processor(remote, s3, proc, fmt):
    root, local = remote
    path = f"{root}/llava_{fmt}/annotations.{fmt}"
    source = SourceConfig(name="llava", format="llava", path=path)
    assert count_records(source, s3.storage_options) == (6 if fmt == "jsonl" else 4)
    annotations = (local / f"llava_{fmt}" / f"annotations.{fmt}").read_text()
    items = [json.loads(x) for x in annotations.splitlines()] if fmt == "jsonl" else json.loads(annotations)
    record, sample = sample_of(source, 1, s3, proc)
    item = items[1]
    assert record.images == [f"{root}/llava_{fmt}/{item['image']}"]  # relative path resolved on S3

    # the reference: the processor on the same conversation and the original image
    turns = item["conversations"]
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": turns[0]["value"].replace("<image>", "")}]},
                {"role": "assistant", "content": turns[1]["value"]},
                {"role": "user", "content": turns[2]["value"]},
                {"role": "assistant", "content": turns[3]["value"]}]
    original = Image.open(local / f"llava_{fmt}" / item["image"]).convert("RGB")
    ref = proc(proc.apply_chat_template(messages), images=[original], max_pixels=MAX_PX)
    assert sample.input_ids == ref["input_ids"][0].tolist()
    assert sample.image_grid_thw == ref["image_grid_thw"].tolist()

    # labels: exactly the two answers, each with its end-of-turn token
    assert supervised_spans(sample, proc) == [turns[1]["value"] + "<|im_end|>", turns[3]["value"] + "<|im_end|>"]

    # the loader's pixels from the stored image equal the processor's from the original
    example = example_from_row(pack_row([sample]), proc)
    torch.testing.assert_close(example["pixel_values"], ref["pixel_values"], atol=1e-5, rtol=0)
    assert torch.equal(example["input_ids"], ref["input_ids"])
    assert torch.equal(example["mm_token_type_ids"], ref["mm_token_type_ids"].to(torch.int32))


def test_parquet_rows_across_files(remote, s3, proc):
    root, local = remote
    source = SourceConfig(name="cauldron", format="parquet", path=f"{root}/parquet")
    assert count_records(source, s3.storage_options) == 5
    import pyarrow.parquet as pq

    rows = pq.read_table(local / "parquet" / "train-00001.parquet").to_pylist()  # records 2 and 3
    record, sample = sample_of(source, 3, s3, proc)
    assert record.position == "row 1" and record.location.endswith("train-00001.parquet")
    assert record.images == [rows[1]["images"][0]["bytes"]]
    assert supervised_spans(sample, proc) == [t["assistant"] + "<|im_end|>" for t in rows[1]["texts"]]
    assert len(sample.images) == 1 and sample.image_grid_thw[0][0] == 1


def test_video_frames_sampled_at_fps_with_timestamps(remote, s3, proc):
    root, _ = remote
    url = f"{root}/videos/videos/00000.mp4"
    clip = media.decode_video(url, fps=2.0, max_frames=32, storage_options=s3.storage_options)
    assert clip.timestamps == [0.0, 0.5, 1.0, 1.5] and clip.fps == 2.0
    capped = media.decode_video(url, fps=2.0, max_frames=3, storage_options=s3.storage_options)
    assert len(capped.frames) == 3 and capped.fps == pytest.approx(1.5)
    assert capped.timestamps == pytest.approx([0, 2 / 3, 4 / 3])

    # the object crosses the 16 frames of the 8 fps video: frame k has it at k/15 of the way
    first = np.asarray(clip.frames[0]).astype(int)
    moving_right = _object_x(first) < 56
    for t, frame in zip(clip.timestamps, clip.frames):
        frac = round(t * 8) / 15
        expected = 12 + (frac if moving_right else 1 - frac) * (112 - 24)
        assert abs(_object_x(np.asarray(frame).astype(int)) - expected) <= 2

    source = SourceConfig(name="videos", format="llava", path=f"{root}/videos/videos.jsonl")
    _, sample = sample_of(source, 0, s3, proc)
    assert sample.video_grid_thw == [[2, 8, 8]]  # 4 frames in temporal pairs, 112 px / 14
    assert sample.second_per_grid_ts == [1.0]  # 2 frames per temporal patch at 2 fps
    assert sample.input_ids.count(proc.video_token_id) == 2 * 8 * 8 // 4
    example = example_from_row(pack_row([sample]), proc)
    ref = proc.preprocess_video([Image.open(io.BytesIO(f)) for f in sample.videos[0]], fps=2.0)
    assert torch.equal(example["pixel_values_videos"], ref["pixel_values_videos"])


def _object_x(frame: np.ndarray) -> float:
    """Column centre of the non-white pixels."""
    cols = np.where((frame.sum(-1) < 600).any(0))[0]
    return (cols.min() + cols.max() + 1) / 2


@pytest.mark.parametrize("kind", ["pdf", "folders"])
def test_documents_become_multi_image_samples(remote, s3, proc, kind):
    root, local = remote
    source = SourceConfig(name="docs", format="llava", path=f"{root}/{kind}/documents.jsonl")
    record, sample = sample_of(source, 1, s3, proc)
    assert len(sample.images) == 3
    pages = [Image.open(io.BytesIO(p)) for p in sample.images]
    # 224x288 pages fit 64 merged patches of 28 px: smart_resize gives 196x252
    assert all(p.size == (196, 252) for p in pages)
    assert sample.image_grid_thw == [[1, 18, 14]] * 3
    assert sample.input_ids.count(proc.image_token_id) == 3 * 18 * 14 // 4
    item = json.loads((local / kind / "documents.jsonl").read_text().splitlines()[1])
    assert supervised_spans(sample, proc)[0] == item["conversations"][1]["value"] + "<|im_end|>"
    # page order: the title asked about is drawn on that page, so pages must not be shuffled
    if kind == "folders":
        originals = [Image.open(local / kind / item["document"] / f"page{i}.png").convert("RGB").resize(
            (196, 252), Image.BICUBIC) for i in (1, 2, 3)]
        assert [np.asarray(p).tobytes() for p in pages] == [np.asarray(o).tobytes() for o in originals]


def test_a_video_or_document_without_its_reader_installed_stops_the_build_saying_what_to_install(tmp_path,
                                                                                                  monkeypatch):
    video = tmp_path / "clip.mp4"
    synthetic.write_video(video, [Image.new("RGB", (32, 32), (255, 0, 0))] * 4, fps=4)
    monkeypatch.setitem(__import__("sys").modules, "av", None)  # what `import av` meets without PyAV
    with pytest.raises(media.MissingMediaSupport, match=r"reading the video .*clip\.mp4 needs PyAV.*pip install av"):
        media.decode_video(str(video), fps=2.0, max_frames=4)
    with pytest.raises(media.MissingMediaSupport, match="WITH_MEDIA=1"):
        synthetic.write_video(tmp_path / "other.mp4", [Image.new("RGB", (32, 32))] * 2)
    monkeypatch.setitem(__import__("sys").modules, "pypdfium2", None)
    with pytest.raises(media.MissingMediaSupport, match=r"rendering the document x\.pdf needs pypdfium2"):
        media._render_pdf(b"%PDF-1.4", "x.pdf", 72.0, 2)
