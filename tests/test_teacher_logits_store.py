"""The stored teacher logits: aligned with the token shards, equal to the teacher's own top-k, resumable,
refusing a teacher of another vocabulary, and the same through S3 as on local disk."""

from __future__ import annotations

import json
import os

import pytest
import s3fs
import torch

from model.processing import InfiniteVLProcessor
from model.tiny import build_processor, build_tiny_teacher, build_tokenizer
from pipeline import storage
from pipeline.config import load_config
from pipeline.data.loader import PackedDataset, PackedLoader, example_from_row, read_manifest, shard_urls
from pipeline.data.shards import ShardReader
from pipeline.stages import StageContext
from pipeline.teacher_logits import store as store_module
from pipeline.teacher_logits.coverage import covered_mask
from pipeline.teacher_logits.reader import TeacherLogitReader
from pipeline.teacher_logits.run import run
from pipeline.recipes.teacher_logits import run as store_teacher_logits
from pipeline.teacher_logits.store import StoreConflict, StoreSettings
from pipeline.teacher_logits.teacher import VocabularyMismatch
from tests.test_teacher_logits_helpers import build_small_corpus, save_teacher

SETTINGS = StoreSettings(top_k=8, positions="answer", values="fp16", batch_size=2, chunk=64)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_small_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def teacher_dir(tiny_teacher, tmp_path_factory):
    return save_teacher(*tiny_teacher, tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def stored(corpus, teacher_dir, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("logits"))
    result = run(corpus, teacher_dir, output, SETTINGS, max_bytes_per_token=300, progress=False)
    return output, result


def test_rows_align_with_the_token_shards(corpus, stored, processor):
    output, result = stored
    manifest = result["manifest"]
    data = read_manifest(corpus)
    assert result["computed"] == [s["shard"] for s in data["shards"]] and result["skipped"] == []
    assert [s["file"] for s in manifest["shards"]] == [s["file"] for s in data["shards"]]
    reader = TeacherLogitReader(output)
    media = (processor.image_token_id, processor.video_token_id)
    covered = 0
    for i, url in enumerate(shard_urls(corpus, data)):
        tokens = ShardReader(url)
        for r in range(len(tokens)):
            example = example_from_row(tokens.row(r), processor)
            stored_row, target = reader.row(i, r)
            assert stored_row["row"] == r and stored_row["sample_ids"] == example["sample_ids"]
            expected = covered_mask("answer", example["input_ids"][0], example["labels"][0], example["cu_seqlens"],
                                    media)
            assert torch.equal(target.mask[0], expected) and expected.any()
            # "answer": the covered positions predict exactly the supervised tokens
            assert torch.equal(target.positions + 1, (example["labels"][0] != -100).nonzero()[:, 0])
            covered += len(target.positions)
    assert manifest["covered"] == covered
    assert manifest["tokens"] == data["tokens"]


def test_manifest_names_the_teacher_and_the_encoding(stored, teacher_dir, corpus):
    manifest = stored[1]["manifest"]
    assert manifest["teacher"]["path"] == teacher_dir and len(manifest["teacher"]["weights_sha256"]) == 64
    assert manifest["encoding"] == {"k": 8, "vocab_size": 512, "index_bits": 9, "values": "fp16",
                                    "value_kind": "log_prob", "tail": "fp32 log(1 - topk_mass)",
                                    "bytes_per_position": 9 + 16 + 4}
    assert manifest["positions"] == "answer"
    assert manifest["data"]["manifest"] == corpus
    on_disk = sum(os.path.getsize(os.path.join(stored[0], s["file"])) for s in manifest["shards"])
    assert manifest["bytes"] == on_disk
    assert manifest["bytes_per_token"] == pytest.approx(on_disk / manifest["covered"])
    # the payload, plus Arrow framing per row (under 1 KB: negligible on 8K-token rows, not on these)
    assert manifest["payload_bytes_per_token"] == 29
    assert 0 < on_disk - 29 * manifest["covered"] < 1024 * manifest["sequences"]
    fid = manifest["fidelity"]
    assert fid["positions"] > 0 and 0 < fid["topk_mass"] < 1 and fid["kl_mean"] >= 0


def test_reader_gives_the_teachers_topk_for_loader_batches(corpus, stored, tiny_teacher):
    """Against the teacher run directly on each batch the training loader yields (independent path:
    the model's own forward and log_softmax, no packing across rows)."""
    model, processor = tiny_teacher
    reader = TeacherLogitReader(stored[0])
    loader = PackedLoader(corpus, processor, seed=5, num_workers=0)
    n = loader.sequences_per_epoch
    for batch, _ in zip(loader, range(n + 2)):  # past the epoch end: a new order
        target = reader.for_batch(batch, seed=5)
        text_positions = torch.cat([torch.arange(int(n)) for n in batch["cu_seqlens"].diff()])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], use_cache=False,
                           position_ids=torch.cat([text_positions.view(1, 1, -1), batch["position_ids"]]),
                           pixel_values=batch.get("pixel_values"), image_grid_thw=batch.get("image_grid_thw"),
                           pixel_values_videos=batch.get("pixel_values_videos"),
                           video_grid_thw=batch.get("video_grid_thw"),
                           second_per_grid_ts=batch.get("second_per_grid_ts")).logits[0]
        direct = torch.log_softmax(logits[target.positions], -1)
        top = direct.topk(8)
        assert torch.allclose(target.log_probs, top.values, rtol=2e-3, atol=1e-4)
        assert torch.allclose(target.log_probs, direct.gather(1, target.indices), rtol=2e-3, atol=1e-4)
        assert torch.allclose(target.topk_mass, top.values.exp().sum(-1), atol=1e-3)
        rest = direct.scatter(1, target.indices, float("-inf")).logsumexp(-1)
        assert torch.allclose(target.log_tail, rest, atol=1e-4)


def test_reader_refuses_a_batch_it_was_not_built_for(corpus, stored, processor):
    reader = TeacherLogitReader(stored[0])
    batch = next(iter(PackedLoader(corpus, processor, seed=5, num_workers=0)))
    first_row = PackedDataset(corpus, processor, seed=5).locate(0)
    other = next(s for s in range(6, 60) if PackedDataset(corpus, processor, seed=s).locate(0) != first_row)
    with pytest.raises(ValueError, match=f"loader's seed is not {other}"):
        reader.for_batch(batch, seed=other)


def test_k_equal_to_vocab_reconstructs_the_teacher_exactly(corpus, teacher_dir, tmp_path):
    result = run(corpus, teacher_dir, str(tmp_path / "full"), StoreSettings(top_k=512, values="fp32", chunk=64),
                 progress=False)
    fid = result["manifest"]["fidelity"]
    # fp32 rounding only: the stored path and the dense reference run the LM head on differently shaped inputs
    assert fid["kl_max"] < 1e-5 and fid["topk_mass"] == pytest.approx(1.0, abs=1e-6)
    _, target = TeacherLogitReader(str(tmp_path / "full")).row(0, 0)
    assert torch.isneginf(target.log_tail).all()
    assert torch.allclose(target.log_probs.exp().sum(-1), torch.ones(len(target.positions)), atol=1e-5)


def test_resume_after_a_kill_between_shards_redoes_only_unfinished_ones(corpus, teacher_dir, stored, tmp_path,
                                                                          monkeypatch):
    output = str(tmp_path / "resume")
    commit = store_module._commit_shard
    done = []

    def dies_after_two(*args, **kwargs):
        if len(done) == 2:
            raise KeyboardInterrupt("killed")
        commit(*args, **kwargs)
        done.append(args[1])

    monkeypatch.setattr(store_module, "_commit_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(corpus, teacher_dir, output, SETTINGS, progress=False)
    assert not os.path.exists(os.path.join(output, "manifest.json"))
    assert sorted(os.listdir(os.path.join(output, "shards"))) == [
        "shard-00000.arrow", "shard-00000.done.json", "shard-00001.arrow", "shard-00001.done.json"]
    monkeypatch.setattr(store_module, "_commit_shard", commit)
    result = run(corpus, teacher_dir, output, SETTINGS, progress=False)
    assert result["skipped"] == [0, 1] and result["computed"] == [2, 3]
    # byte for byte what the uninterrupted run wrote
    assert [s["sha256"] for s in result["manifest"]["shards"]] == [s["sha256"] for s in stored[1]["manifest"]["shards"]]
    again = run(corpus, teacher_dir, output, SETTINGS, progress=False)
    assert again["computed"] == [] and again["skipped"] == [0, 1, 2, 3]


def test_ranks_write_their_own_shards_and_rank_0_the_manifest(corpus, teacher_dir, stored, tmp_path):
    output = str(tmp_path / "ranks")
    one = run(corpus, teacher_dir, output, SETTINGS, rank=1, world_size=2, progress=False)
    assert one["computed"] == [1, 3] and one["manifest"] is None
    zero = run(corpus, teacher_dir, output, SETTINGS, rank=0, world_size=2, progress=False)
    assert zero["computed"] == [0, 2]
    assert [s["sha256"] for s in zero["manifest"]["shards"]] == [s["sha256"] for s in stored[1]["manifest"]["shards"]]


def test_rank_0_does_not_write_a_manifest_over_missing_shards(corpus, teacher_dir, tmp_path):
    with pytest.raises(RuntimeError, match="shard 1 has no marker"):
        run(corpus, teacher_dir, str(tmp_path / "alone"), SETTINGS, rank=0, world_size=2, progress=False)


def test_other_settings_in_the_same_output_are_refused(corpus, teacher_dir, stored):
    with pytest.raises(StoreConflict, match="teacher, k, encoding, positions or corpus changed"):
        run(corpus, teacher_dir, stored[0], StoreSettings(top_k=4, chunk=64), progress=False)


def test_a_teacher_with_another_vocabulary_is_refused_before_any_work(corpus, tmp_path):
    base = build_processor()
    other = InfiniteVLProcessor(build_tokenizer(vocab_size=400), base.image_processor)
    model, processor = build_tiny_teacher(processor=other)
    teacher = save_teacher(model, processor, tmp_path / "other")
    with pytest.raises(VocabularyMismatch, match="does not have the vocabulary the shards were tokenized with"):
        run(corpus, teacher, str(tmp_path / "out"), SETTINGS, progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_teacher_data_and_store_on_s3(s3, corpus, teacher_dir, stored, monkeypatch):
    fs = s3fs.S3FileSystem(**s3.storage_options)
    data_root, teacher_root, output = s3.fresh("data"), s3.fresh("teacher"), s3.fresh("logits")
    fs.put(os.path.dirname(corpus) + "/", data_root.removeprefix("s3://") + "/", recursive=True)
    fs.put(teacher_dir + "/", teacher_root.removeprefix("s3://") + "/", recursive=True)
    monkeypatch.setenv("INFINITEVL_CACHE", os.path.join(os.path.dirname(stored[0]), "cache"))
    result = run(f"{data_root}/manifest.json", teacher_root, output, SETTINGS,
                 storage_options=s3.storage_options, progress=False)
    manifest = storage.read_json(f"{output}/manifest.json", s3.storage_options)
    assert manifest == result["manifest"]
    assert manifest["teacher"]["weights_sha256"] == stored[1]["manifest"]["teacher"]["weights_sha256"]
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in stored[1]["manifest"]["shards"]]
    remote, local = TeacherLogitReader(output, s3.storage_options), TeacherLogitReader(stored[0])
    for shard, row in [(0, 0), (3, 1)]:
        a, b = remote.row(shard, row)[1], local.row(shard, row)[1]
        assert torch.equal(a.indices, b.indices) and torch.equal(a.log_probs, b.log_probs)
    assert s3.secret not in json.dumps(manifest)


def test_the_stage_function_runs_from_the_tiny_config(corpus, teacher_dir, tmp_path):
    config = load_config("configs/tiny.yaml", ["teacher_logits.top_k=4", "teacher_logits.positions=text"])
    data_root = os.path.dirname(os.path.dirname(corpus))  # <data>/distill/manifest.json
    ctx = StageContext("teacher-logits", config, str(tmp_path / "teacher-logits"),
                       {"teacher": teacher_dir, "data": data_root}, __import__("logging").getLogger("t"))
    metrics = store_teacher_logits(ctx)
    manifest = storage.read_json(str(tmp_path / "teacher-logits" / "manifest.json"))
    assert manifest["positions"] == "text" and manifest["encoding"]["k"] == 4
    assert metrics["covered"] == manifest["covered"] > 0 and metrics["topk_mass"] == manifest["fidelity"]["topk_mass"]
    assert 0 < metrics["bytes_per_token"] <= config.teacher_logits.max_bytes_per_token


def test_tempered_targets_are_the_softmax_of_the_teacher_logits_over_the_topk(stored, tiny_teacher, corpus):
    model, processor = tiny_teacher
    reader = TeacherLogitReader(stored[0])
    example = example_from_row(ShardReader(shard_urls(corpus, read_manifest(corpus))[1]).row(0), processor)
    _, target = reader.row(1, 0)
    text_positions = torch.cat([torch.arange(int(n)) for n in example["cu_seqlens"].diff()])
    with torch.no_grad():
        logits = model(input_ids=example["input_ids"], pixel_values=example["pixel_values"],
                       image_grid_thw=example["image_grid_thw"], use_cache=False,
                       position_ids=torch.cat([text_positions.view(1, 1, -1), example["position_ids"]])).logits[0]
    z = logits[target.positions].gather(1, target.indices)
    for t in (1.0, 2.0):
        # fp16 log-probs near -6 are kept to 2^-9 (half a step of 2^-8)
        assert torch.allclose(target.tempered_log_probs(t), torch.log_softmax(z / t, -1), atol=4e-3)


def test_the_stage_runs_one_process_per_rank_under_torchrun(corpus, teacher_dir, stored, tmp_path):
    config = load_config("configs/tiny.yaml", ["teacher_logits.top_k=8", "teacher_logits.nproc_per_node=2",
                                               "teacher_logits.batch_size=2"])
    ctx = StageContext("teacher-logits", config, str(tmp_path / "teacher-logits"),
                       {"teacher": teacher_dir, "data": os.path.dirname(os.path.dirname(corpus))},
                       __import__("logging").getLogger("t"))
    store_teacher_logits(ctx)
    manifest = storage.read_json(str(tmp_path / "teacher-logits" / "manifest.json"))
    assert manifest["covered"] == stored[1]["manifest"]["covered"]
    # what two ranks wrote is what one process wrote, up to fp32 summation order (torchrun sets one
    # thread per process), so values are compared, not bytes
    two, one = TeacherLogitReader(str(tmp_path / "teacher-logits")), TeacherLogitReader(stored[0])
    for shard in manifest["shards"]:
        for row in range(shard["sequences"]):
            (a_row, a), (b_row, b) = two.row(shard["shard"], row), one.row(shard["shard"], row)
            assert a_row["sample_ids"] == b_row["sample_ids"] and torch.equal(a.mask, b.mask)
            assert torch.allclose(a.log_probs, b.log_probs, atol=1e-3)


def test_after_the_real_teacher_and_data_stages(tmp_path, processor):
    """The run's own layout: teacher folder from the teacher stage, corpora from the data stage."""
    from pipeline.data.stage import build_corpora
    from pipeline.recipes.teacher import run as prepare_teacher

    root = str(tmp_path)
    config = load_config("configs/tiny.yaml", [f"run.root={root}", "teacher.train.steps=10", "data.distill.max_samples=12",
                                               "data.instruct.max_samples=2", "data.long.max_samples=1"])
    log = __import__("logging").getLogger("t")
    prepare_teacher(StageContext("teacher", config, f"{root}/teacher", {}, log))
    build_corpora(StageContext("data", config, f"{root}/data", {"teacher": f"{root}/teacher"}, log))
    metrics = store_teacher_logits(StageContext("teacher-logits", config, f"{root}/teacher-logits",
                                                {"teacher": f"{root}/teacher", "data": f"{root}/data"}, log))
    manifest = storage.read_json(f"{root}/teacher-logits/manifest.json")
    distill = read_manifest(f"{root}/data/distill/manifest.json")
    assert manifest["data"]["processor_fingerprint"] == distill["processor_fingerprint"]
    assert [s["file"] for s in manifest["shards"]] == [s["file"] for s in distill["shards"]]
    assert manifest["tokens"] == distill["tokens"] and metrics["covered"] == manifest["covered"] > 0
    reader = TeacherLogitReader(f"{root}/teacher-logits")
    batch = next(iter(PackedLoader(f"{root}/data/distill/manifest.json", processor, seed=0, num_workers=0)))
    target = reader.for_batch(batch, seed=0)
    assert torch.equal(target.positions + 1, (batch["labels"][0] != -100).nonzero()[:, 0])


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_logit_shard_is_refused_naming_it(stored, tmp_path, damage):
    """Stage I-b's reader checks each logit shard against the sha256 the store committed, before the first row."""
    import shutil

    from tests.test_integrity import flip_a_byte, truncate

    copy = tmp_path / "run" / "teacher-logits" / "attempt-0002"
    shutil.copytree(stored[0], copy)
    entry = stored[1]["manifest"]["shards"][2]
    damaged = str(copy / entry["file"])
    (flip_a_byte if damage == "flip" else truncate)(damaged)
    reader = TeacherLogitReader(str(copy))
    reader.row(0, 0)  # an intact shard reads
    with pytest.raises(storage.IntegrityError) as e:
        reader.row(2, 0)
    assert damaged in str(e.value) and "--force teacher-logits" in str(e.value)
    assert (f"expected sha256 {entry['sha256']}" if damage == "flip" else f"expected {entry['bytes']} bytes") \
        in str(e.value)


def test_a_stage_over_a_damaged_token_shard_fails_naming_it_and_commits_nothing(corpus, teacher_dir, tmp_path):
    """The defect this guards: a forced teacher-logits run read a changed token shard and committed."""
    import shutil

    from tests.test_integrity import flip_a_byte

    data = tmp_path / "data"
    shutil.copytree(os.path.dirname(corpus), data)
    shard = read_manifest(str(data / "manifest.json"))["shards"][-1]
    flip_a_byte(str(data / shard["file"]))
    with pytest.raises(storage.IntegrityError, match=f"{data}/{shard['file']}.*expected sha256 {shard['sha256']}"):
        run(str(data / "manifest.json"), teacher_dir, str(tmp_path / "out"), SETTINGS, progress=False)
    assert not os.path.exists(tmp_path / "out" / "manifest.json")
