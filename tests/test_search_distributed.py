"""Distributed search: `torchrun --nproc_per_node 2 -m autosculpt prune` on 2 CPU processes (gloo) shares out
the candidates' accuracy evaluation and finds exactly what one process finds with the same seed."""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A FLOPs budget (counted, not measured) and a shared latency cache: both runs see the same numbers.
ARGS = ["--model-arg", "channels=[8,16,16,8]", "--dense-epochs", "6", "--episodes", "12", "--finetune-epochs", "1",
        "--target-flops-ratio", "0.5", "--latency-reps", "3", "--latency-batches", "1", "--search-batch", "4",
        "--seed", "2", "--no-progress", "--threads", "1"]


def _prune(tmp_path, name, launcher, *extra):
    env = {**os.environ, "PYTHONPATH": REPO, "AUTOSCULPT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, "-m", "autosculpt", "prune", *ARGS, *extra, "--runs-dir", str(tmp_path / "runs"), "--name", name]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(tmp_path / "runs" / name / "search_result.json") as f:
        return json.load(f), proc.stdout


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_search_equals_one_process(tmp_path):
    # A first short run trains and caches the dense model and the latency profile that both compared runs
    # read (a search on a cold latency cache can differ from one on a warm cache: the timings differ).
    _prune(tmp_path, "warmup", [sys.executable], "--episodes", "2")
    single, _ = _prune(tmp_path, "single", [sys.executable])
    dist, out = _prune(tmp_path, "dist", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc_per_node", "2"])
    assert out.count("autosculpt prune ->") == 1, out  # only rank 0 reports ...
    assert sorted(os.listdir(tmp_path / "runs")) == ["dist", "single", "warmup"]  # ... and names (one) run folder
    assert dist["best_plan"] == single["best_plan"]
    keys = ("index", "action", "val_acc", "predicted_ms", "flops", "reward", "visits", "first_episode")
    assert [[r[k] for k in keys] for r in dist["history"]] == [[r[k] for k in keys] for r in single["history"]]
    assert dist["best_record"]["index"] == single["best_record"]["index"]
    assert dist["episode_rewards"] == single["episode_rewards"]  # exact: each plan was evaluated by one rank
    assert dist["dense"]["val_acc"] == single["dense"]["val_acc"]
    # the agents learned alike (the same PPO updates on the same rewards)
    assert [s["policy_loss"] for s in dist["ppo_stats"]] == [s["policy_loss"] for s in single["ppo_stats"]]
    assert len(dist["history"]) > 2  # several plans per rollout were shared out
    for name in ("config.yaml", "plan.json", "model.pt", "summary.json", "report.md"):
        assert (tmp_path / "runs" / "dist" / name).is_file(), name
    accs = {r["val_acc"] for r in single["history"]}
    assert len(accs) > 1 and single["dense"]["val_acc"] > 0.5  # a trained model: the accuracies tell plans apart
