import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the method files
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                    # helpers.py


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a real pre-trained model (MiniLM) or a whole run of "
                            "the real-text benchmark; CI runs them, -m 'not slow' skips them")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and steadily on a busy machine (two threads that wait
    on each other made a forward pass ~100x slower on a shared 2-core machine). A module asks for
    it with `pytestmark = [pytest.mark.usefixtures("one_thread")]`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
