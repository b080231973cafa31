"""What Stage I-b's KL loss reads: the stored teacher top-k for the packed batch the loader just gave.

    reader = TeacherLogitReader("<run>/teacher-logits")              # the store's folder or manifest.json
    for batch in PackedLoader(data_manifest, processor, seed=s, ...):
        target = reader.for_batch(batch, seed=s).to(device)          # TeacherTargets, see below
        student_logits = out.logits[0, target.positions]             # [N, vocab], same positions

The loader names a batch by its stream position; the reader maps it to (shard, row) exactly as the
loader does (`PackedDataset.locate`, same seed) and checks the stored row's sample ids and length
against the batch, so a store built from another corpus or a loader with another seed fails loudly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from pipeline import storage

from .encoding import SparseEncoding
from .shards import covered_from_row, encoded_from_row
from .store import MANIFEST, logit_shard_url


@dataclass
class TeacherTargets:
    """The teacher's sparse next-token distribution on one packed row of T tokens, N of them covered.

    mask       [1, T] bool     positions with a stored distribution (the KL loss's token mask)
    positions  [N] int64       their indices into the row, ascending (mask.nonzero())
    indices    [N, k] int64    top-k token ids, largest teacher logit first
    log_probs  [N, k] float32  teacher log-probabilities at temperature 1, normalised over the full vocab
    log_tail   [N] float32     log of the teacher's mass outside the top-k (-inf when k = vocab)
    """
    mask: torch.Tensor
    positions: torch.Tensor
    indices: torch.Tensor
    log_probs: torch.Tensor
    log_tail: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "TeacherTargets":
        return TeacherTargets(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                                 for f in fields(self)})

    @property
    def topk_mass(self) -> torch.Tensor:
        """[N] probability mass the stored top-k covers."""
        return self.log_probs.exp().sum(-1)

    def tempered_log_probs(self, temperature: float) -> torch.Tensor:
        """[N, k] log softmax(z / T) over the top-k ids alone (renormalised: the tail cannot be tempered,
        its logits are not stored). At T = 1 this is the stored distribution conditioned on the top-k."""
        return torch.log_softmax(self.log_probs / temperature, dim=-1)


class TeacherLogitReader:
    def __init__(self, url: str, storage_options: dict | None = None):
        self.root = url.removesuffix("/" + MANIFEST).removesuffix(MANIFEST).rstrip("/") or "."
        self.storage_options = storage_options
        self.manifest = storage.read_json(storage.join(self.root, MANIFEST), storage_options)
        enc = self.manifest["encoding"]
        self.encoding = SparseEncoding(enc["k"], enc["vocab_size"], enc["values"])
        self._data_shards = self.manifest["data"]["shards"]
        self._readers: dict[int, object] = {}
        self._locators: dict[int, object] = {}

    @property
    def k(self) -> int:
        return self.encoding.k

    @property
    def vocab_size(self) -> int:
        return self.encoding.vocab_size

    def row(self, shard_index: int, row: int) -> tuple[dict, TeacherTargets]:
        """(stored row metadata, targets) of row `row` of the `shard_index`-th shard of the corpus."""
        stored = self._reader(shard_index).row(row)
        mask = covered_from_row(stored)
        indices, log_probs, log_tail = self.encoding.decode(
            encoded_from_row(stored, self.encoding.bytes_per_position))
        positions = mask.nonzero()[:, 0]
        if len(positions) != len(indices):
            raise ValueError(f"shard {shard_index} row {row}: {len(positions)} covered positions but "
                             f"{len(indices)} stored distributions; the store is corrupt")
        return stored, TeacherTargets(mask[None], positions, indices, log_probs, log_tail)

    def for_batch(self, batch: dict, seed: int) -> TeacherTargets:
        """Targets aligned with a `PackedLoader` batch of a loader with this `seed`."""
        shard_index, row = self._locator(seed).locate(int(batch["position"]))
        stored, targets = self.row(shard_index, row)
        length = batch["input_ids"].shape[-1]
        if stored["sample_ids"] != list(batch["sample_ids"]) or stored["tokens"] != length:
            raise ValueError(
                f"teacher logits of shard {shard_index} row {row} are for samples {stored['sample_ids'][:3]} "
                f"({stored['tokens']} tokens), the batch holds {list(batch['sample_ids'])[:3]} ({length} tokens): "
                f"the store was built from another corpus ({self.manifest['data']['manifest']}) or the loader's "
                f"seed is not {seed}")
        return targets

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def _reader(self, shard_index: int):
        from pipeline.data.shards import ShardReader

        if shard_index not in self._readers:
            if len(self._readers) >= 4:
                self._readers.pop(next(iter(self._readers))).close()
            url = logit_shard_url(self.root, self._data_shards[shard_index]["file"])
            entry = self.manifest["shards"][shard_index]  # the sha256 the store committed for this shard
            self._readers[shard_index] = ShardReader(url, self.storage_options, sha256=entry["sha256"],
                                                     size=entry["bytes"])
        return self._readers[shard_index]

    def _locator(self, seed: int):
        from pipeline.data.loader import PackedDataset

        if seed not in self._locators:
            # the loader's own position → (shard, row) map; it needs the shard sizes only, no I/O
            self._locators[seed] = PackedDataset(self.manifest["data"]["manifest"], None, seed=seed,
                                                 manifest={"shards": self._data_shards})
        return self._locators[seed]
