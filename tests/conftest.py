import pytest
import torch

from linglab.config import load_config


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)


def tiny_config(**model_overrides):
    """The tiny preset with model overrides (keyword = model key)."""
    return load_config("tiny", overrides=[f"--model.{k}={v}" for k, v in model_overrides.items()])


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster than two, and far faster when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
