"""Storage on fsspec URLs (s3://bucket/..., file paths, memory://): read, write, list, commit.

Objects are written whole and become visible in one step (a single PUT on S3, a rename of a file
locally). A set of objects is committed by writing a marker object last: readers trust only what a
marker names. Directories are never renamed, because s3fs cannot move a directory on S3.

Storage options may carry credentials; anything this module raises or returns goes through `redact`,
so the key and secret never reach logs, manifests or error messages.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs

SECRET_OPTION_NAMES = ("key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
                       "aws_session_token", "session_token")


class StorageError(OSError):
    """A storage operation failed; the message has no credentials in it."""


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return url_to_fs(url, **(storage_options or {}))
    except Exception as exc:  # noqa: BLE001 - re-raised without credentials
        raise StorageError(redact(f"cannot open {url}: {exc}", storage_options)) from None


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
            fs.pipe_file(path, data)


def read_json(url: str, storage_options: dict | None = None) -> Any:
    return json.loads(read_bytes(url, storage_options))


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


def open_url(url: str, mode: str = "rb", storage_options: dict | None = None, **kwargs):
    """An open file object; on S3 reads are ranged, so random access to a large file is cheap."""
    fs, path = filesystem(url, storage_options)
    with _errors(f"open {url}", storage_options):
        return fs.open(path, mode, **kwargs)


def commit(marker_url: str, marker: dict, objects: dict[str, bytes], storage_options: dict | None = None) -> None:
    """Writes `objects` (url → bytes), then the marker that makes them visible."""
    for url, data in objects.items():
        write_bytes(url, data, storage_options)
    write_json(marker_url, marker, storage_options)


def delete(url: str, storage_options: dict | None = None) -> None:
    fs, path = filesystem(url, storage_options)
    with _errors(f"delete {url}", storage_options):
        if fs.exists(path):
            fs.rm(path, recursive=True)


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

