"""The training loader: what a batch holds, M-RoPE against transformers, determinism, exact resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import s3fs
import torch

from pipeline.data import synthetic
from pipeline.data.build import build_corpus
from pipeline.data.config import CorpusConfig
from pipeline.data.loader import PackedLoader, iter_sequences
from pipeline.data.tokenize import IGNORE_INDEX, load_processor


@pytest.fixture(scope="module")
def corpus(s3, tmp_path_factory):
    local = tmp_path_factory.mktemp("loader")
    synthetic.write_llava(local / "pictures", 24, seed=21)
    synthetic.write_videos(local / "videos", 4, seed=22, seconds=2.0, fps=8)
    root = s3.fresh("loadersrc")
    s3fs.S3FileSystem(**s3.storage_options).put(str(local) + "/", root.removeprefix("s3://") + "/", recursive=True)
    config = CorpusConfig(
        name="loader", output=s3.fresh("loader"), max_len=384, max_pixels=28 * 28 * 16, samples_per_shard=7,
        workers=2, sources=[{"name": "pictures", "format": "llava", "path": f"{root}/pictures/annotations.jsonl"},
                            {"name": "videos", "format": "llava", "path": f"{root}/videos/videos.jsonl",
                             "weight": 0.2}])
    manifest = build_corpus(config, s3.storage_options, progress=False)
    return config.output + "/manifest.json", manifest


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def loader(corpus, s3, **kw):
    defaults = dict(storage_options=s3.storage_options, num_workers=0, seed=3)
    return PackedLoader(corpus[0], load_processor("tiny"), **{**defaults, **kw})


def test_batch_contents_and_mrope_match_the_teacher(corpus, s3, tiny_teacher):
    model, proc = tiny_teacher
    manifest_url, manifest = corpus
    n = manifest["sequences"]
    batches = take(loader(corpus, s3), n)
    assert any("pixel_values_videos" in b for b in batches) and any("pixel_values" in b for b in batches)
    for b in batches:
        T = b["input_ids"].shape[1]
        assert b["labels"].shape == b["mm_token_type_ids"].shape == (1, T) and b["position_ids"].shape == (3, 1, T)
        assert b["cu_seqlens"].dtype == torch.int32 and b["cu_seqlens"][0] == 0 and b["cu_seqlens"][-1] == T
        assert len(b["cu_seqlens"]) == len(b["sample_ids"]) + 1 <= T
        assert (b["labels"][b["mm_token_type_ids"] != 0] == IGNORE_INDEX).all()
        supervised = b["labels"] != IGNORE_INDEX
        assert torch.equal(b["labels"][supervised], b["input_ids"][supervised])
        # every document ends with its supervised end-of-turn token
        ends = b["cu_seqlens"][1:].long() - 2  # the template ends "...<|im_end|>\n"
        assert (b["labels"][0, ends] == proc.tokenizer.convert_tokens_to_ids("<|im_end|>")).all()

        # the reference: transformers' get_rope_index on each document alone
        cu = b["cu_seqlens"].tolist()
        grids = {"image": iter(b.get("image_grid_thw", torch.zeros(0, 3)).long()),
                 "video": iter(b.get("video_grid_thw", torch.zeros(0, 3)).long())}
        seconds = iter(b.get("second_per_grid_ts", torch.zeros(0)))
        for start, end in zip(cu[:-1], cu[1:]):
            ids, mm = b["input_ids"][:, start:end], b["mm_token_type_ids"][:, start:end]
            runs = torch.unique_consecutive(mm[0])
            images = [next(grids["image"]) for _ in range(int((runs == 1).sum()))]
            videos = [next(grids["video"]) for _ in range(int((runs == 2).sum()))]
            secs = [next(seconds) for _ in videos]
            ref, _ = model.model.get_rope_index(
                ids, mm, image_grid_thw=torch.stack(images) if images else None,
                video_grid_thw=torch.stack(videos) if videos else None,
                second_per_grid_ts=torch.stack(secs) if secs else None)
            assert torch.equal(b["position_ids"][:, :, start:end], ref)
        n_patches = b.get("image_grid_thw", torch.zeros(0, 3)).prod(-1).sum()
        assert b.get("pixel_values", torch.zeros(0, 1)).shape[0] == n_patches


def test_an_epoch_visits_every_sample_once_and_the_order_is_seeded(corpus, s3):
    _, manifest = corpus
    n = manifest["sequences"]
    two_epochs = take(loader(corpus, s3), 2 * n)
    for epoch in (two_epochs[:n], two_epochs[n:]):
        ids = [sid for b in epoch for sid in b["sample_ids"]]
        assert len(ids) == len(set(ids)) == manifest["samples"]
    assert [b["sample_ids"] for b in two_epochs[:n]] != [b["sample_ids"] for b in two_epochs[n:]]
    again = take(loader(corpus, s3, num_workers=2), n)  # worker processes do not change the order
    assert [b["sample_ids"] for b in again] == [b["sample_ids"] for b in two_epochs[:n]]
    assert torch.equal(again[1]["input_ids"], two_epochs[1]["input_ids"])
    other = take(loader(corpus, s3, seed=4), n)
    assert [b["sample_ids"] for b in other] != [b["sample_ids"] for b in two_epochs[:n]]
    # the in-order pass (teacher logits) sees the same sequences, in file order
    in_order = list(iter_sequences(corpus[0], load_processor("tiny"), s3.storage_options))
    assert [(sh, row) for sh, row, _ in in_order] == [(i, r) for i, s in enumerate(manifest["shards"])
                                                       for r in range(s["sequences"])]
    assert sorted(map(tuple, (b["sample_ids"] for _, _, b in in_order))) == sorted(
        map(tuple, (b["sample_ids"] for b in two_epochs[:n])))


def test_resume_with_a_new_world_size_neither_repeats_nor_skips(corpus, s3):
    _, manifest = corpus
    n = manifest["sequences"]
    total = 22 + n  # crosses at least two epoch boundaries
    reference = [b["sample_ids"] for b in take(loader(corpus, s3), total)]

    seen: dict[int, list[str]] = {}
    # 2 ranks run 5 steps (with worker processes), save; 3 ranks resume for 4 steps, save; 1 rank goes on
    ranks = [loader(corpus, s3, rank=r, world_size=2, num_workers=2) for r in range(2)]
    for r, ld in enumerate(ranks):
        for b in take(ld, 5):
            seen[b["position"]] = b["sample_ids"]
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict() and state["consumed"] == 10
    ranks = [loader(corpus, s3, rank=r, world_size=3) for r in range(3)]
    for ld in ranks:
        ld.load_state_dict(state)
        for b in take(ld, 4):
            assert b["position"] not in seen
            seen[b["position"]] = b["sample_ids"]
    state = ranks[2].state_dict()
    assert state["consumed"] == 22
    last = loader(corpus, s3)
    last.load_state_dict(state)
    for b in take(last, total - 22):
        seen[b["position"]] = b["sample_ids"]
    assert sorted(seen) == list(range(total))
    assert [seen[p] for p in range(total)] == reference
    assert last.epoch == total // n


def test_a_position_from_another_corpus_is_refused(corpus, s3):
    ld = loader(corpus, s3)
    with pytest.raises(ValueError, match="corpus"):
        ld.load_state_dict({"consumed": 4, "seed": 3, "config_hash": "0" * 16})
    with pytest.raises(ValueError, match="seed"):
        ld.load_state_dict(dict(ld.state_dict(), seed=9))


def test_locating_a_whole_epoch_draws_its_order_once():
    """Every row's lookup needs the epoch's permutation: drawn per row, a corpus of 1M sequences paid ~40 ms a row."""
    from pipeline.data import loader as loader_module

    manifest = {"shards": [{"file": "a.arrow", "sequences": 600}, {"file": "b.arrow", "sequences": 400}]}
    dataset = loader_module.PackedDataset("/nowhere/manifest.json", None, seed=3, manifest=manifest)
    loader_module._epoch_order.cache_clear()
    located = [dataset.locate(p) for p in range(2000)]  # two epochs
    assert loader_module._epoch_order.cache_info().misses == 2
    order = np.random.default_rng([3, 0]).permutation(1000)
    assert located[:3] == [(0, int(o)) if o < 600 else (1, int(o) - 600) for o in order[:3]]
    assert sorted(located[:1000]) == [(0, r) for r in range(600)] + [(1, r) for r in range(400)]


def test_the_trainers_prefetch_thread_over_loader_processes_gives_the_same_batches_and_resumes_exactly(corpus, s3):
    """The trainer draws through pipeline/train/prefetch.py: a thread iterating the loader, whose worker
    processes are started from that thread. Same rows as drawing directly, and a resume from the position it
    recorded (behind the loader, which ran ahead) continues with the very next row."""
    from pipeline.train.prefetch import Prefetcher

    class Rows:  # TrainSetup's interface: one row a micro-batch, nothing to pack
        def next_rows(self, batches):
            return [next(batches)]

        def prepare(self, rows):
            return {"sample_ids": rows[0]["sample_ids"], "input_ids": rows[0]["input_ids"]}

        def to_device(self, batch, device):
            return batch

    reference = take(loader(corpus, s3), 9)
    feed = Prefetcher(Rows(), loader(corpus, s3, num_workers=2), count=6)
    got = [feed.next("cpu")[0] for _ in range(4)]
    state = feed.state_dict()
    feed.close()
    assert state["consumed"] == 4
    assert [b["sample_ids"] for b in got] == [b["sample_ids"] for b in reference[:4]]
    assert all(torch.equal(b["input_ids"], r["input_ids"]) for b, r in zip(got, reference))
    resumed = loader(corpus, s3)
    resumed.load_state_dict(state)
    assert [b["sample_ids"] for b in take(resumed, 5)] == [b["sample_ids"] for b in reference[4:]]


def test_the_fork_server_started_early_is_the_one_the_loaders_workers_come_from(corpus, s3):
    """A training process starts the fork server before it builds its model (pipeline/train/worker.py), so the
    server's imports overlap the build; the loader's worker processes must then be forked by that server."""
    import os

    from pipeline.data.engines import start_worker_server
    from tests.helpers import alive, descendants

    server = start_worker_server()
    assert server is not None and start_worker_server() == server  # started once
    os.kill(server, 0)
    batches = iter(loader(corpus, s3, num_workers=2))
    next(batches)  # the workers are up
    workers = [p for p in descendants(server) if alive(p)]  # forked by the server, so not by this process
    assert len(workers) >= 2
    assert all(b["input_ids"].numel() for b in itertools.islice(batches, 3))
