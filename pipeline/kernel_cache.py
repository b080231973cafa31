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

torch.compile's work goes the same way. The compiled sliding-window attention (flex, forward and backward) costs a
fresh node's first step more than a minute of compiling that a warm node does not pay (the proof's Stage II on an
H100: first step 128+ s after start cold, 63 s warm). torch serialises what a process compiled (Inductor's graphs
with their Triton kernels, dynamo's dynamic-shape decisions; `torch.compiler.save_cache_artifacts`) and loads such
bytes into a fresh process's caches (`load_cache_artifacts`), where they are used only when the graph, torch and
the device match. Those bundles sit under `<run root>/_kernel_cache/compiled/<torch version>-<device>/` as
`<name>-<host>-<pid>-<id>.bin`: one JSON header line {"sha256": the payload's digest, "keys": the artifacts it holds}
then the payload. The node's first process loads every bundle of its own torch and device before building; after
the first step and at the end it publishes its artifacts when they hold any key no bundle holds yet (torch gives
all of a process's artifacts at once, so its second bundle replaces its first). torch's artifacts are pickles: whoever
can write the run root can run code on the nodes that load them (Triton's entries are plain JSON). Where the run root
is writable by people who should not have that, INFINITEVL_SHARE_COMPILED=0 keeps compiled kernels on their node.

fla's own Triton kernels are compiled outside torch.compile, by Triton, once per node: on a fresh H100 the node's
first stage spent 24 s compiling them (fla's gradient check, pipeline/train/worker.py) where a warm node spends 1 s.
Triton keeps each compiled kernel in its cache as a group: `<key>/<kernel>.json` (its metadata), the GPU binary
(`<kernel>.cubin`), its intermediate forms, and `<key>/__grp__<kernel>.json` naming the group's files, `<key>`
hashing the source, Triton's version, the target GPU and the options: like an autotune entry, right wherever found.
Those travel as `<run root>/_kernel_cache/kernels/<triton version>-<device>/<name>-<host>-<pid>-<id>.bin`, one JSON
header line {"sha256", "keys": the `<key>/<kernel>` it holds} then a gzipped tar of each kernel's metadata and binary
(what Triton's TRITON_STORE_BINARY_ONLY keeps too). A restored kernel's group file, naming the files where this
node keeps them, is written last, so Triton sees a kernel whole or not at all. The node's first process restores
them with the rest and publishes the kernels compiled since it started that no bundle holds. GPU binaries run code
as much as pickles do: INFINITEVL_SHARE_COMPILED=0 keeps them on their node too.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import socket
import tarfile
import uuid

from pipeline import storage

FOLDER = "_kernel_cache"
COMPILED = "compiled"  # torch.compile's artifacts, one folder per torch version and device
KERNELS = "kernels"  # Triton's compiled kernels, one folder per Triton version and device
ENTRY = re.compile(r"^[A-Za-z0-9_-]+/[A-Za-z0-9_.-]+\.autotune\.json$")  # <key>/<kernel>.autotune.json
KERNEL_FILE = re.compile(r"^([A-Za-z0-9_-]+)/([A-Za-z0-9_-]+)\.(json|cubin|hsaco)$")  # <key>/<kernel>.<ext>
BINARIES = ("cubin", "hsaco")  # what a launch loads beside the metadata (CUDA, ROCm)


def triton_cache_dir() -> str:
    """Where Triton keeps its cache in this process (its own rule: TRITON_CACHE_DIR, else TRITON_HOME's or the
    home folder's .triton/cache)."""
    explicit = os.environ.get("TRITON_CACHE_DIR")
    if explicit:
        return explicit
    return os.path.join(os.environ.get("TRITON_HOME") or os.path.expanduser("~"), ".triton", "cache")


def _cache_files(cache_dir: str):
    """(key, folder, file name) of each file one level down a Triton cache (`<key>/<file>`), in order."""
    if not os.path.isdir(cache_dir):
        return
    for key in sorted(os.listdir(cache_dir)):
        folder = os.path.join(cache_dir, key)
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                yield key, folder, name


def local_entries(cache_dir: str) -> dict[str, str]:
    """The autotune entries of a Triton cache: relative path -> text."""
    entries = {}
    for key, folder, name in _cache_files(cache_dir):
        rel = f"{key}/{name}"
        if ENTRY.match(rel):
            with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                entries[rel] = f.read()
    return entries


def local_kernels(cache_dir: str) -> dict[str, dict[str, str]]:
    """Triton's compiled kernels in a cache, those whose group is whole: `<key>/<kernel>` -> {file name: path} of
    its metadata and its binary (the intermediate forms stay behind: a launch does not read them)."""
    found = {}
    for key, folder, name in _cache_files(cache_dir):
        if not (name.startswith("__grp__") and name.endswith(".json")):
            continue
        kernel = name[len("__grp__"):-len(".json")]
        try:
            with open(os.path.join(folder, name)) as f:
                children = json.load(f)["child_paths"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # Triton writes its group files whole; another tool's file is not ours to share
        files = {}
        for child in children:
            match = KERNEL_FILE.match(f"{key}/{child}")
            if match and match.group(2) == kernel and os.path.exists(os.path.join(folder, child)):
                files[child] = os.path.join(folder, child)
        if f"{kernel}.json" in files and any(c.endswith(tuple(f".{b}" for b in BINARIES)) for c in files):
            found[f"{key}/{kernel}"] = files
    return found


def pack_kernels(kernels: dict[str, dict[str, str]]) -> bytes:
    """A gzipped tar of the kernels' files as `<key>/<file>`."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for kernel, files in sorted(kernels.items()):
            key = kernel.split("/")[0]
            for child, path in sorted(files.items()):
                with open(path, "rb") as f:
                    data = f.read()
                info = tarfile.TarInfo(f"{key}/{child}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def unpack_kernels(payload: bytes) -> tuple[dict[str, dict[str, bytes]], list[str]]:
    """({`<key>/<kernel>`: {file name: bytes}} of the whole kernels a bundle's payload holds, [what was left out
    and why]). ValueError when the payload is not a gzipped tar."""
    kernels: dict[str, dict[str, bytes]] = {}
    skipped = []
    try:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as tar:
            for member in tar.getmembers():
                match = KERNEL_FILE.match(member.name)
                if not match or not member.isfile():
                    skipped.append(f"{member.name!r}: not a Triton kernel's metadata or binary")
                    continue
                kernels.setdefault(f"{match.group(1)}/{match.group(2)}", {})[
                    member.name.split("/")[1]] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"its payload is not a gzipped tar: {e}") from None
    whole = {}
    for kernel, files in kernels.items():
        name = kernel.split("/")[1]
        try:
            json.loads(files.get(f"{name}.json", b""))
        except ValueError:
            skipped.append(f"{kernel}: its metadata is missing or not JSON")
            continue
        if not any(f"{name}.{b}" in files for b in BINARIES):
            skipped.append(f"{kernel}: no binary")
            continue
        whole[kernel] = files
    return whole, skipped


def digest(entries: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def _device_tag() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}"


def compile_tag() -> str:
    """The torch version and device torch.compile's artifacts were made for: `torch2.11.0+cu130-sm90`, `...-cpu`."""
    import torch

    return re.sub(r"[^A-Za-z0-9_.+-]", "-", f"torch{torch.__version__}-{_device_tag()}")


def kernels_tag() -> str:
    """Triton's version and the device its kernels were compiled for: `triton3.6.0-sm90`."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        triton = version("triton")
    except PackageNotFoundError:
        triton = "none"
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", f"triton{triton}-{_device_tag()}")


def pack_compiled(payload: bytes, keys: set[str]) -> bytes:
    header = {"sha256": hashlib.sha256(payload).hexdigest(), "keys": sorted(keys)}
    return json.dumps(header, sort_keys=True).encode() + b"\n" + payload


def compiled_header(line: bytes) -> tuple[set[str], str]:
    """(keys, payload sha256) of a compiled bundle's first line; ValueError when it is not a bundle header."""
    try:
        header = json.loads(line)
        keys, expected = header["keys"], header["sha256"]
    except (ValueError, KeyError, TypeError):
        raise ValueError("its first line is not a bundle header") from None
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or not isinstance(expected, str):
        raise ValueError("its first line is not a bundle header")
    return set(keys), expected


def unpack_compiled(data: bytes) -> tuple[set[str], bytes]:
    """(keys, payload) of a compiled bundle; ValueError when its header or digest does not check."""
    head, _, payload = data.partition(b"\n")
    keys, expected = compiled_header(head)
    if hashlib.sha256(payload).hexdigest() != expected:
        raise ValueError(f"its payload does not match its sha256 {expected[:12]}")
    return keys, payload


def sharing_compiled() -> bool:
    """Whether torch.compile's artifacts travel through the run root (INFINITEVL_SHARE_COMPILED, default on)."""
    return os.environ.get("INFINITEVL_SHARE_COMPILED", "1") != "0"


def compiled_artifacts() -> tuple[bytes, set[str]] | None:
    """What this process compiled (and loaded) so far, serialised by torch, with its artifact keys; None if nothing."""
    import torch

    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    payload, info = saved
    return payload, {f"{kind}:{key}" for kind, keys in info.artifacts.items() for key in keys}


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
        self.compiled_held: set[str] = set()  # torch.compile artifact keys the run root's bundles hold
        self.compiled_read: set[str] = set()
        self.compiled_own: str | None = None  # this process's bundle: replaced by a larger one as it compiles more
        self.kernels_before = set(local_kernels(self.cache_dir)) if sharing_compiled() else set()
        self.kernels_held: set[str] = set()  # Triton kernels the run root's bundles hold
        self.kernels_read: set[str] = set()

    @functools.cached_property
    def compiled_url(self) -> str:
        """Where this torch and device's compiled bundles sit (asked only where they are used: it imports torch)."""
        return storage.join(self.url, COMPILED, compile_tag())

    @functools.cached_property
    def kernels_url(self) -> str:
        """Where this Triton and device's compiled kernels sit."""
        return storage.join(self.url, KERNELS, kernels_tag())

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

    def _compiled_bundles(self, payloads: bool, folder: str | None = None, read: set[str] | None = None,
                          what: str = "compiled kernels"):
        """(url, keys, payload or None) of each bundle in `folder` (torch.compile's by default) not in `read`;
        a damaged one is skipped. Without `payloads` only headers are read (ranged reads on S3)."""
        folder = self.compiled_url if folder is None else folder
        read = self.compiled_read if read is None else read
        for url in storage.list_files(folder, suffix=".bin"):
            if url in read:
                continue
            read.add(url)
            try:
                if payloads:
                    keys, payload = unpack_compiled(storage.read_bytes(url))
                else:  # the header alone: what the bundle holds, not yet the bytes
                    with storage.open_url(url) as f:
                        keys, payload = compiled_header(f.readline())[0], None
            except (ValueError, OSError) as e:  # damaged, or replaced by its process since it was listed
                self.warn(f"{what}: skipped the bundle {url}: {e}")
                continue
            yield url, keys, payload

    def restore_compiled(self) -> int:
        """Loads the run root's torch.compile bundles for this torch and device into this process's compile caches
        (call it before anything compiles); returns how many distinct artifacts they held."""
        import torch

        loaded = 0
        if not sharing_compiled():
            return loaded
        for url, keys, payload in self._compiled_bundles(payloads=True):
            try:
                info = torch.compiler.load_cache_artifacts(payload)
            except Exception as e:  # noqa: BLE001 - torch's format; a speed hint
                self.warn(f"compiled kernels: skipped the bundle {url}: torch could not load it: {e}")
                continue
            if info is None:
                self.warn(f"compiled kernels: skipped the bundle {url}: torch could not read it")
                continue
            loaded += len(keys - self.compiled_held)
            self.compiled_held.update(keys)
        return loaded

    def publish_compiled(self) -> tuple[int, str | None]:
        """Writes this process's torch.compile artifacts as one new bundle when they hold a key no bundle holds;
        returns (the count of such keys, the bundle's URL or None)."""
        if not sharing_compiled():
            return 0, None
        for _, keys, _ in self._compiled_bundles(payloads=False):
            self.compiled_held.update(keys)
        made = compiled_artifacts()
        if made is None:
            return 0, None
        payload, keys = made
        new = keys - self.compiled_held
        if not new:
            return 0, None
        url = storage.join(self.compiled_url,
                           f"{self.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.bin")
        storage.write_bytes(url, pack_compiled(payload, keys))
        self.compiled_read.add(url)
        self.compiled_held.update(keys)
        # torch serialises everything the process compiled so far: the new bundle holds the older one whole
        if self.compiled_own is not None:
            storage.delete(self.compiled_own)
        self.compiled_own = url
        return len(new), url

    def restore_kernels(self) -> int:
        """Writes the run root's compiled Triton kernels for this Triton and device into the local cache (those it
        lacks); returns how many were new here."""
        added = 0
        if not sharing_compiled():
            return added
        have = set(local_kernels(self.cache_dir))
        for url, _, payload in self._compiled_bundles(True, self.kernels_url, self.kernels_read, "Triton kernels"):
            try:
                kernels, skipped = unpack_kernels(payload)
            except ValueError as e:
                self.warn(f"Triton kernels: skipped the bundle {url}: {e}")
                continue
            for why in skipped:
                self.warn(f"Triton kernels: skipped {why} in {url}")
            for kernel, files in kernels.items():
                self.kernels_held.add(kernel)
                if kernel in have:
                    continue
                key, name = kernel.split("/")
                folder = os.path.join(self.cache_dir, key)
                paths = {}
                for child, data in files.items():
                    paths[child] = os.path.join(folder, child)
                    storage.write_bytes(paths[child], data)
                # last: Triton takes a kernel from its cache only through its group file
                storage.write_bytes(os.path.join(folder, f"__grp__{name}.json"),
                                    json.dumps({"child_paths": paths}).encode())
                have.add(kernel)
                added += 1
        return added

    def publish_kernels(self) -> tuple[int, str | None]:
        """Writes the Triton kernels compiled here since this object was made that no bundle holds, as one new
        bundle; returns (their count, its URL or None)."""
        if not sharing_compiled():
            return 0, None
        for _, keys, _ in self._compiled_bundles(False, self.kernels_url, self.kernels_read, "Triton kernels"):
            self.kernels_held.update(keys)
        new = {kernel: files for kernel, files in local_kernels(self.cache_dir).items()
               if kernel not in self.kernels_before and kernel not in self.kernels_held}
        if not new:
            return 0, None
        url = storage.join(self.kernels_url,
                           f"{self.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.bin")
        storage.write_bytes(url, pack_compiled(pack_kernels(new), set(new)))
        self.kernels_read.add(url)
        self.kernels_held.update(new)
        return len(new), url


def restore_tuning(url: str | None, name: str, local_rank: int, world: int, log) -> KernelCache | None:
    """In a process group (torch.distributed joined when `world` > 1): the node's first process fills its Triton
    cache and torch.compile's caches from the run's bundles at `url` while the others wait. Returns its KernelCache
    (None on the other processes, or without a `url`). A storage error costs the tuning, never the stage."""
    tuning = None
    if url and local_rank == 0:
        try:
            tuning = KernelCache(url, name=name, warn=log)
            added = tuning.restore()
            if added:
                log(f"{name}: {added} tuned kernel configurations from the run root ({url}) in this node's "
                    f"Triton cache ({tuning.cache_dir})")
            kernels = tuning.restore_kernels()
            if kernels:
                log(f"{name}: {kernels} compiled Triton kernels from the run root ({tuning.kernels_url}) in this "
                    f"node's Triton cache")
            loaded = tuning.restore_compiled()
            if loaded:
                log(f"{name}: {loaded} compiled artifacts from the run root ({tuning.compiled_url}) in this node's "
                    "torch.compile caches")
        except Exception as e:  # noqa: BLE001 - a speed hint
            log(f"{name}: kernel tuning not restored from {url}: {e}")
    if url and world > 1:
        import torch
        import torch.distributed as dist

        # without device_ids NCCL's barrier guesses the device from the rank, and warns
        dist.barrier(**({"device_ids": [local_rank]} if torch.cuda.is_available() else {}))
    return tuning


def publish_tuning(tuning: KernelCache | None, log) -> None:
    """The node's new tuning entries and compiled artifacts into bundles of their own (on the node's first
    process; nothing elsewhere)."""
    if tuning is None:
        return
    for publish, what, where in ((tuning.publish, "tuned kernel configurations", tuning.url),
                                 (tuning.publish_kernels, "compiled Triton kernels", tuning.kernels_url),
                                 (tuning.publish_compiled, "compiled artifacts", tuning.compiled_url)):
        try:
            count, url = publish()
            if count:
                log(f"{tuning.name}: {count} {what} of this node that the run root lacked, published for the run's "
                    f"later stages and nodes: {url}")
        except Exception as e:  # noqa: BLE001 - a speed hint
            log(f"{tuning.name}: {what} not published to {where}: {e}")


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
    """`python -m pipeline.kernel_cache RUN_ROOT [--into DIR] [--compiled]`: a run's shared kernel tuning into a
    Triton cache (this process's by default), and with --compiled its compiled Triton kernels too and its
    torch.compile artifacts into this node's compile caches: to warm a node before its first stage, or to pack the
    tuning for infra/autotune."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m pipeline.kernel_cache",
                                description="Copies a run's shared kernel tuning into a Triton cache.")
    p.add_argument("root", help="the run root (local folder or s3:// URL)")
    p.add_argument("--into", default=None, help="the Triton cache to fill (default: TRITON_CACHE_DIR, else ~/.triton/cache)")
    p.add_argument("--compiled", action="store_true",
                   help="also copy the run's compiled Triton kernels into the Triton cache and load its torch.compile "
                        "artifacts for this torch and device into this node's compile caches (TORCHINDUCTOR_CACHE_DIR)")
    args = p.parse_args(argv)
    cache = KernelCache(storage.join(args.root, FOLDER), args.into)
    added = cache.restore()
    print(f"{added} tuned kernel configurations from {cache.url} added to {cache.cache_dir} "
          f"({len(cache.held)} in the run root's {len(cache.read)} bundles)")
    if args.compiled:
        kernels = cache.restore_kernels()
        print(f"{kernels} compiled Triton kernels from {cache.kernels_url} added to {cache.cache_dir}")
        loaded = cache.restore_compiled()
        print(f"{loaded} compiled artifacts from {cache.compiled_url} in this node's torch.compile caches")
    return added


if __name__ == "__main__":
    main()
