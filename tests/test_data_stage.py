"""The run's data stage on S3 with credentials from the environment, as the flows call it."""

from __future__ import annotations

import logging

import pytest
import s3fs

from pipeline import storage
from pipeline.config import load_config
from pipeline.data.loader import PackedLoader
from pipeline.data.stage import build_corpora
from pipeline.stages import StageContext


@pytest.mark.usefixtures("s3_env")
def test_tiny_run_builds_three_corpora_on_s3(s3, tmp_path, processor):
    root = s3.fresh("run")
    processor.save_pretrained(str(tmp_path / "teacher"))
    s3fs.S3FileSystem(**s3.storage_options).put(str(tmp_path / "teacher") + "/", root.removeprefix("s3://") + "/teacher/",
                                                recursive=True)
    config = load_config("configs/tiny.yaml", ["data.distill.max_samples=64", "data.instruct.max_samples=64"])
    ctx = StageContext(name="data", config=config, output=f"{root}/data", inputs={"teacher": f"{root}/teacher"},
                       log=logging.getLogger("test"))
    metrics = build_corpora(ctx)
    assert metrics["distill_samples"] == config.data.distill.max_samples
    assert metrics["long_samples"] == config.data.long.max_samples
    for corpus in ("distill", "instruct", "long"):
        manifest = storage.read_json(f"{root}/data/{corpus}/manifest.json")
        assert manifest["quarantined"] == 0 and manifest["max_len"] == getattr(config.data, corpus).seq_len
        assert s3.secret not in str(manifest)
    long = PackedLoader(f"{root}/data/long/manifest.json", processor, num_workers=0)
    batch = next(iter(long))
    assert "pixel_values_videos" in batch or "pixel_values" in batch
    assert build_corpora(ctx) == metrics  # committed corpora are not rebuilt
