"""Storage on fsspec URLs (s3://bucket/..., file paths, memory://): read, write, list, commit.

Objects are written whole and become visible in one step (a single PUT on S3, a rename of a file
locally). A set of objects is committed by writing a marker object last: readers trust only what a
marker names. Directories are never renamed, because s3fs cannot move a directory on S3.

Integrity: a producer records each file's sha256 and size (in a shard marker, a manifest, or the `_FILES.json`
of a model directory); a reader checks what it opens against that record before using it, once per file per
process (`verify_file`, `verify_dir`), and a mismatch raises `IntegrityError` naming the file, both digests and
the command that rebuilds it. Remote model directories are read through `local_dir`, a verified local copy.

S3 requests that fail with a server error (500 InternalError, 503 SlowDown, a dropped connection) are retried by
botocore with exponential backoff, up to `S3_RETRIES` attempts over about two minutes, unless the storage options
(`config_kwargs.retries`) or the environment (AWS_MAX_ATTEMPTS, AWS_RETRY_MODE) set a policy: a stage that runs for
hours should not die of one slow second at the store.

Storage options may carry credentials; anything this module raises or returns goes through `redact`,
so the key and secret never reach logs, manifests or error messages.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import threading
import uuid
from typing import Any, Callable

import fsspec
from fsspec.core import url_to_fs

SECRET_OPTION_NAMES = ("key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
                       "aws_session_token", "session_token")


class StorageError(OSError):
    """A storage operation failed; the message has no credentials in it."""


FILES = "_FILES.json"  # a committed directory's file list: {"files": {relative path: {"sha256", "bytes"}}, ...}
# where a stage attempt writes (pipeline.stages): <run root>/<stage>/attempt-NNNN/...
_ATTEMPT_PATH = re.compile(r"^(?P<root>.+?)/(?P<stage>[^/]+)/attempt-\d+(/|$)")
_CHUNK = 1 << 23
# botocore's "standard" mode retries throttling and 5xx answers with jittered backoff (capped at 20 s a wait);
# the default policy gives up after 5 attempts, within seconds. (botocore rewrites a config's retries dict in place,
# so each filesystem gets its own copy.)
S3_RETRIES = {"total_max_attempts": 10, "mode": "standard"}


class IntegrityError(StorageError):
    """A file does not match the digest its producer committed (changed, truncated, or missing)."""

    def __init__(self, url: str, expected: str, found: str, detail: str = ""):
        self.url, self.expected, self.found = url, expected, found
        message = f"{url} does not match what its producer committed: expected {expected}, found {found}"
        if detail:
            message += f" ({detail})"
        super().__init__(f"{message}. {rebuild_hint(url)}")


def rebuild_hint(url: str) -> str:
    """The command that rebuilds the stage output holding `url`, when it is one."""
    match = _ATTEMPT_PATH.match(url.replace(os.sep, "/"))
    if match is None:
        return "Rebuild it with the command that wrote it."
    root = match.group("root")
    return f"Rebuild it: infinitevl run {root}/config.yaml --force {match.group('stage')}"


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return url_to_fs(url, **with_retries(url, storage_options))
    except Exception as exc:  # noqa: BLE001 - re-raised without credentials
        raise StorageError(redact(f"cannot open {url}: {exc}", storage_options)) from None


def with_retries(url: str, storage_options: dict | None) -> dict:
    """The storage options, with `S3_RETRIES` added for an S3 URL where neither the options nor the environment
    (botocore's AWS_MAX_ATTEMPTS, AWS_RETRY_MODE) set a retry policy."""
    options = dict(storage_options or {})
    user_policy = "AWS_MAX_ATTEMPTS" in os.environ or "AWS_RETRY_MODE" in os.environ
    if url.split("://", 1)[0] not in ("s3", "s3a") or user_policy:
        return options
    config = copy.deepcopy(options.get("config_kwargs") or {})
    config.setdefault("retries", dict(S3_RETRIES))
    options["config_kwargs"] = config
    return options


def join(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *parts) if "://" in url else os.path.join(url, *parts)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    with _errors(f"read {url}", storage_options):
        return fs.cat_file(path)


def write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Writes one object so that readers see all of it or none of it."""
    fs, path = filesystem(url, storage_options)
    with _errors(f"write {url}", storage_options):
        if is_local(url):
            # a local file is written beside its target and renamed: a reader never sees half a file
            fs.makedirs(fs._parent(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            fs.pipe_file(path, data)  # one PUT: visible whole or not at all


def read_json(url: str, storage_options: dict | None = None) -> Any:
    return json.loads(read_bytes(url, storage_options))


def read_json_or_none(url: str, storage_options: dict | None = None) -> Any:
    """The object at `url`, or None where there is none (an uncommitted marker, say)."""
    try:
        return read_json(url, storage_options)
    except FileNotFoundError:
        return None


def read_jsonl(url: str, storage_options: dict | None = None, missing_ok: bool = True) -> list[dict]:
    """A JSON-lines file's records (a training stage's `logs/steps.jsonl`); [] where there is none, or with
    `missing_ok=False` FileNotFoundError (a file its reader's producer must have written)."""
    try:
        text = read_bytes(url, storage_options).decode()
    except FileNotFoundError:
        if not missing_ok:
            raise
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_json(url: str, obj: Any, storage_options: dict | None = None) -> None:
    write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), storage_options)


def exists(url: str, storage_options: dict | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    with _errors(f"check {url}", storage_options):
        fs.invalidate_cache(fs._parent(path))
        return fs.exists(path)


def list_files(url: str, storage_options: dict | None = None, suffix: str = "") -> list[str]:
    """URLs of the files directly under `url` (sorted), or [] if there is nothing there."""
    fs, path = filesystem(url, storage_options)
    with _errors(f"list {url}", storage_options):
        fs.invalidate_cache(path)
        if not fs.exists(path):
            return []
        names = sorted(e["name"] for e in fs.ls(path, detail=True)
                       if e.get("type") == "file" and e["name"].endswith(suffix)
                       and e["name"].rstrip("/") != path.rstrip("/"))  # some S3 servers list a folder as itself
    return [_unstrip(url, path, p) for p in names]


def read_text(url: str, storage_options: dict | None = None) -> str:
    return read_bytes(url, storage_options).decode("utf-8")


def write_text(url: str, text: str, storage_options: dict | None = None) -> None:
    """Writes a text file whole (see `write_bytes`)."""
    write_bytes(url, text.encode("utf-8"), storage_options)


def open_url(url: str, mode: str = "rb", storage_options: dict | None = None, **kwargs):
    """An open file object (text where `mode` has no "b"); on S3 reads are ranged, so random access to a large
    file is cheap. A local file opened for writing gets its folder made first. A file written through it is not
    atomic (S3 makes it visible on close, whatever was written by then): for files written whole use
    `write_bytes`/`write_text`, and commit what a reader must trust with a marker."""
    fs, path = filesystem(url, storage_options)
    with _errors(f"open {url}", storage_options):
        if is_local(url) and any(c in mode for c in "wax"):
            fs.makedirs(fs._parent(path), exist_ok=True)
        return fs.open(path, mode, **kwargs)


def commit(marker_url: str, marker: dict, objects: dict[str, bytes], storage_options: dict | None = None) -> None:
    """Writes `objects` (url → bytes), then the marker that makes them visible."""
    for url, data in objects.items():
        write_bytes(url, data, storage_options)
    write_json(marker_url, marker, storage_options)


def delete(url: str, storage_options: dict | None = None) -> None:
    fs, path = filesystem(url, storage_options)
    with _errors(f"delete {url}", storage_options):
        fs.invalidate_cache(path)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def upload_dir(local: str, url: str, storage_options: dict | None = None) -> None:
    """Copies a local folder's files under `url`, streamed, each visible whole or not at all (an S3 upload
    completes in one step; a local copy is renamed into place)."""
    fs, path = filesystem(url, storage_options)
    for rel in _walk(local):
        source, target = os.path.join(local, rel), f"{path.rstrip('/')}/{rel}"
        with _errors(f"write {join(url, rel)}", storage_options):
            if is_local(url):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
                shutil.copyfile(source, tmp)
                os.replace(tmp, target)
            else:
                fs.put_file(source, target)


# -- integrity ------------------------------------------------------------------------------------------------

def sha256_file(url: str, storage_options: dict | None = None) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, read in a stream."""
    digest, size = hashlib.sha256(), 0
    with open_url(url, "rb", storage_options) as f:
        while block := f.read(_CHUNK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


_verified: set[tuple[str, str]] = set()
_verified_lock = threading.Lock()


def verify_file(url: str, sha256: str, size: int | None = None, storage_options: dict | None = None) -> None:
    """Raises IntegrityError unless the file's bytes are the ones committed; each (file, digest) is hashed
    once per process."""
    key = (url, sha256)
    with _verified_lock:
        if key in _verified:
            return
    if size is not None:
        fs, path = filesystem(url, storage_options)
        fs.invalidate_cache(path)
        try:
            found_size = fs.size(path)
        except FileNotFoundError:
            raise IntegrityError(url, f"sha256 {sha256[:16]}…", "no file") from None
        if found_size != size:  # a truncated or grown file is told apart without reading it
            raise IntegrityError(url, f"{size} bytes", f"{found_size} bytes", "truncated or overwritten")
    try:
        found, _ = sha256_file(url, storage_options)
    except FileNotFoundError:
        raise IntegrityError(url, f"sha256 {sha256[:16]}…", "no file") from None
    if found != sha256:
        raise IntegrityError(url, f"sha256 {sha256}", f"sha256 {found}")
    with _verified_lock:
        _verified.add(key)


def check_sizes(sizes: dict[str, int], storage_options: dict | None = None) -> None:
    """Raises IntegrityError naming every file of `sizes` (url -> committed bytes) that is missing or of another
    size (truncated, overwritten), all at once. Lists each folder once: no file is read."""
    found: dict[str, int] = {}
    for folder in sorted({url.rsplit("/", 1)[0] for url in sizes}):
        fs, path = filesystem(folder, storage_options)
        with _errors(f"list {folder}", storage_options):
            fs.invalidate_cache(path)
            entries = fs.ls(path, detail=True) if fs.exists(path) else []
        found.update({_unstrip(folder, path, e["name"]).rstrip("/"): e.get("size") for e in entries})
    bad = [(url, size, found.get(_canonical(url, storage_options))) for url, size in sorted(sizes.items())
           if found.get(_canonical(url, storage_options)) != size]
    if bad:
        url, size, got = bad[0]
        detail = "; ".join(f"{u}: {'no file' if g is None else f'{g} bytes'} where {s} were committed"
                           for u, s, g in bad)
        raise IntegrityError(url, f"{size} bytes", "no file" if got is None else f"{got} bytes",
                             f"{len(bad)} file(s) damaged: {detail}")


def _canonical(url: str, storage_options: dict | None) -> str:
    fs, path = filesystem(url, storage_options)
    return _unstrip(url, path, path).rstrip("/")


def file_digests(local: str, keep: Callable[[str], bool] = lambda rel: True) -> dict[str, dict]:
    """{relative path: {"sha256", "bytes"}} of every file under a local folder whose name does not start with
    '_' (markers) and that `keep` accepts."""
    out = {}
    for rel in _walk(local):
        if rel.rsplit("/", 1)[-1].startswith("_") or not keep(rel):
            continue
        sha, size = sha256_file(os.path.join(local, rel))
        out[rel] = {"sha256": sha, "bytes": size}
    return out


def remote_file_digests(url: str, storage_options: dict | None = None) -> dict[str, dict]:
    """`file_digests` of a folder on any storage, each file read in a stream (small outputs: reports)."""
    fs, path = filesystem(url, storage_options)
    with _errors(f"list {url}", storage_options):
        fs.invalidate_cache(path)
        found = fs.find(path)
    out = {}
    for remote in sorted(found):
        rel = remote[len(path.rstrip("/")) + 1:]
        if rel and not rel.rsplit("/", 1)[-1].startswith(("_", ".")):
            sha, size = sha256_file(join(url, rel), storage_options)
            out[rel] = {"sha256": sha, "bytes": size}
    return out


def tree_digest(files: dict[str, dict]) -> str:
    """One digest for a set of files: the sha256 of their sorted names and sha256s."""
    canonical = json.dumps({rel: f["sha256"] for rel, f in sorted(files.items())}, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_files_marker(url: str, files: dict[str, dict], storage_options: dict | None = None, **extra) -> None:
    """Commits a directory: its `_FILES.json`, written after the files it lists."""
    write_json(join(url, FILES), {**extra, "files": files, "digest": tree_digest(files)}, storage_options)


def publish_dir(local: str, url: str, storage_options: dict | None = None,
                keep: Callable[[str], bool] = lambda rel: True, **extra) -> dict[str, dict]:
    """Commits a local folder at `url`: its files hashed (those `keep` accepts are listed), copied there unless
    `local` already is that place, then `_FILES.json` last. Returns the listed files."""
    files = file_digests(local, keep)
    if not (is_local(url) and os.path.realpath(local) == os.path.realpath(url.removeprefix("file://"))):
        upload_dir(local, url, storage_options)
    write_files_marker(url, files, storage_options, **extra)
    return files


def committed_files(url: str, storage_options: dict | None = None) -> dict[str, dict] | None:
    """The file list a directory was committed with (its `_FILES.json`), or None where it has none."""
    marker = read_json_or_none(join(url, FILES), storage_options)
    return None if marker is None else marker["files"]


def verify_dir(url: str, files: dict[str, dict] | None = None, storage_options: dict | None = None,
               only: Callable[[str], bool] | None = None) -> dict[str, dict]:
    """Checks every listed file of a committed directory (`files`, or its `_FILES.json`) that `only` accepts
    (default: all); returns the list. A directory without a list raises IntegrityError: it was never committed."""
    files = committed_files(url, storage_options) if files is None else files
    if files is None:
        raise IntegrityError(join(url, FILES), "a committed directory", "no file list",
                             "the directory was never committed, or its writer died")
    for rel, f in sorted(files.items()):
        if only is None or only(rel):
            verify_file(join(url, rel), f["sha256"], f["bytes"], storage_options)
    return files


def local_dir(url: str, storage_options: dict | None = None, verify: bool = True,
              only: Callable[[str], bool] | None = None) -> str:
    """A local folder holding the directory at `url` (the folder itself when local, else a copy cached under
    $INFINITEVL_CACHE), its files that `only` accepts (default: all) checked against its `_FILES.json` where it
    has one (`verify`). A model from elsewhere (no file list) is used as it is; ours never lack one."""
    files = committed_files(url, storage_options) if verify else None
    if is_local(url):
        local = url.removeprefix("file://")
        if files is not None:
            verify_dir(local, files, only=only)
        return local
    root = os.environ.get("INFINITEVL_CACHE", os.path.join(tempfile.gettempdir(), "infinitevl-cache"))
    local = os.path.join(root, hashlib.sha256(url.encode()).hexdigest()[:16])
    complete = os.path.join(local, ".complete")  # every file is here (not only those some caller wanted)
    if not os.path.exists(complete):
        _download(url, local, storage_options, only)
        if only is None:
            with open(complete, "w") as f:
                f.write(redact(url, storage_options) + "\n")
    if files is not None:
        try:
            verify_dir(local, files, only=only)
        except IntegrityError:  # the cached copy went bad: fetch it again once, then the source decides
            shutil.rmtree(local, ignore_errors=True)
            _download(url, local, storage_options, only)
            verify_dir(local, files, only=only)
    return local


def _download(url: str, local: str, storage_options: dict | None, only: Callable[[str], bool] | None) -> None:
    """Copies the files under `url` that `only` accepts and `local` lacks, each renamed into place whole."""
    fs, path = filesystem(url, storage_options)
    with _errors(f"list {url}", storage_options):
        fs.invalidate_cache(path)
        found = [p for p in fs.find(path) if not p.rsplit("/", 1)[-1].startswith(".")]
    if not found:
        raise FileNotFoundError(redact(f"nothing under {url}", storage_options))
    for remote in found:
        rel = remote[len(path.rstrip("/")) + 1:]
        target = os.path.join(local, rel)
        if (only is not None and not only(rel)) or os.path.exists(target):
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        part = f"{target}.part-{os.getpid()}"  # ranks on one node may fetch at once: each its own name
        with _errors(f"copy {remote}", storage_options):
            fs.get_file(remote, part)
        os.replace(part, target)


def _walk(local: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(local):
        rel_dir = os.path.relpath(dirpath, local)
        for name in names:
            out.append(name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/"))
    return sorted(out)


def secret_values(storage_options: dict | None) -> list[str]:
    """Every credential-looking value in the options (nested ones too), plus the AWS ones in the env."""
    found: list[str] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if isinstance(v, str) and k.lower() in SECRET_OPTION_NAMES and v:
                    found.append(v)
                else:
                    walk(v)

    walk(storage_options or {})
    found += [os.environ[k] for k in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
              if os.environ.get(k)]
    return sorted(set(found), key=len, reverse=True)


def redact(text: str, storage_options: dict | None = None) -> str:
    for value in secret_values(storage_options):
        text = text.replace(value, "***")
    return text


def public_options(storage_options: dict | None) -> dict:
    """The options with credentials replaced, fit for a log line."""
    secrets = set(secret_values(storage_options))

    def scrub(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: ("***" if isinstance(v, str) and v in secrets else scrub(v)) for k, v in obj.items()}
        return obj

    return scrub(storage_options or {})


class _errors:
    """Turns any failure into a StorageError (or FileNotFoundError) whose text has no credentials."""

    def __init__(self, what: str, storage_options: dict | None):
        self.what, self.storage_options = what, storage_options

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, StorageError):
            return False
        message = redact(f"cannot {self.what}: {type(exc).__name__}: {exc}", self.storage_options)
        if isinstance(exc, FileNotFoundError):
            raise FileNotFoundError(message) from None
        raise StorageError(message) from None


def _unstrip(url: str, path: str, child: str) -> str:
    """Maps a filesystem path back to a URL with the same scheme as `url`."""
    if "://" not in url:
        return child
    scheme = url.split("://", 1)[0]
    return f"{scheme}://{child}"

