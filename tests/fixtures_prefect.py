"""Prefect server fixtures for tests: see infra/prefect_server.py."""

import pytest

from infra.prefect_server import PrefectServer


@pytest.fixture(scope="session")
def prefect_server():
    """The API URL of a real `prefect server start` on 127.0.0.1, for the whole test session."""
    with PrefectServer() as server:
        yield server.api_url
