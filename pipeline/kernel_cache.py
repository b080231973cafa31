"""Kernel tuning shared through the run root, so that a fresh node does not tune again what the run has tuned.

On GPUs, fla's Triton kernels benchmark their candidate configurations the first time they meet a shape: minutes
on a fresh node (the proof's Stage III spent more than 4 minutes of its first step on it on an H100). Triton keeps
each winner in its cache as `<key>/<kernel>.autotune.json` (with TRITON_CACHE_AUTOTUNING=1, which stage processes
get by default, pipeline/launch.py), `<key>` hashing the kernel's source, Triton's version, the GPU target and the
shapes' tuning key: an entry is right wherever it is found. A node's cache outlives its stages only where the
node does; a Kubernetes pod per stage, or a new node after a failure, starts empty. So the first process of each
node (local rank 0) of a training stage, of the eval stage and of a checkpoint's evaluation (`shared_tuning`):
- before building anything, `restore()`s every bundle under `<run root>/_kernel_cache/` into its Triton cache
  (entries already there stay as they are);
- after its first step and at its end (an evaluation: at its end), `publish()`es the entries that appeared or
  changed in its cache since it started and that no bundle holds yet, as one new bundle, written whole or not at
  all (what the cache held before, e.g. the configurations infra/autotune ships or another run's, stays local).
A bundle is JSON: {"entries": {relative path: file text}, "sha256": the digest of the entries}. One whose digest
does not match, or an entry whose path or text is not a Triton autotune entry, is skipped with a warning naming
it: tuning is a speed hint, never a reason to stop a stage. (The teacher-logit stage, whose teachers run fla's kernels
only for Qwen3.5, tunes on its own.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import uuid

from pipeline import storage

FOLDER = "_kernel_cache"
ENTRY = re.compile(r"^[A-Za-z0-9_-]+/[A-Za-z0-9_.-]+\.autotune\.json$")  # <key>/<kernel>.autotune.json


def triton_cache_dir() -> str:
    """Where Triton keeps its cache in this process (its own rule: TRITON_CACHE_DIR, else TRITON_HOME's or the
    home folder's .triton/cache)."""
    explicit = os.environ.get("TRITON_CACHE_DIR")
    if explicit:
        return explicit
    return os.path.join(os.environ.get("TRITON_HOME") or os.path.expanduser("~"), ".triton", "cache")


def local_entries(cache_dir: str) -> dict[str, str]:
    """The autotune entries of a Triton cache: relative path -> text."""
    entries = {}
    if not os.path.isdir(cache_dir):
        return entries
    for key in sorted(os.listdir(cache_dir)):
        folder = os.path.join(cache_dir, key)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            rel = f"{key}/{name}"
            if ENTRY.match(rel):
                with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                    entries[rel] = f.read()
    return entries


def digest(entries: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


class KernelCache:
    """One node's link between its Triton cache and the run root's bundles. `warn` receives a line per skipped
    bundle or entry."""

    def __init__(self, url: str, cache_dir: str | None = None, name: str = "stage", warn=print):
        self.url = url
        self.cache_dir = cache_dir or triton_cache_dir()
        self.name = re.sub(r"[^A-Za-z0-9_.-]", "-", name)
        self.warn = warn
        self.held: set[str] = set()      # entries the run root's bundles hold (those read so far)
        self.read: set[str] = set()      # bundle URLs read (or skipped) already
        self.before = local_entries(self.cache_dir)  # the cache as this process found it (a few KB an entry)

    def _bundles(self) -> list[dict[str, str]]:
        """The valid entries of each bundle not read before (a damaged bundle gives none)."""
        found = []
        for url in storage.list_files(self.url, suffix=".json"):
            if url in self.read:
                continue
            self.read.add(url)
            entries = self._load(url)
            if entries is not None:
                found.append(entries)
        return found

    def _load(self, url: str) -> dict[str, str] | None:
        try:
            bundle = json.loads(storage.read_bytes(url))
            entries = bundle["entries"]
            if not isinstance(entries, dict) or digest(entries) != bundle["sha256"]:
                raise ValueError(f"its entries do not match its sha256 {str(bundle.get('sha256'))[:12]}")
        except (ValueError, KeyError, TypeError) as e:
            self.warn(f"kernel tuning: skipped the bundle {url}: {e}")
            return None
        good = {}
        for rel, text in entries.items():
            if not isinstance(rel, str) or not ENTRY.match(rel) or not isinstance(text, str):
                self.warn(f"kernel tuning: skipped the entry {rel!r} of {url}: not a Triton autotune entry")
                continue
            try:
                json.loads(text)
            except ValueError:
                self.warn(f"kernel tuning: skipped the entry {rel} of {url}: its text is not JSON")
                continue
            good[rel] = text
        return good

    def restore(self) -> int:
        """Unpacks the run root's bundles into the local cache; returns how many entries were new here."""
        added = 0
        for entries in self._bundles():
            for rel, text in entries.items():
                self.held.add(rel)
                path = os.path.join(self.cache_dir, rel)
                if os.path.exists(path):
                    continue
                storage.write_bytes(path, text.encode())  # whole or not at all: other processes read this cache
                added += 1
        return added

    def publish(self) -> tuple[int, str | None]:
        """Writes the entries tuned here since this object was made that no bundle holds, as one new bundle;
        returns (their count, its URL or None)."""
        for entries in self._bundles():  # what other nodes published since
            self.held.update(entries)
        new = {rel: text for rel, text in local_entries(self.cache_dir).items()
               if self.before.get(rel) != text and rel not in self.held}
        if not new:
            return 0, None
        url = storage.join(self.url, f"{self.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json")
        storage.write_bytes(url, json.dumps({"entries": new, "sha256": digest(new)}, sort_keys=True).encode())
        self.read.add(url)
        self.held.update(new)
        return len(new), url


def restore_tuning(url: str | None, name: str, local_rank: int, world: int, log) -> KernelCache | None:
    """In a process group (torch.distributed joined when `world` > 1): the node's first process fills its Triton
    cache from the run's bundles at `url` while the others wait. Returns its KernelCache (None on the other
    processes, or without a `url`). A storage error costs the tuning, never the stage."""
    tuning = None
    if url and local_rank == 0:
        try:
            tuning = KernelCache(url, name=name, warn=log)
            added = tuning.restore()
            if added:
                log(f"{name}: {added} tuned kernel configurations from the run root ({url}) in this node's "
                    f"Triton cache ({tuning.cache_dir})")
        except Exception as e:  # noqa: BLE001 - a speed hint
            log(f"{name}: kernel tuning not restored from {url}: {e}")
    if url and world > 1:
        import torch
        import torch.distributed as dist

        # without device_ids NCCL's barrier guesses the device from the rank, and warns
        dist.barrier(**({"device_ids": [local_rank]} if torch.cuda.is_available() else {}))
    return tuning


def publish_tuning(tuning: KernelCache | None, log) -> None:
    """The node's new entries into a bundle of their own (on the node's first process; nothing elsewhere)."""
    if tuning is None:
        return
    try:
        count, url = tuning.publish()
        if count:
            log(f"{tuning.name}: {count} tuned kernel configurations of this node that the run root lacked, "
                f"published for the run's later stages and nodes: {url}")
    except Exception as e:  # noqa: BLE001 - a speed hint
        log(f"{tuning.name}: kernel tuning not published to {tuning.url}: {e}")


@contextlib.contextmanager
def shared_tuning(root: str, name: str, log, local_rank: int = 0, world: int = 1):
    """A block of GPU work (an evaluation) that starts from the run's shared tuning under `root` (a run root) and
    publishes what it tuned when it ends, also when it fails."""
    tuning = restore_tuning(storage.join(root, FOLDER), name, local_rank, world, log)
    try:
        yield tuning
    finally:
        publish_tuning(tuning, log)


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.kernel_cache RUN_ROOT [--into DIR]`: a run's shared kernel tuning into a Triton
    cache (this process's by default), e.g. to warm a node before its first stage or to pack it for infra/autotune."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m pipeline.kernel_cache",
                                description="Copies a run's shared kernel tuning into a Triton cache.")
    p.add_argument("root", help="the run root (local folder or s3:// URL)")
    p.add_argument("--into", default=None, help="the Triton cache to fill (default: TRITON_CACHE_DIR, else ~/.triton/cache)")
    args = p.parse_args(argv)
    cache = KernelCache(storage.join(args.root, FOLDER), args.into)
    added = cache.restore()
    print(f"{added} tuned kernel configurations from {cache.url} added to {cache.cache_dir} "
          f"({len(cache.held)} in the run root's {len(cache.read)} bundles)")
    return added


if __name__ == "__main__":
    main()
