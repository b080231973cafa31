"""The build: config checks, packing, mixing, determinism, skip on re-run, resume after a kill, Dask."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import s3fs
from pydantic import ValidationError

from pipeline import storage
from pipeline.data import synthetic
from pipeline.data.build import BuildConflict, build_corpus
from pipeline.data.config import CorpusConfig
from pipeline.data.mixing import mix, mix_size
from pipeline.data.packing import pack, utilization
from pipeline.data.shards import ShardReader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_SCRIPT = """
import json, sys
from pipeline.data.build import build_corpus
from pipeline.data.config import CorpusConfig

if __name__ == "__main__":
    config = CorpusConfig.model_validate_json(open(sys.argv[1]).read())
    build_corpus(config, json.loads(sys.argv[2]), progress=False)
"""


@pytest.fixture(scope="module")
def sources(s3, tmp_path_factory):
    local = tmp_path_factory.mktemp("mix")
    synthetic.write_llava(local / "pictures", 40, seed=11)
    synthetic.write_documents(local / "docs", 10, seed=12, pages=2)
    root = s3.fresh("mixsrc")
    s3fs.S3FileSystem(**s3.storage_options).put(str(local) + "/", root.removeprefix("s3://") + "/", recursive=True)
    return [{"name": "pictures", "format": "llava", "path": f"{root}/pictures/annotations.jsonl", "weight": 4},
            {"name": "docs", "format": "llava", "path": f"{root}/docs/documents.jsonl", "weight": 1}]


def make(sources, output, **kw) -> CorpusConfig:
    defaults = dict(name="mix", output=output, sources=sources, max_len=1024, max_pixels=28 * 28 * 16,
                    samples_per_shard=10, workers=2)
    return CorpusConfig(**{**defaults, **kw})


def shard_bytes(output: str, manifest: dict, options) -> list[bytes]:
    return [storage.read_bytes(f"{output}/{s['file']}", options) for s in manifest["shards"]]


# -- pure parts -------------------------------------------------------------------------------------------------
def test_bad_config_fails_naming_the_field():
    good = dict(name="x", output="/tmp/x", sources=[{"name": "a", "format": "llava", "path": "a.jsonl"}])
    cases = {"max_len": {"max_len": 0}, "samples_per_shard": {"samples_per_shard": 0},
             "sources.0.format": {"sources": [{"name": "a", "format": "csv", "path": "a"}]},
             "sources.0.weight": {"sources": [{"name": "a", "format": "llava", "path": "a", "weight": -1}]},
             "engine": {"engine": "spark"}, "colour": {"colour": "red"}}
    for field, change in cases.items():
        with pytest.raises(ValidationError) as err:
            CorpusConfig(**{**good, **change})
        assert field in str(err.value), field
    with pytest.raises(ValidationError, match="repeated"):
        CorpusConfig(**{**good, "sources": good["sources"] * 2})


def test_first_fit_decreasing_by_hand():
    # longest first (ties by index): 7 (#1) opens A, 6 (#3) opens B, 5 (#4) opens C, 3 (#0) fills A to 10,
    # 3 (#5) brings B to 9, 2 (#2) goes to C (7), 1 (#6) fills B to 10
    assert pack([3, 7, 2, 6, 5, 3, 1], 10) == [[0, 1], [3, 5, 6], [2, 4]]
    assert utilization([3, 7, 2, 6, 5, 3, 1], pack([3, 7, 2, 6, 5, 3, 1], 10), 10) == pytest.approx(27 / 30)
    with pytest.raises(ValueError):
        pack([11], 10)


def test_mix_follows_the_weights_in_every_prefix():
    picks = mix([100, 30], [4, 1], None, seed=0)
    assert len(picks) == mix_size([100, 30], [4, 1]) == 125  # the 100 pictures run out first at 4:1
    for n in (5, 10, 50, 125):
        assert Counter(p.source for p in picks[:n]) == {0: 4 * n // 5, 1: n // 5}
    assert len({(p.source, p.index) for p in picks}) == 125  # nothing repeats
    more = mix([10, 3], [1, 1], 20, seed=0)  # more than the small source holds: it cycles, newly shuffled
    small = [(p.index, p.epoch) for p in more if p.source == 1]
    assert sorted(small) == sorted([(i, e) for e in range(3) for i in range(3)] + [(small[-1][0], 3)])
    assert mix([10, 3], [1, 1], 20, seed=0) == more and mix([10, 3], [1, 1], 20, seed=1) != more


# -- builds on S3 -----------------------------------------------------------------------------------------------
def test_build_is_deterministic_mixed_and_skips_when_done(s3, sources):
    a, b = s3.fresh("a"), s3.fresh("b")
    manifest = build_corpus(make(sources, a), s3.storage_options, progress=False)
    # 10 documents at weight 1 against 40 pictures at weight 4: 50 samples, in shards of 10 at 8:2
    assert manifest["records"] == manifest["samples"] == 50
    assert {k: v["samples"] for k, v in manifest["per_source"].items()} == {"pictures": 40, "docs": 10}
    assert len(manifest["shards"]) == 5
    for shard in manifest["shards"]:
        reader = ShardReader(f"{a}/{shard['file']}", s3.storage_options)
        ids = [sid for i in range(len(reader)) for sid in reader.row(i)["sample_ids"]]
        assert Counter(x.split(":")[0] for x in ids) == {"pictures": 8, "docs": 2}
        for i in range(len(reader)):
            row = reader.row(i)
            assert len(row["input_ids"]) == sum(row["doc_lens"]) <= 1024
    # same config, another output, another worker count: the same bytes
    again = build_corpus(make(sources, b, workers=1), s3.storage_options, progress=False)
    assert again["config_hash"] == manifest["config_hash"]
    assert shard_bytes(a, manifest, s3.storage_options) == shard_bytes(b, again, s3.storage_options)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]

    # a re-run does no work: it returns the manifest even once the input is gone
    fs = s3fs.S3FileSystem(**s3.storage_options)
    copy = s3.fresh("copy")
    fs.copy(sources[1]["path"].removeprefix("s3://"), copy.removeprefix("s3://") + "/documents.jsonl")
    own = [sources[0], dict(sources[1], path=copy + "/documents.jsonl",
                            media_root=sources[1]["path"].rsplit("/", 1)[0])]
    c = s3.fresh("c")
    first = build_corpus(make(own, c), s3.storage_options, progress=False)
    fs.rm(copy.removeprefix("s3://"), recursive=True)
    assert build_corpus(make(own, c), s3.storage_options, progress=False) == first
    with pytest.raises(BuildConflict):
        build_corpus(make(sources, a, max_len=2048), s3.storage_options, progress=False)


def test_killed_build_resumes_at_the_first_unfinished_shard(s3, sources, tmp_path):
    out = s3.fresh("killed")
    cfg = make(sources, out, workers=1, samples_per_shard=5)
    ref_cfg = make(sources, s3.fresh("ref5"), samples_per_shard=5)
    reference = build_corpus(ref_cfg, s3.storage_options, progress=False)
    (tmp_path / "config.json").write_text(cfg.model_dump_json())
    proc = subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(tmp_path / "config.json"),
                             json.dumps(s3.storage_options)], cwd=ROOT, start_new_session=True)
    markers = []
    try:
        deadline = time.monotonic() + 120
        while len(markers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            markers = storage.list_files(f"{out}/shards", s3.storage_options, suffix=".done.json")
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 2 <= len(markers) < 10, "the build should have been killed between shards"
    assert not storage.exists(f"{out}/manifest.json", s3.storage_options)
    before = {u: storage.read_json(u, s3.storage_options) for u in markers}

    resumed = build_corpus(cfg, s3.storage_options, progress=False)
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert shard_bytes(out, resumed, s3.storage_options) == shard_bytes(ref_cfg.output, reference, s3.storage_options)
    for url, marker in before.items():  # committed shards were kept, not rebuilt
        assert storage.read_json(url, s3.storage_options) == marker


def test_a_build_with_fewer_shards_than_workers_says_how_many_stay_idle(s3, sources, caplog):
    caplog.set_level("WARNING", logger="pipeline.data.build")
    manifest = build_corpus(make(sources, s3.fresh("idle"), workers=8, samples_per_shard=25), s3.storage_options,
                            progress=False)
    assert len(manifest["shards"]) == 2
    assert "2 shards to build for 8 workers, so 6 stay idle; fewer samples a shard (now 25" in caplog.text


@pytest.fixture(scope="module")
def base(s3, sources):
    """The default engine's build, to compare the others with."""
    return build_corpus(make(sources, s3.fresh("proc")), s3.storage_options, progress=False)


def test_dask_cluster_of_two_workers_gives_the_same_bytes(s3, sources, base):
    out = s3.fresh("dask")
    dask = build_corpus(make(sources, out, engine="dask", workers=2), s3.storage_options, progress=False)
    assert [s["sha256"] for s in dask["shards"]] == [s["sha256"] for s in base["shards"]]
    assert all(hashlib.sha256(b).hexdigest() == s["sha256"] for b, s in zip(shard_bytes(out, dask, s3.storage_options),
                                                                 dask["shards"]))


@pytest.mark.slow
def test_prefect_dask_task_runner_gives_the_same_bytes(s3, sources, base, prefect_server, tmp_path):
    # in a child process, so Prefect's in-process log and event workers end with it, not at pytest's exit
    cfg = make(sources, s3.fresh("prefect"), engine="prefect-dask", workers=2)
    (tmp_path / "config.json").write_text(cfg.model_dump_json())
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_LOGGING_LEVEL": "WARNING"}
    subprocess.run([sys.executable, "-c", BUILD_SCRIPT, str(tmp_path / "config.json"), json.dumps(s3.storage_options)],
                   cwd=ROOT, env=env, check=True, timeout=240)
    flow = storage.read_json(f"{cfg.output}/manifest.json", s3.storage_options)
    assert [s["sha256"] for s in flow["shards"]] == [s["sha256"] for s in base["shards"]]


def test_the_processor_fingerprint_ignores_padding_state_and_sees_the_vocabulary():
    """A padded batch enables padding on a shared tokenizer; that changes no token of a corpus, so the check that
    shards and teacher share a processor must not fail on it. A changed vocabulary or template still shows."""
    from model.tiny import build_processor, build_tokenizer
    from model.processing import InfiniteVLProcessor
    from pipeline.data.tokenize import processor_fingerprint

    processor = build_processor()
    before = processor_fingerprint(processor)
    processor.tokenizer.backend_tokenizer.enable_padding(pad_id=0, direction="left")
    processor.tokenizer.backend_tokenizer.enable_truncation(128)
    assert processor_fingerprint(processor) == before
    other = InfiniteVLProcessor(build_tokenizer(vocab_size=400), processor.image_processor)
    assert processor_fingerprint(other) != before
