"""Shared fixtures. Service fixtures (S3 server, Prefect server) live in their own plugin modules."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = ["tests.fixtures_s3", "tests.fixtures_prefect"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_teacher():
    from model.tiny import build_tiny_teacher

    return build_tiny_teacher(seed=0)


@pytest.fixture(scope="session")
def processor(tiny_teacher):
    return tiny_teacher[1]
