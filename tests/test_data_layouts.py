"""The paper's datasets in their published layouts, on a real S3 server, through the data build and the
run's data stage. The references are the files themselves, read with pyarrow and json."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from PIL import Image

from pipeline import storage
from pipeline.config import load_config
from pipeline.data import layouts
from pipeline.data.build import build_corpus
from pipeline.data.config import CorpusConfig, SourceConfig
from pipeline.data.loader import example_from_row
from pipeline.data.shards import ShardReader, pack_row
from pipeline.data.sources import count_records, read_record
from pipeline.data.stage import build_corpora
from pipeline.data.tokenize import IGNORE_INDEX, load_processor, tokenize_record
from pipeline.stages import StageContext

MAX_PX = 28 * 28 * 64


@pytest.fixture(scope="module")
def proc():
    return load_processor("tiny")


@pytest.fixture(scope="module")
def published(s3, tmp_path_factory):
    """The four layouts, small, written locally and uploaded; returns (s3 root, local root)."""
    local = tmp_path_factory.mktemp("published")
    layouts.write_finevision(local, {"CoSyn_400k_chart": 6, "ai2d_merged": 4, "text_openhermes_2_5": 3}, seed=1,
                             rows_per_file=4, row_group_size=2)
    layouts.write_onevision(local, {"CLEVR-Math(MathV360K)": 5, "magpie_pro(l3_80b_mt)": 2}, seed=2)
    layouts.write_llava15(local, 8, seed=3)
    layouts.write_llava_video(local, {"0_30_s_academic_v0_1": 2, "0_30_s_youtube_v0_1": 2}, seed=4)
    root = s3.fresh("published")
    s3fs.S3FileSystem(**s3.storage_options).put(str(local) + "/", root.removeprefix("s3://") + "/", recursive=True)
    return root, local


def sample_of(source: SourceConfig, index: int, s3, proc, **kw):
    config = CorpusConfig(name="t", output="unused", sources=[source], max_pixels=MAX_PX, **kw)
    record = read_record(source, index, s3.storage_options)
    return record, tokenize_record(record, source, config, proc, record.name, s3.storage_options)


def supervised(sample, proc) -> list[str]:
    """The decoded runs of supervised tokens (each must be the token itself)."""
    spans, run = [], []
    for tok, lab in zip(sample.input_ids + [None], sample.labels + [IGNORE_INDEX]):
        if lab != IGNORE_INDEX:
            assert lab == tok
            run.append(tok)
        elif run:
            spans.append(proc.tokenizer.decode(run))
            run = []
    return spans


def test_finevision(published, s3, proc):
    root, local = published
    source = SourceConfig(path=f"{root}/FineVision")
    assert (source.name, source.format) == ("FineVision", "parquet")
    assert count_records(source, s3.storage_options) == 13
    # files in sorted (byte) order: CoSyn_400k_chart (4 + 2 rows), ai2d_merged (4), text_openhermes_2_5 (3)
    reference = pq.read_table(local / "FineVision/CoSyn_400k_chart/train-00001-of-00002.parquet").to_pylist()[1]
    record, sample = sample_of(source, 4 + 1, s3, proc)
    assert record.name == "CoSyn_400k_chart/train-00001-of-00002.parquet:1" and record.position == "row 1"
    assert record.images == [reference["images"][0]["bytes"]]
    assert record.turns == [t for turn in reference["texts"] for t in (("user", turn["user"]),
                                                                        ("assistant", turn["assistant"]))]
    assert supervised(sample, proc) == [t["assistant"] + "<|im_end|>" for t in reference["texts"]]
    size = Image.open(io.BytesIO(reference["images"][0]["bytes"])).size
    assert sample.images == [reference["images"][0]["bytes"]] and sample.image_grid_thw[0][0] == 1  # as published
    assert sample.input_ids.count(proc.image_token_id) == sample.image_grid_thw[0][1] * sample.image_grid_thw[0][2] // 4
    assert size  # a readable image

    text_only = pq.read_table(local / "FineVision/text_openhermes_2_5/train-00000-of-00001.parquet").to_pylist()[2]
    record, sample = sample_of(source, 12, s3, proc)
    assert record.images == [] and sample.images == [] and proc.image_token_id not in sample.input_ids
    assert supervised(sample, proc) == [text_only["texts"][0]["assistant"] + "<|im_end|>"]


def test_llava_onevision(published, s3, proc):
    root, local = published
    source = SourceConfig(path=f"{root}/LLaVA-OneVision-Data", format="llava-parquet")
    assert count_records(source, s3.storage_options) == 7
    rows = pq.read_table(local / "LLaVA-OneVision-Data/CLEVR-Math(MathV360K)/train-00000-of-00001.parquet").to_pylist()
    record, sample = sample_of(source, 3, s3, proc)
    assert record.name == rows[3]["id"] and record.images == [rows[3]["image"]["bytes"]]
    assert supervised(sample, proc) == [t["value"] + "<|im_end|>" for t in rows[3]["conversations"]
                                        if t["from"] == "gpt"]
    # the image sits where the conversation's <image> was
    text = proc.tokenizer.decode(sample.input_ids)
    assert "<|vision_start|><|image_pad|>" in text and "<|vision_end|>\n" + rows[3]["conversations"][0]["value"].split(
        "\n", 1)[1] in text
    record, sample = sample_of(source, 6, s3, proc)  # magpie: image null
    assert record.images == [] and sample.images == []

    # the FineVision reader on this layout fails at once, saying which format reads it
    with pytest.raises(ValueError, match="no column 'images', 'texts'.*llava-parquet"):
        count_records(SourceConfig(path=f"{root}/LLaVA-OneVision-Data"), s3.storage_options)


def test_llava_1_5(published, s3, proc):
    root, local = published
    source = SourceConfig(path=f"{root}/llava_v1_5_mix665k.json")
    items = json.loads((local / "llava_v1_5_mix665k.json").read_text())
    assert count_records(source, s3.storage_options) == len(items) == 8
    opens = [n + 1 for n, line in enumerate((local / "llava_v1_5_mix665k.json").read_text().split("\n"))
             if line == "  {"]
    for i in (1, 3):  # an image record, a text-only one
        record, sample = sample_of(source, i, s3, proc)
        assert record.name == items[i]["id"] and record.position == f"item {i} (line {opens[i]})"
        assert record.images == ([f"{root}/{items[i]['image']}"] if "image" in items[i] else [])
        assert len(sample.images) == len(record.images)
        assert supervised(sample, proc) == [t["value"] + "<|im_end|>" for t in items[i]["conversations"]
                                            if t["from"] == "gpt"]
    # a COCO JPEG stored as published, its grid from its size
    record, sample = sample_of(source, 0, s3, proc)
    original = (local / items[0]["image"]).read_bytes()
    assert sample.images == [original]
    example = example_from_row(pack_row([sample]), proc)
    ref = proc.preprocess_images([Image.open(io.BytesIO(original)).convert("RGB")], max_pixels=MAX_PX)
    assert example["pixel_values"].shape == ref["pixel_values"].shape
    assert (example["pixel_values"] - ref["pixel_values"]).abs().max() < 1e-5


def test_llava_video_178k(published, s3, proc):
    root, local = published
    source = SourceConfig(path=f"{root}/LLaVA-Video-178K/*/*.json", max_frames=4)
    assert (source.name, source.format) == ("LLaVA-Video-178K", "llava")
    assert count_records(source, s3.storage_options) == 12  # 2 subsets x 3 kinds x 2 videos
    # sorted files: academic mc, oe, cap(v0_1_cap), then youtube
    subset = local / "LLaVA-Video-178K/0_30_s_academic_v0_1"
    files = sorted(p.name for p in subset.glob("*.json"))
    oe = json.loads((subset / "0_30_s_academic_oe_v0_1_qa_processed.json").read_text())
    index = 2 * files.index("0_30_s_academic_oe_v0_1_qa_processed.json")
    record, sample = sample_of(source, index, s3, proc)
    item = oe[0]
    assert record.name == item["id"] and item["conversations"][0]["value"].startswith("<image>\n")
    assert record.video == f"{root}/LLaVA-Video-178K/0_30_s_academic_v0_1/{item['video']}"
    assert record.turns[0] == ("human", item["conversations"][0]["value"].replace("<image>", "<video>"))
    assert len(record.turns) == 4  # open-ended: two questions on one video
    assert supervised(sample, proc) == [t["value"] + "<|im_end|>" for t in item["conversations"] if t["from"] == "gpt"]
    assert len(sample.videos) == 1 and len(sample.videos[0]) == 4 and sample.video_grid_thw[0][0] == 2
    assert sample.input_ids.count(proc.video_token_id) == 2 * 8 * 8 // 4

    youtube = json.loads((local / "LLaVA-Video-178K/0_30_s_youtube_v0_1/0_30_s_youtube_mc_v0_1_qa_processed.json")
                         .read_text())
    record, sample = sample_of(source, 6, s3, proc)  # the youtube subset's first file: multiple choice
    assert record.name == youtube[0]["id"]
    assert record.video.endswith(f"0_30_s_youtube_v0_1/{youtube[0]['video']}")
    assert youtube[0]["video"].startswith("liwei_youtube_videos/videos/youtube_video_2024/ytb_")
    assert supervised(sample, proc) == [youtube[0]["conversations"][1]["value"] + "<|im_end|>"]


@pytest.mark.usefixtures("s3_env")
def test_the_run_config_names_the_datasets_and_mixes_stage_two_into_stage_three(published, s3, tmp_path, processor):
    root, local = published
    run = s3.fresh("run")
    processor.save_pretrained(str(tmp_path / "teacher"))
    s3fs.S3FileSystem(**s3.storage_options).put(str(tmp_path / "teacher") + "/",
                                                run.removeprefix("s3://") + "/teacher/", recursive=True)
    instruct = (f"[{root}/FineVision, {{path: {root}/LLaVA-OneVision-Data, format: llava-parquet}}, "
                f"{{path: {root}/llava_v1_5_mix665k.json, name: llava15, weight: 0.5}}]")
    config = load_config("configs/tiny.yaml", [
        "data.distill.max_samples=8", f"data.instruct.sources={instruct}", "data.instruct.max_samples=null",
        f"data.long.sources=[{{path: '{root}/LLaVA-Video-178K/*/*.json', max_frames: 4}}]",
        "data.long.mix={instruct: 0.2}", "data.long.max_samples=10"])
    ctx = StageContext(name="data", config=config, output=f"{run}/data", inputs={"teacher": f"{run}/teacher"},
                       log=logging.getLogger("test"))
    metrics = build_corpora(ctx)

    manifest = storage.read_json(f"{run}/data/instruct/manifest.json")
    assert manifest["quarantined"] == 0
    # the 7 OneVision records bound the mix at weights 1 : 1 : 0.5 (no record repeats): 17 samples, 7 : 7 : 3
    assert {k: (v["available"], v["samples"]) for k, v in manifest["per_source"].items()} == {
        "FineVision": (13, 7), "LLaVA-OneVision-Data": (7, 7), "llava15": (8, 3)}
    # every record in the shards under its own id (FineVision's: file and row), none twice
    ids = Counter(sid for s in manifest["shards"] for sid in _sample_ids(f"{run}/data/instruct", s))
    onevision = [r["id"] for p in sorted((local / "LLaVA-OneVision-Data").glob("*/*.parquet"))
                 for r in pq.read_table(p).to_pylist()]
    finevision = [f"{p.parent.name}/{p.name}:{row}" for p in sorted((local / "FineVision").glob("*/*.parquet"))
                  for row in range(pq.read_metadata(p).num_rows)]
    llava = [r["id"] for r in json.loads((local / "llava_v1_5_mix665k.json").read_text())]
    assert set(ids.values()) == {1} and sum(ids.values()) == 17
    assert {i for i in ids if i.startswith("LLaVA-OneVision-Data:")} == {f"LLaVA-OneVision-Data:{i}" for i in onevision}
    assert {i.split(":", 1)[1] for i in ids if i.startswith("FineVision:")} < set(finevision)
    assert {i.split(":", 1)[1] for i in ids if i.startswith("llava15:")} < set(llava)

    long = storage.read_json(f"{run}/data/long/manifest.json")
    # 4 parts video to 1 part Stage II data, its sources weighted as in Stage II (2:2:1)
    counts = {k: v["samples"] for k, v in long["per_source"].items()}
    assert counts == {"LLaVA-Video-178K": 8, "instruct.FineVision": 1, "instruct.LLaVA-OneVision-Data": 1,
                      "instruct.llava15": 0}
    assert long["config"]["sources"][1]["max_pixels"] == config.data.instruct.max_pixels
    assert metrics["long_samples"] == 10 and metrics["long_quarantined"] == 0
    s3fs.S3FileSystem.clear_instance_cache()


def _sample_ids(output: str, shard: dict) -> list[str]:
    reader = ShardReader(f"{output}/{shard['file']}")
    try:
        return [sid for i in range(len(reader)) for sid in reader.row(i)["sample_ids"]]
    finally:
        reader.close()


def test_a_cut_image_is_set_aside_naming_its_row_its_id_and_the_decoders_words(tmp_path):
    """A JPEG cut short passes a header read; the build decodes it once (at 1/8 scale) and finds it out."""
    base = layouts.write_onevision(tmp_path, {"CLEVR-Math(MathV360K)": 4}, seed=5, sizes=[(448, 448)])
    path = base / "CLEVR-Math(MathV360K)/train-00000-of-00001.parquet"
    rows = pq.read_table(path).to_pylist()
    whole = rows[2]["image"]["bytes"]
    rows[2]["image"]["bytes"] = whole[:len(whole) * 2 // 3]
    assert Image.open(io.BytesIO(rows[2]["image"]["bytes"])).size == (448, 448)  # the header is intact
    pq.write_table(pa.Table.from_pylist(rows, schema=layouts.onevision_schema()), path)
    out = tmp_path / "out"
    manifest = build_corpus(CorpusConfig(name="cut", output=str(out), max_pixels=MAX_PX, workers=1,
                                         max_quarantine_rate=0.5,
                                         sources=[{"path": str(base), "format": "llava-parquet"}]), progress=False)
    assert manifest["samples"] == 3 and manifest["quarantine_reasons"] == {"unreadable image": 1}
    entry = json.loads((out / "shards/shard-00000.quarantine.jsonl").read_text())
    assert entry["location"] == str(path) and entry["position"] == "row 2" and entry["record_id"] == rows[2]["id"]
    assert "image file is truncated" in entry["reason"]
