"""S3 (SeaweedFS) fixtures for tests: see infra/s3server.py."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class S3Fixture:
    endpoint: str
    key: str
    secret: str
    bucket: str
    storage_options: dict

    def url(self, *parts: str) -> str:
        """A fresh s3:// URL under the test bucket."""
        return "s3://" + "/".join([self.bucket, *parts])

    def fresh(self, prefix: str = "t") -> str:
        return self.url(f"{prefix}-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def s3():
    """One SeaweedFS server for the session, bound to 127.0.0.1 with random credentials."""
    from infra.s3server import s3_server

    with s3_server(buckets=["test"]) as server:
        yield S3Fixture(server.endpoint, server.key, server.secret, "test", server.storage_options)
