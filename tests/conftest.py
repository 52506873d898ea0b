"""Test setup. Without a GPU the Triton kernels run through the interpreter, and
TRITON_INTERPRET must be set before any @triton.jit function is defined: so it is set here,
before any test module imports the package. With a GPU it is left alone, so `pytest -m gpu`
runs the compiled kernels."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
