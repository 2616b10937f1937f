"""QueryInst test settings: one intra-op thread for the unit and end-to-end tests (the CPU is
shared and oversubscribed threads make their small tensors much slower), restored afterwards.
The learning test sets its own thread count."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
