"""Annotation files as crawled data comes: bad bytes, line separators inside strings, a BOM, CRLF, blank
lines, arrays too large to hold; and the chat template found where transformers saved it."""

from __future__ import annotations

import json
import os
import random
import shutil

import jinja2
import pytest
import s3fs
from PIL import Image

from pipeline import storage
from pipeline.data import jsonfile
from pipeline.data.build import build_corpus
from pipeline.data.config import CorpusConfig, SourceConfig
from pipeline.data.quarantine import BadRecord
from pipeline.data.shards import ShardReader
from pipeline.data.sources import read_record
from pipeline.data.templates import ChatTemplateError
from pipeline.data.tokenize import load_processor, tokenize_record


def record(rid: str, answer: str = "red", question: str = "what color is it?") -> dict:
    return {"id": rid, "image": "red.png", "conversations": [
        {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


def dirty_jsonl() -> tuple[bytes, dict]:
    """A JSONL file as bytes, and what each of its lines should become (by line number)."""
    line = {k: json.dumps(v, ensure_ascii=False).encode() for k, v in {
        "a": record("a"),
        # U+2028 and U+0085 inside a string: str.splitlines() would cut this record in three
        "b": record("b", question="what color\u2028is it?\u0085"),
        "d": record("d", answer="red"),
        "g": record("g"),
    }.items()}
    bad_bytes = json.dumps(record("c", answer="r\u00e9d"), ensure_ascii=False).encode().replace(b"\xc3\xa9", b"\xe9")
    surrogate = json.dumps(record("f", answer="red \ud83d")).encode()  # an escape whose pair is missing
    lines = [
        b"\xef\xbb\xbf" + line["a"] + b"\r\n",   # 1 BOM, CRLF
        line["b"] + b"\r\n",                      # 2 line separators inside a string
        b"\r\n",                                  # 3 blank
        b"   \t\n",                               # 4 blank
        bad_bytes + b"\n",                        # 5 Latin-1 é: not UTF-8
        line["d"] + b"\n",                        # 6
        b'{"id": "e", "conversations": [\n',      # 7 broken JSON
        surrogate + b"\n",                        # 8 a lone surrogate
        line["g"],                                # 9 no newline at the end
    ]
    latin_at = bad_bytes.index(b"\xe9")  # the byte, counted from the start of its line
    expect = {
        "kept": {1: "a", 2: "b", 6: "d", 9: "g"},
        "bad": {5: ("c", f"not UTF-8 at byte {latin_at} "), 7: (None, "broken JSON"),
                8: ("f", "not UTF-8: a lone surrogate")},
    }
    return b"".join(lines), expect


@pytest.fixture(scope="module")
def dirty(s3, tmp_path_factory):
    local = tmp_path_factory.mktemp("dirty")
    Image.new("RGB", (56, 56), "red").save(local / "red.png")
    data, expect = dirty_jsonl()
    (local / "dirty.jsonl").write_bytes(data)
    root = s3.fresh("dirty")
    s3fs.S3FileSystem(**s3.storage_options).put(str(local) + "/", root.removeprefix("s3://") + "/", recursive=True)
    return root, expect, data


def test_dirty_jsonl_keeps_every_good_line_and_names_each_bad_one(s3, dirty):
    root, expect, data = dirty
    url = f"{root}/dirty.jsonl"
    index = jsonfile.index_file(url, s3.storage_options)
    # blank lines are no records; the line numbers are the file's own
    assert [int(n) for n in index.lines] == sorted({**expect["kept"], **expect["bad"]})
    source = SourceConfig(name="dirty", path=url)
    second = read_record(source, 1, s3.storage_options)
    assert second.position == "line 2" and second.turns[0][1] == "<image>\nwhat color\u2028is it?\u0085"

    out = s3.fresh("dirty-out")
    manifest = build_corpus(CorpusConfig(name="dirty", output=out, sources=[source], max_len=512,
                                         max_pixels=28 * 28 * 16, workers=1, max_quarantine_rate=0.5),
                            s3.storage_options, progress=False)
    assert manifest["records"] == 7 and manifest["samples"] == 4 and manifest["quarantined"] == 3
    assert manifest["quarantine_reasons"] == {"broken JSON": 1, "not UTF-8": 2}
    entries = [json.loads(x) for s in manifest["shards"] for x in storage.read_bytes(
        f"{out}/{s['file'].replace('.arrow', '.quarantine.jsonl')}", s3.storage_options).decode().splitlines()]
    assert sorted(e["position"] for e in entries) == [f"line {n}" for n in sorted(expect["bad"])]
    for e in entries:
        rid, reason = expect["bad"][int(e["position"].split()[1])]
        assert e["location"] == url and e["record_id"] == rid and e["reason"].startswith(reason), e
    latin = next(e for e in entries if e["position"] == "line 5")["reason"]
    assert "invalid continuation byte" in latin  # the decoder's own words
    # the shards carry each kept record under its own id
    ids = sorted(sid for s in manifest["shards"] for row in _rows(f"{out}/{s['file']}", s3)
                 for sid in row["sample_ids"])
    assert ids == [f"dirty:{rid}" for rid in sorted(expect["kept"].values())]


def _rows(url: str, s3):
    reader = ShardReader(url, s3.storage_options)
    try:
        return [reader.row(i) for i in range(len(reader))]
    finally:
        reader.close()


def test_a_json_array_names_items_by_index_and_line_and_keeps_the_rest(tmp_path):
    records = [record(f"r{i}") for i in range(5)]
    text = json.dumps(records, indent=2).encode()
    bad = text.replace(b'"r2"', b'"r2", "note": "caf\xe9"')  # a Latin-1 byte in item 2
    (tmp_path / "list.json").write_bytes(b"\xef\xbb\xbf" + bad.replace(b"\n", b"\r\n"))
    index = jsonfile.index_file(str(tmp_path / "list.json"))
    lines = (b"\xef\xbb\xbf" + bad).split(b"\n")
    starts = [n + 1 for n, ln in enumerate(lines) if ln == b"  {"]  # where each item opens, by hand
    assert [index.position(i) for i in range(5)] == [f"item {i} (line {starts[i]})" for i in range(5)]
    file = jsonfile.RecordFile(index)
    assert [file.record(i)["id"] for i in (0, 1, 3, 4)] == ["r0", "r1", "r3", "r4"]
    with pytest.raises(BadRecord, match="not UTF-8 at byte") as err:
        file.record(2, "id")
    assert err.value.record_id == "r2"

    # an array cut short: the items before the cut are kept, the cut one fails as broken JSON
    (tmp_path / "cut.json").write_bytes(text[:text.index(b'"r3"') + 10])
    index = jsonfile.index_file(str(tmp_path / "cut.json"))
    file = jsonfile.RecordFile(index)
    assert len(index) == 4 and [file.record(i)["id"] for i in range(3)] == ["r0", "r1", "r2"]
    with pytest.raises(BadRecord, match="broken JSON"):
        file.record(3)
    (tmp_path / "object.json").write_text('{"data": []}')
    with pytest.raises(ValueError, match="not a JSON array"):
        jsonfile.index_file(str(tmp_path / "object.json"))


def _random_value(rng: random.Random, depth: int = 0):
    pieces = ['\\', '"', '[', ']', '{', '}', ',', 'a', ' ', '\n', '\u00e9', '\u2028', '\\\\', '\\"', '\U0001f600']
    k = rng.random()
    if depth > 3 or k < 0.3:
        return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
    if k < 0.45:
        return rng.choice([rng.randint(-9, 9), 1.5, None, True])
    if k < 0.7:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {str(_random_value(rng, 4)): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_the_streamed_scan_finds_what_json_loads_finds(tmp_path, monkeypatch, chunk):
    """The reference is json.loads on the whole file; the scan reads it `chunk` bytes at a time, so every
    string, escape and BOM is cut at every possible place."""
    monkeypatch.setattr(jsonfile, "CHUNK", chunk)
    monkeypatch.setattr(jsonfile, "WHOLE_FILE_LIMIT", 0)  # records come by ranged reads, never the whole file
    monkeypatch.setattr(storage, "read_bytes", lambda *a, **k: pytest.fail("the file was read whole"))
    rng = random.Random(chunk)
    for trial in range(60):
        items = [_random_value(rng) for _ in range(rng.randint(0, 6))]
        text = json.dumps(items, indent=rng.choice([None, 1]), ensure_ascii=rng.random() < 0.5)
        path = tmp_path / f"{trial}.json"
        path.write_bytes((b"\xef\xbb\xbf" if trial % 3 == 0 else b"") + text.encode())
        index = jsonfile.index_file(str(path))
        file = jsonfile.RecordFile(index)
        assert [file.record(i) for i in range(len(index))] == items, text
        assert index.size == os.path.getsize(path)

        lines = [json.dumps(v, ensure_ascii=False) for v in items]
        path = tmp_path / f"{trial}.jsonl"
        path.write_bytes("\n".join(lines).encode() + rng.choice([b"", b"\n", b"\r\n\n"]))
        index = jsonfile.index_file(str(path))
        assert [jsonfile.RecordFile(index).record(i) for i in range(len(index))] == items


# -- chat templates ------------------------------------------------------------------------------------------------
ONE_WORD = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def bare_checkpoint(processor, tmp_path):
    """A saved processor with its chat template removed from every place it could be."""
    folder = tmp_path / "checkpoint"
    processor.save_pretrained(str(folder))
    for name in ("infinitevl_processor.json", "chat_template.jinja", "chat_template.json"):
        if (folder / name).exists():
            os.remove(folder / name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_a_checkpoint_with_only_chat_template_json_uses_that_template(bare_checkpoint, tmp_path):
    (bare_checkpoint / "chat_template.json").write_text(json.dumps({"chat_template": ONE_WORD}))
    proc = load_processor(str(bare_checkpoint))
    assert proc.chat_template == ONE_WORD
    Image.new("RGB", (56, 56), "red").save(tmp_path / "red.png")
    (tmp_path / "a.jsonl").write_text(json.dumps(record("x")) + "\n")
    source = SourceConfig(name="s", path=str(tmp_path / "a.jsonl"))
    config = CorpusConfig(name="t", output="unused", sources=[source], processor=str(bare_checkpoint),
                          max_pixels=28 * 28 * 4)
    sample = tokenize_record(read_record(source, 0), source, config, proc, "s:x")
    # the reference: the template rendered by jinja2 itself (no system turn: the built-in template has one)
    text = jinja2.Template(ONE_WORD).render(messages=[
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nwhat color is it?"}]},
        {"role": "assistant", "content": "red"}], add_generation_prompt=False)
    ids = proc.tokenizer(text, add_special_tokens=False)["input_ids"]
    pad = proc.image_token_id
    assert [t for t in sample.input_ids if t != pad] == [t for t in ids if t != pad]


def test_no_template_stops_the_build_unless_the_config_names_one(bare_checkpoint, tmp_path):
    Image.new("RGB", (56, 56), "red").save(tmp_path / "red.png")
    (tmp_path / "a.jsonl").write_text(json.dumps(record("x")) + "\n")
    config = dict(name="t", sources=[{"name": "s", "path": str(tmp_path / "a.jsonl")}], processor=str(bare_checkpoint),
                  max_pixels=28 * 28 * 4, workers=1)
    with pytest.raises(ChatTemplateError, match="chat_template.json.*data.chat_template"):
        build_corpus(CorpusConfig(output=str(tmp_path / "none"), **config), progress=False)
    assert not (tmp_path / "none").exists()  # stopped before writing anything

    (tmp_path / "one_word.jinja").write_text(ONE_WORD)
    manifest = build_corpus(CorpusConfig(output=str(tmp_path / "named"), chat_template=str(tmp_path / "one_word.jinja"),
                                         **config), progress=False)
    assert manifest["samples"] == 1

    shutil.copy(tmp_path / "one_word.jinja", bare_checkpoint / "chat_template.jinja")
    (tmp_path / "other.jinja").write_text(ONE_WORD.replace("<|im_start|>assistant", "<|im_start|>bot"))
    with pytest.raises(ChatTemplateError, match="differs from the checkpoint's own"):
        load_processor(str(bare_checkpoint), str(tmp_path / "other.jinja"))


def test_the_data_stage_and_the_model_read_the_same_template_where_a_checkpoint_has_two(bare_checkpoint):
    """A transformers-4 checkpoint may keep the processor's template in chat_template.json and another in
    tokenizer_config.json: the processor's is the one, for the corpus and for every later stage alike (else the
    training stage would refuse the corpus as built by another processor)."""
    from model.processing import InfiniteVLProcessor
    from pipeline.data.tokenize import processor_fingerprint

    (bare_checkpoint / "chat_template.json").write_text(json.dumps({"chat_template": ONE_WORD}))
    config = json.loads((bare_checkpoint / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for message in messages %}{{ message['role'] }}{% endfor %}"
    (bare_checkpoint / "tokenizer_config.json").write_text(json.dumps(config))
    corpus_side = load_processor(str(bare_checkpoint))
    model_side = InfiniteVLProcessor.from_pretrained(str(bare_checkpoint))
    assert corpus_side.chat_template == model_side.chat_template == ONE_WORD
    assert processor_fingerprint(corpus_side) == processor_fingerprint(model_side)
