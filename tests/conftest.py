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


@pytest.fixture(scope="session")
def tiny_student(tiny_teacher):
    """The tiny teacher converted with random mixers and a window of 8 (so decoding crosses it quickly)."""
    from model import convert_from_qwen2_5_vl

    torch.manual_seed(0)
    return convert_from_qwen2_5_vl(tiny_teacher[0], sliding_window=8, init="random").eval()


@pytest.fixture
def one_thread():
    """Tiny matrices: with the two cores shared by other work, one thread is several times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
