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
    env: dict  # the credentials as the environment variables a user's pipeline processes read

    def url(self, *parts: str) -> str:
        """A fresh s3:// URL under the test bucket."""
        return "s3://" + "/".join([self.bucket, *parts])

    def fresh(self, prefix: str = "t") -> str:
        return self.url(f"{prefix}-{uuid.uuid4().hex[:8]}")


_WEED_LOG: list[str] = []


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """One SeaweedFS server for the session, bound to 127.0.0.1 with random credentials. Its log is kept, and a
    failing test that used it shows the log's tail: an S3 error's cause is only there."""
    from infra.s3server import s3_server

    log = str(tmp_path_factory.mktemp("weed") / "weed.log")
    _WEED_LOG.append(log)
    with s3_server(buckets=["test"], log_path=log) as server:
        yield S3Fixture(server.endpoint, server.key, server.secret, "test", server.storage_options, server.env)


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The server's credentials in this test's environment, as users give them; s3fs's cached clients (made with
    other credentials or none) are dropped on the way in and out."""
    import s3fs

    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _WEED_LOG and "s3" in getattr(item, "fixturenames", ()):
        try:
            with open(_WEED_LOG[0], "rb") as f:
                lines = f.read().decode(errors="replace").splitlines()
        except OSError as e:
            lines = [f"(could not read {_WEED_LOG[0]}: {e})"]
        # weed mini's maintenance worker retries its admin connection every few seconds for the server's whole
        # life (it dials the admin's http port + 10000); those lines would fill the tail
        lines = [line for line in lines if "admin server" not in line and "worker stream" not in line]
        report.sections.append(("SeaweedFS log (tail)", "\n".join(lines[-60:])))
