"""Files the library writes get the permissions any new file would (0666 & ~umask), not mkstemp's 0600."""
import json
import os
import stat

import pytest
import torch

import autosculpt as asc
from autosculpt import config
from autosculpt._atomic import atomic_torch_save, atomic_write_text
from autosculpt.models import get_model
from autosculpt.runtime.latency import LatencyModel


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask):
        os.umask(mask)

    yield set_mask
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_item11_written_files_respect_the_umask(mask, umask, tmp_path):
    umask(mask)
    want = 0o666 & ~mask
    torch.set_num_threads(1)
    model = get_model("digits_cnn", channels=(4, 8, 8, 4))
    paths = [asc.save(model, tmp_path / "model.pt", meta={"model": "digits_cnn"})]
    atomic_write_text(tmp_path / "summary.json", json.dumps({"a": 1}))
    atomic_torch_save({"x": torch.ones(1)}, tmp_path / "state.pt")
    config.save_config(config.resolve_config(), tmp_path / "config.yaml")
    lm = LatencyModel(cache_path=tmp_path / "cache" / "latency_cache.json")
    lm.cache.entries["k"] = 1.0
    lm.save_cache()
    paths += [tmp_path / "summary.json", tmp_path / "state.pt", tmp_path / "config.yaml",
              tmp_path / "cache" / "latency_cache.json"]
    for p in paths:
        assert _mode(p) == want, (p, oct(_mode(p)), oct(want))
    assert not [p for p in tmp_path.rglob(".tmp-*")]  # no temporary files left
