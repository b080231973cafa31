"""Bad input is quarantined with source, line/row and reason, counted, and never stops the build."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter

import pytest
import s3fs
from PIL import Image

from pipeline import storage
from pipeline.data.build import build_corpus
from pipeline.data.config import CorpusConfig
from pipeline.data.quarantine import QuarantineRateExceeded


def bad_jsonl(local) -> list[str]:
    """A JSONL file: a good record on line 1, then one of each kind of bad input."""
    (local / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(local / "images" / "ok.png")
    Image.new("RGB", (1000, 10), "red").save(local / "images" / "wide.png")
    (local / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    ok = [{"from": "human", "value": "<image>\nwhat color is it?"}, {"from": "gpt", "value": "red"}]
    lines = [
        json.dumps({"image": "images/ok.png", "conversations": ok}),                      # 1 good
        json.dumps({"image": "images/missing.png", "conversations": ok}),                 # 2 missing image
        json.dumps({"image": "images/broken.png", "conversations": ok}),                  # 3 unreadable image
        '{"image": "images/ok.png", "conversations": [',                                  # 4 broken JSON
        json.dumps({"image": "images/ok.png", "conversations": []}),                      # 5 empty conversation
        json.dumps({"image": "images/ok.png", "conversations": [
            {"from": "human", "value": "<image>\nhi"}, {"from": "robot", "value": "beep"}]}),  # 6 wrong role
        json.dumps({"image": "images/ok.png", "conversations": [
            {"from": "human", "value": "<image>\n" + "count the red shapes " * 200},
            {"from": "gpt", "value": "one"}]}),                                           # 7 overflows max_len
        json.dumps({"image": "images/wide.png", "conversations": ok}),                    # 8 absurd aspect ratio
        json.dumps({"conversations": [{"from": "gpt", "value": "red"}]}),                 # 9 wrong roles (order)
        json.dumps({"image": "images/ok.png", "conversations": ok}),                      # 10 good
        json.dumps({"image": "images/ok.png", "conversations": ok + [
            {"from": "human", "value": "and now?"}]}),                                   # 11 ends on a user turn
        json.dumps({"image": "images/ok.png", "conversations": [
            ok[0], {"from": "gpt", "value": " \n"}, {"from": "human", "value": "and now?"},
            {"from": "gpt", "value": "red"}]}),                                          # 12 an empty answer
        json.dumps({"image": "images/ok.png", "conversations": [
            {"from": "system", "value": "Be brief."}, *ok, {"from": "human", "value": "sure?"},
            {"from": "gpt", "value": "yes"}]}),                                          # 13 good: system + 2 rounds
    ]
    (local / "data.jsonl").write_text("\n".join(lines) + "\n")
    return lines


EXPECTED = {
    "line 2": "missing image", "line 3": "unreadable image", "line 4": "broken JSON",
    "line 5": "empty or malformed conversation", "line 6": "wrong role",
    "line 7": "sample overflows max_len", "line 8": "absurd aspect ratio", "line 9": "wrong roles",
    "line 11": "wrong roles", "line 12": "empty or malformed conversation",
}
# the particulars that tell the two conversations that only look complete from the other bad ones
PARTICULARS = {"line 11": "does not end with an assistant turn", "line 12": "an assistant turn is empty"}


@pytest.fixture(scope="module")
def bad_source(s3, tmp_path_factory):
    local = tmp_path_factory.mktemp("bad")
    bad_jsonl(local)
    root = s3.fresh("bad")
    s3fs.S3FileSystem(**s3.storage_options).put(str(local) + "/", root.removeprefix("s3://") + "/", recursive=True)
    return root


def config(source_url: str, output: str, **kw) -> CorpusConfig:
    return CorpusConfig(name="bad", output=output, sources=[{"name": "bad", "format": "llava", "path": source_url}],
                        max_len=512, max_pixels=28 * 28 * 16, samples_per_shard=4, workers=1, **kw)


def test_every_kind_of_bad_input_is_quarantined_and_counted(s3, bad_source, caplog):
    out = s3.fresh("out")
    with caplog.at_level(logging.INFO):
        manifest = build_corpus(config(f"{bad_source}/data.jsonl", out, max_quarantine_rate=0.9),
                                s3.storage_options, progress=False)
    assert manifest["records"] == 13 and manifest["samples"] == 3 and manifest["quarantined"] == 10
    assert manifest["per_source"]["bad"] == {"available": 13, "records": 13, "samples": 3, "quarantined": 10}
    assert manifest["quarantine_reasons"] == dict(Counter(EXPECTED.values()))
    entries = []
    for shard in manifest["shards"]:
        text = storage.read_bytes(f"{out}/{shard['file'].replace('.arrow', '.quarantine.jsonl')}",
                                  s3.storage_options).decode()
        entries += [json.loads(x) for x in text.splitlines()]
    found = {e["position"]: e["reason"] for e in entries}
    assert sorted(found) == sorted(EXPECTED)
    for position, kind in EXPECTED.items():
        assert found[position].startswith(kind), (position, found[position])
    for position, particular in PARTICULARS.items():
        assert particular in found[position], (position, found[position])
    assert all(e["source"] == "bad" and e["location"] == f"{bad_source}/data.jsonl" for e in entries)
    assert "images/missing.png" in found["line 2"]
    # credentials stay out of everything the build wrote or logged
    everything = json.dumps(manifest) + json.dumps(entries) + caplog.text
    assert s3.secret not in everything and s3.key not in everything


def test_too_much_bad_input_fails_with_the_top_reasons(s3, bad_source):
    out = s3.fresh("out")
    with pytest.raises(QuarantineRateExceeded) as err:
        build_corpus(config(f"{bad_source}/data.jsonl", out, max_quarantine_rate=0.5), s3.storage_options,
                     progress=False)
    message = str(err.value)
    assert "10 of 13 records (76.9%)" in message and "50.0%" in message
    assert "missing image" in message and "quarantine.jsonl" in message
    assert not storage.exists(f"{out}/manifest.json", s3.storage_options)  # no manifest for a failed build


def test_credentials_never_appear_in_errors(s3, tmp_path):
    options = dict(s3.storage_options, secret="wrong-" + s3.secret[:12])
    leaked = options["secret"]
    with pytest.raises(OSError) as err:
        storage.read_bytes(s3.url("nothing-here"), options)
    assert leaked not in str(err.value) and s3.key not in str(err.value)
    assert storage.redact(f"key={s3.key} secret={leaked}", options) == "key=*** secret=***"
    assert leaked not in json.dumps(storage.public_options(options))


def test_missing_image_in_a_parquet_row(s3, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    Image.new("RGB", (56, 56), "blue").save(buf, format="PNG")
    rows = [{"images": [{"bytes": buf.getvalue(), "path": "a.png"}], "texts": [{"user": "color?", "assistant": "blue"}]},
            {"images": [{"bytes": None, "path": "b.png"}], "texts": [{"user": "color?", "assistant": "blue"}]},
            {"images": [{"bytes": buf.getvalue(), "path": "c.png"}], "texts": []}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    src = s3.fresh("pq") + "/rows.parquet"
    storage.write_bytes(src, (tmp_path / "rows.parquet").read_bytes(), s3.storage_options)
    cfg = CorpusConfig(name="pq", output=s3.fresh("out"), max_len=512, max_pixels=28 * 28 * 16, workers=1,
                       max_quarantine_rate=1.0, sources=[{"name": "pq", "format": "parquet", "path": src}])
    manifest = build_corpus(cfg, s3.storage_options, progress=False)
    assert manifest["samples"] == 1
    assert manifest["quarantine_reasons"] == {"empty or malformed conversation": 1, "missing image": 1}
