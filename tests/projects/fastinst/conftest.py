"""FastInst test settings: one intra-op thread (the CPU is shared; oversubscribed threads make
the small tensors of these tests ~10x slower), restored afterwards."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
