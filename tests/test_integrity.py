"""Every reader checks what it opens against the digest its producer committed: a changed byte (same size) or a
truncated file in a token shard, a teacher-logit shard (tests/test_teacher_logits_store.py) and a checkpoint fails
at once, naming the file, both digests and the command that rebuilds it; on local disk and on S3."""

from __future__ import annotations

import os

import pytest

from pipeline import storage
from pipeline.storage import IntegrityError


def flip_a_byte(path: str, offset: int | None = None) -> None:
    """Changes one byte in the middle of a file (same size)."""
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        f.seek(size // 2 if offset is None else offset)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, processor):
    """A small packed corpus built by the data stage's builder, in a run's attempt layout."""
    from pipeline.data.build import build_corpus
    from pipeline.data.config import CorpusConfig, SourceConfig
    from pipeline.data.synthetic import write_llava

    root = tmp_path_factory.mktemp("integrity")
    processor.save_pretrained(root / "processor")
    src = write_llava(root / "src", 6, seed=0)
    output = root / "run" / "data" / "attempt-0001" / "distill"
    build_corpus(CorpusConfig(name="distill", output=str(output), max_len=256, max_pixels=28 * 28 * 16,
                              samples_per_shard=3, workers=1, processor=str(root / "processor"),
                              sources=[SourceConfig(name="s", format="llava", path=str(src))]), progress=False)
    return output


def read_everything(manifest_url: str, processor, storage_options=None) -> int:
    from pipeline.data.loader import iter_sequences

    return sum(1 for _ in iter_sequences(manifest_url, processor, storage_options))


@pytest.mark.parametrize("damage", [flip_a_byte, truncate])
def test_a_damaged_token_shard_is_refused_naming_it(corpus, processor, tmp_path, damage):
    import shutil

    from pipeline.data.loader import PackedLoader

    copy = tmp_path / "run" / "data" / "attempt-0001" / "distill"
    shutil.copytree(corpus, copy)
    manifest = str(copy / "manifest.json")
    assert read_everything(str(corpus / "manifest.json"), processor) > 0  # (a file is checked once per process)
    shard = storage.read_json(manifest)["shards"][1]
    damaged = str(copy / shard["file"])
    damage(damaged)
    with pytest.raises(IntegrityError) as e:
        read_everything(manifest, processor)
    message = str(e.value)
    assert damaged in message
    if damage is flip_a_byte:
        assert f"expected sha256 {shard['sha256']}" in message and "found sha256 " in message
    else:
        assert f"expected {shard['bytes']} bytes" in message and "truncated" in message
    assert f"Rebuild it: infinitevl run {tmp_path}/run/config.yaml --force data" in message
    with pytest.raises(IntegrityError, match=damaged.replace(".", r"\.")):  # the training loader alike
        for _ in zip(range(50), PackedLoader(manifest, processor, num_workers=0)):
            pass


def test_a_damaged_token_shard_on_s3_is_refused_naming_it(corpus, processor, s3):
    import s3fs

    root = s3.fresh("data") + "/distill"
    fs = s3fs.S3FileSystem(**s3.storage_options)
    fs.put(str(corpus) + "/", root.removeprefix("s3://") + "/", recursive=True)
    manifest = f"{root}/manifest.json"
    shard = storage.read_json(manifest, s3.storage_options)["shards"][0]
    url = f"{root}/{shard['file']}"
    data = bytearray(storage.read_bytes(url, s3.storage_options))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(url, bytes(data), s3.storage_options)
    with pytest.raises(IntegrityError, match=f"{url}.*expected sha256 {shard['sha256']}"):
        read_everything(manifest, processor, s3.storage_options)
    storage.write_bytes(url, bytes(data[:100]), s3.storage_options)
    with pytest.raises(IntegrityError, match=f"{url}.*expected {shard['bytes']} bytes, found 100 bytes"):
        read_everything(manifest, processor, s3.storage_options)


@pytest.fixture
def committed_model(tiny_teacher, tmp_path):
    """The tiny teacher saved as a training stage exports it: its files, then _FILES.json."""
    model, processor = tiny_teacher
    folder = tmp_path / "run" / "stage2" / "attempt-0003" / "export"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    storage.write_files_marker(str(folder), storage.file_digests(str(folder)))
    return folder


@pytest.mark.parametrize("damage", [flip_a_byte, truncate])
def test_a_damaged_checkpoint_file_is_refused_naming_it(committed_model, tmp_path, damage):
    from pipeline.eval.api import load_checkpoint

    weights = str(committed_model / "model.safetensors")
    files = storage.committed_files(str(committed_model))
    damage(weights)
    with pytest.raises(IntegrityError) as e:
        load_checkpoint(str(committed_model))
    message = str(e.value)
    assert weights in message and f"infinitevl run {tmp_path}/run/config.yaml --force stage2" in message
    if damage is flip_a_byte:
        assert f"expected sha256 {files['model.safetensors']['sha256']}" in message
    # the loaders every stage uses for its input models check the same list
    from pipeline.train.job import materialize

    with pytest.raises(IntegrityError, match=weights.replace(".", r"\.")):
        materialize(str(committed_model))


def test_a_damaged_checkpoint_on_s3_is_refused_and_a_bad_cached_copy_is_fetched_again(committed_model, s3, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setenv("INFINITEVL_CACHE", str(tmp_path / "cache"))
    url = s3.fresh("export")
    storage.upload_dir(str(committed_model), url, s3.storage_options)
    local = storage.local_dir(url, s3.storage_options, verify=False)  # cached, not yet checked in this process
    flip_a_byte(os.path.join(local, "model.safetensors"))  # the cached copy went bad: fetched again, checked
    assert storage.local_dir(url, s3.storage_options) == local
    assert storage.sha256_file(os.path.join(local, "model.safetensors"))[0] == \
        storage.committed_files(url, s3.storage_options)["model.safetensors"]["sha256"]
    weights = f"{url}/model.safetensors"
    data = bytearray(storage.read_bytes(weights, s3.storage_options))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(weights, bytes(data), s3.storage_options)
    other = tmp_path / "other-cache"
    monkeypatch.setenv("INFINITEVL_CACHE", str(other))
    with pytest.raises(IntegrityError, match="model.safetensors.*expected sha256"):
        storage.local_dir(url, s3.storage_options)


def test_a_training_checkpoint_lists_its_files_and_a_changed_one_is_found(tmp_path):
    import logging

    from pipeline import checkpoints
    from pipeline.config import load_config
    from pipeline.stages import StageContext

    output = str(tmp_path / "run" / "stage1a" / "attempt-0001")
    ctx = StageContext("stage1a", load_config("configs/tiny.yaml"), output, {}, logging.getLogger("t"))
    uri = checkpoints.checkpoint_dir(output, 4)
    storage.write_bytes(f"{uri}/ds/mp_rank_00_model_states.pt", b"optimizer" * 100)
    storage.write_bytes(f"{uri}/trainer_state.json", b'{"step": 4}')
    checkpoints.commit_checkpoint(ctx, 4, {"loss": 1.0})
    files = checkpoints.checkpoint_metrics(uri)["files"]
    assert set(files) == {"ds/mp_rank_00_model_states.pt", "trainer_state.json"}
    assert files["trainer_state.json"] == {"sha256": __import__("hashlib").sha256(b'{"step": 4}').hexdigest(),
                                           "bytes": 11}
    flip_a_byte(f"{uri}/ds/mp_rank_00_model_states.pt")
    with pytest.raises(IntegrityError, match="mp_rank_00_model_states.pt.*--force stage1a"):
        storage.verify_dir(uri, files)


def test_a_directory_never_committed_is_not_taken_for_a_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(IntegrityError, match="never committed"):
        storage.verify_dir(str(tmp_path))


def test_every_damaged_shard_is_named_before_training_starts(corpus, tmp_path):
    """A training stage checks the sizes of all the shards its workers will read (no byte is read) before it
    launches them: every truncated or missing one is named at once."""
    import shutil

    copy = tmp_path / "run" / "data" / "attempt-0001" / "distill"
    shutil.copytree(corpus, copy)
    manifest = storage.read_json(str(copy / "manifest.json"))
    sizes = {str(copy / s["file"]): s["bytes"] for s in manifest["shards"]}
    storage.check_sizes(sizes)
    first, second = (str(copy / s["file"]) for s in manifest["shards"][:2])
    truncate(first)
    os.remove(second)
    with pytest.raises(IntegrityError) as e:
        storage.check_sizes(sizes)
    message = str(e.value)
    assert "2 file(s) damaged" in message and f"{second}: no file where" in message
    assert f"{first}: {os.path.getsize(first)} bytes where {manifest['shards'][0]['bytes']} were committed" in message
