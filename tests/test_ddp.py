"""Data-parallel fine-tuning: `torchrun --nproc_per_node 2 -m autosculpt finetune` on 2 CPU processes (gloo)."""
import os
import subprocess
import sys

import pytest
import torch

import autosculpt as asc
from autosculpt.data import get_dataset
from autosculpt.finetune import evaluate
from autosculpt.models import get_model
from autosculpt.nn import PatternConv2d
from autosculpt.patterns import PAPER6
from autosculpt.plan import conv_layer_plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def saved_pruned_model(path):
    torch.manual_seed(0)
    args = {"channels": [8, 16, 16, 8], "num_classes": 10, "in_chans": 1}
    dense = get_model("digits_cnn", **args)
    g = torch.Generator().manual_seed(0)
    plan = {"version": 1, "layers": {
        n: conv_layer_plan(PAPER6, torch.randint(1, 6, (m.out_channels,), generator=g))
        for n, m in dense.named_modules() if isinstance(m, torch.nn.Conv2d)}}
    asc.save(asc.sparsify(dense, plan), path, plan=plan,
             meta={"model": "digits_cnn", "model_args": args, "data": "digits", "input_shape": [1, 8, 8], "num_classes": 10})
    return plan


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_two_cpu_processes(tmp_path):
    src, out = tmp_path / "pruned.pt", tmp_path / "tuned.pt"
    plan = saved_pruned_model(src)
    env = {**os.environ, "PYTHONPATH": REPO, "AUTOSCULPT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "autosculpt", "finetune", str(src), "--finetune-epochs", "2", "--batch-size", "32", "--lr", "0.05",
           "--threads", "1", "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # Only rank 0 reports and writes.
    assert proc.stdout.count("with 2 process(es)") == 1, proc.stdout
    tuned = asc.load(out).eval()
    for name, m in tuned.named_modules():
        if isinstance(m, PatternConv2d):
            assert torch.count_nonzero(m.weight * ~m.tap_mask[:, None]) == 0, name
    assert asc.io.read(out).plan == plan
    # The sharded, all-reduced accuracies equal a single-process evaluation of the saved weights.
    meta = asc.io.read(out).meta
    _, val, test = get_dataset("digits", seed=0)
    # (to one sample: each process picks sparse kernel or dense fallback per layer by timing, and the two
    # paths round differently, which can flip a near-tie prediction)
    assert abs(meta["val_acc"] - evaluate(tuned, val)) <= 1.0 / len(val) + 1e-12
    assert abs(meta["test_acc"] - evaluate(tuned, test)) <= 1.0 / len(test) + 1e-12
    assert meta["val_acc"] > 0.3  # it trained (chance is 0.1)
    before = asc.load(src)
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), tuned.state_dict().values()))
