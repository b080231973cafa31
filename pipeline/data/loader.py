"""The training loader: packed sequences from a built corpus, deterministic, sharded, resumable.

    loader = PackedLoader("s3://bucket/corpus/manifest.json", processor, rank=r, world_size=w, seed=0,
                          storage_options=opts, num_workers=2)
    loader.load_state_dict(saved)          # optional: resume
    for batch in loader:                   # infinite; the training loop decides when to stop
        ...
        saved = loader.state_dict()        # with the checkpoint

The stream. All sequences of the corpus are visited in a seeded random order, a new order each epoch,
and the epochs are laid end to end into one stream of positions 0, 1, 2, ... Step k of rank r reads
position `consumed + r + k * world_size`, where `consumed` is where the run (or the resumed run) began.
Every rank takes one batch per step, so after n steps the first `n * world_size` positions are used, by
whichever ranks; that one number is the state, and a resumed run with any world size continues right
after it: no sequence (hence no sample) is repeated or skipped.

A batch is one packed sequence (batch size 1, no padding) as a dict of tensors:
    input_ids [1, T], labels [1, T] (-100 off the assistant turns), mm_token_type_ids [1, T] (0/1/2),
    position_ids [3, 1, T] (M-RoPE, restarting at 0 in every document), cu_seqlens [n_docs + 1] int32,
    pixel_values / image_grid_thw, pixel_values_videos / video_grid_thw (when present), second_per_grid_ts (with
    videos in the processor's "qwen2_5_vl" layout: the other has the time in the text),
and, for bookkeeping, sample_ids (list of str) and position (int).
Decoding images (stored as published), resizing them to their grid and patchifying happen in the
DataLoader's worker processes.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from model.processing import InfiniteVLProcessor
from pipeline import storage

from .engines import worker_context
from .rope import mrope_position_ids, video_runs
from .shards import ShardReader


def read_manifest(manifest_url: str, storage_options: dict | None = None) -> dict:
    return storage.read_json(manifest_url, storage_options)


def shard_urls(manifest_url: str, manifest: dict) -> list[str]:
    root = manifest_url.rsplit("/", 1)[0]
    return [f"{root}/{s['file']}" for s in manifest["shards"]]


def open_shard(url: str, entry: dict, storage_options: dict | None = None) -> ShardReader:
    """A token shard, checked against the sha256 and size its manifest entry records."""
    return ShardReader(url, storage_options, sha256=entry["sha256"], size=entry["bytes"])


class PackedDataset(IterableDataset):
    """The stream of one rank from global position `start` on (see the module docstring)."""

    def __init__(self, manifest_url: str, processor: InfiniteVLProcessor, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start: int = 0, storage_options: dict | None = None,
                 tokens_per_second: float = 2.0, manifest: dict | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.manifest = manifest or read_manifest(manifest_url, storage_options)
        self.urls = shard_urls(manifest_url, self.manifest)
        counts = [s["sequences"] for s in self.manifest["shards"]]
        self.offsets = np.cumsum([0] + counts)
        self.size = int(self.offsets[-1])
        if self.size == 0:
            raise ValueError(f"{manifest_url} has no sequences")
        self.processor, self.rank, self.world_size, self.seed, self.start = processor, rank, world_size, seed, start
        self.storage_options, self.tokens_per_second = storage_options, tokens_per_second

    def locate(self, position: int) -> tuple[int, int]:
        """Global stream position → (shard, row)."""
        epoch, i = divmod(position, self.size)
        sequence = int(_epoch_order(self.seed, epoch, self.size)[i])
        shard = int(np.searchsorted(self.offsets, sequence, side="right") - 1)
        return shard, sequence - int(self.offsets[shard])

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        readers: dict[int, ShardReader] = {}
        step = worker
        while True:
            position = self.start + self.rank + step * self.world_size
            shard, row = self.locate(position)
            if shard not in readers:
                if len(readers) >= 4:
                    readers.pop(next(iter(readers))).close()
                readers[shard] = open_shard(self.urls[shard], self.manifest["shards"][shard], self.storage_options)
            example = example_from_row(readers[shard].row(row), self.processor, self.tokens_per_second)
            example["position"] = position
            yield example
            step += workers


class PackedLoader:
    """`PackedDataset` behind a torch DataLoader, with the position kept where the trainer sees it."""

    def __init__(self, manifest_url: str, processor: InfiniteVLProcessor, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int = 2, storage_options: dict | None = None,
                 tokens_per_second: float = 2.0, prefetch_factor: int = 2):
        self.manifest_url, self.processor = manifest_url, processor
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.storage_options, self.tokens_per_second = storage_options, tokens_per_second
        self.manifest = read_manifest(manifest_url, storage_options)
        self.consumed = 0

    @property
    def sequences_per_epoch(self) -> int:
        return sum(s["sequences"] for s in self.manifest["shards"])

    @property
    def epoch(self) -> int:
        return self.consumed // self.sequences_per_epoch

    def __iter__(self):
        dataset = PackedDataset(self.manifest_url, self.processor, rank=self.rank, world_size=self.world_size,
                                seed=self.seed, start=self.consumed, storage_options=self.storage_options,
                                tokens_per_second=self.tokens_per_second, manifest=self.manifest)
        kwargs = {}
        if self.num_workers:
            # not forked from the trainer: a fork inherits its live S3 client (see pipeline.data.engines)
            kwargs = dict(prefetch_factor=self.prefetch_factor, multiprocessing_context=worker_context(),
                          persistent_workers=False)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, **kwargs)
        for batch in loader:
            # every rank takes a batch this step, so world_size positions are now used
            self.consumed += self.world_size
            yield batch

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "config_hash": self.manifest["config_hash"],
                "sequences_per_epoch": self.sequences_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        if state["config_hash"] != self.manifest["config_hash"]:
            raise ValueError(f"the saved position is in corpus {state['config_hash']}, this loader reads "
                             f"{self.manifest['config_hash']}")
        if state["seed"] != self.seed:
            raise ValueError(f"the saved position is for seed {state['seed']}, this loader has seed {self.seed}")
        self.consumed = int(state["consumed"])


def iter_sequences(manifest_url: str, processor: InfiniteVLProcessor, storage_options: dict | None = None,
                   shards: list[int] | None = None, tokens_per_second: float = 2.0):
    """Every sequence of the corpus once, in file order: (shard, row, example). For passes such as the
    teacher-logit stage, which writes its output shard by shard beside the tokens."""
    manifest = read_manifest(manifest_url, storage_options)
    urls = shard_urls(manifest_url, manifest)
    for shard in range(len(urls)) if shards is None else shards:
        reader = open_shard(urls[shard], manifest["shards"][shard], storage_options)
        try:
            for row in range(len(reader)):
                yield shard, row, example_from_row(reader.row(row), processor, tokens_per_second)
        finally:
            reader.close()


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    # cached: every row's lookup asks for it, and a permutation of 1M sequences takes ~40 ms (10M: 0.6 s)
    order = np.random.default_rng([seed, epoch]).permutation(size)
    order.flags.writeable = False
    return order


def example_from_row(row: dict, processor: InfiniteVLProcessor, tokens_per_second: float = 2.0) -> dict:
    """One shard row → the model's inputs (see the module docstring)."""
    ids = torch.tensor(row["input_ids"], dtype=torch.long)
    mm = torch.zeros_like(ids, dtype=torch.int32)
    mm[ids == processor.image_token_id] = 1
    mm[ids == processor.video_token_id] = 2
    out = {"input_ids": ids[None], "labels": torch.tensor(row["labels"], dtype=torch.long)[None],
           "mm_token_type_ids": mm[None],
           "cu_seqlens": torch.tensor(np.cumsum([0] + row["doc_lens"]), dtype=torch.int32)}
    image_grid = torch.tensor(row["image_grid_thw"], dtype=torch.long).reshape(-1, 3)
    video_grid = torch.tensor(row["video_grid_thw"], dtype=torch.long).reshape(-1, 3)
    seconds = torch.tensor(row["second_per_grid_ts"], dtype=torch.float32)
    if len(image_grid):
        out["pixel_values"] = image_patches(row["images"], image_grid.tolist(), processor)
        out["image_grid_thw"] = image_grid
    if len(video_grid):
        videos = [_video_patches(frames, s, processor) for frames, s in zip(row["videos"], seconds.tolist())]
        out["pixel_values_videos"] = torch.cat([p for p, _ in videos])
        out["video_grid_thw"] = torch.cat([g for _, g in videos])
        if processor.video_layout == "qwen2_5_vl":  # the "qwen3_vl" layout has the time in the text instead
            out["second_per_grid_ts"] = seconds
        _check_grids(out["video_grid_thw"], video_grid, "video")
    out["position_ids"] = _document_positions(mm, out["cu_seqlens"], image_grid, video_grid, seconds,
                                              processor.merge_size, tokens_per_second,
                                              processor.video_layout)[:, None]
    out["sample_ids"] = list(row["sample_ids"])
    return out


def image_patches(images: list[bytes], grids: list[list[int]], processor: InfiniteVLProcessor) -> torch.Tensor:
    """The images' patches as the family's Qwen-VL image processor makes them (its patch size and normalisation):
    each image (stored as published) to RGB, resized bicubic to its tokenized grid, scaled to [0, 1] and
    normalised, cut into patches of (channel, time, row, column) with the picture repeated over the temporal
    patch, merged patches adjacent. Bytes are rearranged while they are bytes, then scaled in one float pass and written into
    one array for all images (the processor's own path copies each image's floats several times)."""
    ip, p, m, tp = processor.image_processor, processor.patch_size, processor.merge_size, processor.temporal_patch_size
    std, mean = np.asarray(ip.image_std, np.float32)[:, None], np.asarray(ip.image_mean, np.float32)[:, None]
    scale, shift = 1 / (255 * std), -mean / std
    out = np.empty((sum(gh * gw for _, gh, gw in grids), 3 * tp * p * p), dtype=np.float32)
    start = 0
    for data, (_, gh, gw) in zip(images, grids):
        image = Image.open(io.BytesIO(data)).convert("RGB")
        if image.size != (gw * p, gh * p):
            image = image.resize((gw * p, gh * p), Image.BICUBIC)
        n = gh * gw
        pixels = np.asarray(image).reshape(gh // m, m, p, gw // m, m, p, 3)
        values = pixels.transpose(0, 3, 1, 4, 6, 2, 5).reshape(n, 3, p * p).astype(np.float32)
        values *= scale
        values += shift
        dst = out[start:start + n].reshape(n, 3, tp, p * p)
        for t in range(tp):
            dst[:, :, t] = values
        start += n
    return torch.from_numpy(out)


def _video_patches(frames: list[bytes], seconds_per_grid: float, processor: InfiniteVLProcessor):
    images = [Image.open(io.BytesIO(f)).convert("RGB") for f in frames]
    area = images[0].size[0] * images[0].size[1]
    res = processor.preprocess_video(images, fps=processor.temporal_patch_size / seconds_per_grid,
                                     min_pixels=area, max_pixels=area)
    return res["pixel_values_videos"], res["video_grid_thw"]


def _check_grids(got: torch.Tensor, stored: torch.Tensor, what: str) -> None:
    if not torch.equal(got, stored):
        raise ValueError(f"{what} grids {got.tolist()} differ from the tokenized ones {stored.tolist()}: the "
                         "processor does not match the one the corpus was built with")


def _document_positions(mm: torch.Tensor, cu_seqlens: torch.Tensor, image_grid: torch.Tensor,
                        video_grid: torch.Tensor, seconds: torch.Tensor, merge: int, tps: float,
                        video_layout: str = "qwen2_5_vl") -> torch.Tensor:
    """M-RoPE positions per document, each starting from 0, concatenated: [3, T]."""
    pieces, n_img, n_vid = [], 0, 0
    bounds = cu_seqlens.tolist()
    # the number of video token runs in the text up to and including each video
    runs_through = video_runs(video_grid, video_layout).cumsum(0).tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        types = mm[a:b]
        runs = torch.unique_consecutive(types)
        k_img = int((runs == 1).sum())
        seen = (runs_through[n_vid - 1] if n_vid else 0) + int((runs == 2).sum())
        k_vid = sum(1 for r in runs_through[n_vid:] if r <= seen)
        pieces.append(mrope_position_ids(types, image_grid[n_img:n_img + k_img], video_grid[n_vid:n_vid + k_vid],
                                         seconds[n_vid:n_vid + k_vid], merge, tps, video_layout))
        n_img, n_vid = n_img + k_img, n_vid + k_vid
    return torch.cat(pieces, dim=1)
