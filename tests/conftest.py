"""Shared fixtures. The library is installed into .venv (editable) by `make setup`."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """The weights-hash cache of this test session (workflow subprocesses inherit it), not ~/.cache."""
    os.environ["WSIATTACK_CACHE_DIR"] = str(tmp_path_factory.mktemp("wsiattack-cache"))
    yield
    os.environ.pop("WSIATTACK_CACHE_DIR", None)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Batches of a few tiles gain nothing from threads, and OpenMP's spin-waiting makes them
    many times slower when the cores are shared with other jobs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
