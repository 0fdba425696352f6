import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models on shared cores: more threads only add contention (tens of times slower
    when other processes keep the cores busy), and one thread makes timings-free runs stable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
