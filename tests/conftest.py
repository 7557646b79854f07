import os

import pytest
import torch

# Tests are deterministic and must not depend on the machine's thread count for correctness.
torch.manual_seed(0)


@pytest.fixture
def poison_outputs(monkeypatch):
    """Makes kernels' output buffers start as NaN, so any element a kernel forgets to write fails."""
    from autosculpt.ops import conv as conv_ops

    def nan_output(shape, like, memory_format=torch.contiguous_format):
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device).contiguous(memory_format=memory_format)

    monkeypatch.setattr(conv_ops, "_new_output", nan_output)
    return nan_output


@pytest.fixture(scope="module")
def one_thread_module():
    """:func:`one_thread` for a whole module (its module-scoped fixtures train under it too)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after it. Tiny models gain nothing from threads, and on
    a loaded 2-core machine OpenMP barriers waiting for a descheduled thread make 2-thread runs (and
    training) several times slower. Modules opt in with pytestmark = pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private cache folder so tests never touch the user's real cache."""
    d = tmp_path / "cache"
    monkeypatch.setenv("AUTOSCULPT_CACHE", str(d))
    return d


def extension_built() -> bool:
    from autosculpt import _ext

    return _ext.extension() is not None


requires_ext = pytest.mark.skipif(
    os.environ.get("CI") != "true" and not extension_built(),
    reason="compiled extension not built (in CI this is a failure, not a skip)",
)
