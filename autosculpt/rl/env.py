"""The pruning environment: an action (one mix-menu index per prunable layer) becomes a plan, the plan
is applied with ``autosculpt.sparsify``, BN statistics are re-estimated on a few TRAINING batches,
accuracy is measured on the VALIDATION split (the test split is never seen during the search), and
the plan's latency comes from the latency model. The reward combines both.

Reward (what the agent maximises)::

    cost   = predicted latency in ms          (budget given as a speedup or a latency)
           | multiply-accumulates that run     (budget given as a FLOPs reduction ratio)
    limit  = dense latency / target_speedup  |  target_latency_ms  |  (1 - target_flops_ratio) · dense MACs
    excess = max(0, cost / limit - 1)         # 0.2 = 20% over the budget
    reward = val_accuracy - penalty · excess  # penalty = 2 by default

A plan that meets the budget earns exactly its validation accuracy (in [0, 1]); one that misses it
loses 2 accuracy points per 1% of excess, so every over-budget plan scores below every plan that
meets it with accuracy above ``2 · excess`` — the agent is pushed under the budget first and then
towards the most accurate plan there, with a gradient that says how far off it is. Accuracy is
measured without fine-tuning (after BN recalibration), which ranks plans by how much they damage the
trained network.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import timing
from ..budget import Budget
from ..graph import ModelGraph, build_graph
from ..patterns import PAPER6, PatternSet
from ..plan import PLAN_VERSION, conv_layer_plan, sparsify
from ..train import evaluate, recalibrate_bn
from .actions import MixMenu

__all__ = ["Budget", "PruningEnv"]  # Budget is defined in autosculpt.budget


class PruningEnv:
    """Environment over one trained model (see the module docstring for the reward).

    Args:
        model: the trained dense model (not modified).
        train_data: BN recalibration batches come from here.
        val_data: accuracy is measured here.
        latency_model: a profiled (or profile-able) ``LatencyModel`` / ``FlopsLatencyModel``.
        example_input: an input batch the latency is measured for.
        budget: a :class:`Budget`.
        pattern_set: the patterns plans use.
        horizon: steps per episode; each step applies a full plan (the next observation carries its
            mix and latency shares, so with horizon > 1 the agent can refine its previous plan).
        bn_batches, bn_batch_size: BN recalibration.
        penalty: the reward's over-budget weight.
        seed: fixes the BN recalibration batches.
        threads: torch threads for the accuracy evaluation (default: the count at construction).
    """

    def __init__(self, model: nn.Module, train_data, val_data, latency_model, example_input: torch.Tensor,
                 budget: Budget, pattern_set: PatternSet = PAPER6, horizon: int = 1, bn_batches: int = 4,
                 bn_batch_size: int = 128, eval_batch_size: int = 512, penalty: float = 2.0, seed: int = 0,
                 threads: Optional[int] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not isinstance(budget, Budget):
            raise TypeError(f"budget: expected a Budget, got {type(budget).__name__}")
        if not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon: expected a positive int, got {horizon!r}")
        self.model = copy.deepcopy(model).eval()
        self.train_data, self.val_data = train_data, val_data
        self.latency_model = latency_model
        self.example_input = example_input
        self.budget = budget
        self.pattern_set = pattern_set
        self.horizon = horizon
        self.bn_batches, self.bn_batch_size, self.eval_batch_size = bn_batches, bn_batch_size, eval_batch_size
        self.penalty, self.seed = float(penalty), seed
        self.threads = int(threads) if threads is not None else torch.get_num_threads()
        self.menu = MixMenu(pattern_set)
        if not latency_model.layers:
            latency_model.profile(self.model, example_input)
        self.graph: ModelGraph = build_graph(self.model, example_input, pattern_set, latency_model.latency_shares())
        missing = [n for n in self.graph.prunable if n not in latency_model.layers]
        if missing:
            raise ValueError(f"latency_model: was profiled for another model (layers {missing[:3]} unknown)")
        self.modules = dict(self.model.named_modules())
        self.dense_ms = latency_model.dense_ms()
        self.dense_flops = latency_model.flops(None)
        self.limit = budget.limit(self.dense_ms, self.dense_flops)
        self._ids_cache: Dict[Tuple[str, int], List[int]] = {}
        self.evaluations: Dict[tuple, dict] = {}  # action tuple -> record (memo: identical plans are not re-run)
        self.t = 0
        self._obs = self.graph.data

    # -- plans -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.graph.prunable)

    def plan_for(self, action) -> dict:
        """The plan (JSON-able) for an action: one menu index per prunable layer, in graph order."""
        action = [int(a) for a in torch.as_tensor(action).view(-1).tolist()]
        if len(action) != self.num_layers:
            raise ValueError(f"action: expected {self.num_layers} menu indices, got {len(action)}")
        layers = {}
        for name, a in zip(self.graph.prunable, action):
            key = (name, a)
            if key not in self._ids_cache:
                self._ids_cache[key] = self.menu.pattern_ids(self.modules[name].weight, a).tolist()
            layers[name] = conv_layer_plan(self.pattern_set, self._ids_cache[key])
        return {"version": PLAN_VERSION, "layers": layers}

    def evaluate_plan(self, plan: dict) -> float:
        """Validation accuracy of the model sparsified by ``plan`` after BN recalibration.

        The accuracy copy forces the layers' dense path (identical maths, masked weights) so that no
        kernel timing happens during accuracy evaluation; latency comes from the latency model only.
        """
        eval_plan = {"version": plan["version"],
                     "layers": {n: dict(l, path="dense") for n, l in plan["layers"].items()}}
        with timing.threads(self.threads):
            pruned = sparsify(self.model, eval_plan, backend="torch")
            recalibrate_bn(pruned, self.train_data, self.bn_batches, self.bn_batch_size, seed=self.seed)
            return evaluate(pruned, self.val_data, self.eval_batch_size)

    def reward_of(self, val_acc: float, cost: float) -> float:
        """The reward formula of the module docstring."""
        excess = max(0.0, cost / self.limit - 1.0)
        return val_acc - self.penalty * excess

    def record_for(self, action) -> dict:
        """Evaluates (or recalls) one action: plan metrics and reward."""
        key = tuple(int(a) for a in torch.as_tensor(action).view(-1).tolist())
        if key in self.evaluations:
            rec = self.evaluations[key]
            rec["visits"] += 1
            return rec
        plan = self.plan_for(key)
        acc = self.evaluate_plan(plan)
        ms = self.latency_model.predict(plan)
        flops = self.latency_model.flops(plan)
        cost = flops if self.budget.uses_flops else ms
        rec = {
            "index": len(self.evaluations), "action": list(key), "val_acc": acc, "predicted_ms": ms,
            "measured_ms": None, "flops": flops, "flops_ratio_removed": 1.0 - flops / self.dense_flops,
            "predicted_speedup": self.dense_ms / ms, "meets_budget": cost <= self.limit * (1 + 1e-9),
            "reward": self.reward_of(acc, cost), "kept_fraction": [self.menu.kept_fractions[a] for a in key],
            "visits": 1,
        }
        self.evaluations[key] = rec
        return rec

    # -- the evaluated plans, for the final selection (autosculpt.search.select_plan) -------------------
    def in_budget_by_accuracy(self) -> List[dict]:
        """The evaluated plans' records that meet the budget by prediction, most accurate first (ties:
        faster by prediction, then evaluated earlier): the candidates of the final selection."""
        return sorted((r for r in self.evaluations.values() if r["meets_budget"]),
                      key=lambda r: (-r["val_acc"], r["predicted_ms"], r["index"]))

    def best_by_reward(self) -> Optional[dict]:
        """The record with the highest reward (the earliest of equals); None before any evaluation."""
        return max(self.evaluations.values(), key=lambda r: (r["reward"], -r["index"]), default=None)

    def verify_record(self, rec: dict) -> dict:
        """Runs the plan of an evaluated record end to end (``latency_model.verify`` at the example input)."""
        return self.latency_model.verify(self.model, self.plan_for(rec["action"]), self.example_input)

    @staticmethod
    def note_measured(rec: dict, verification: dict) -> None:
        """Stores an end-to-end measurement of a record's plan in the record."""
        rec["measured_ms"] = verification["measured_ms"]
        rec["measured_speedup"] = verification["measured_speedup"]

    # -- gym-like protocol ------------------------------------------------------------------------
    def reset(self):
        """Starts an episode from the dense model's graph."""
        self.t = 0
        self._obs = self.graph.data
        return self._obs

    def step(self, action):
        """Applies a full plan; returns (obs, reward, done, info) with info = the plan's record."""
        rec = self.record_for(action)
        self.t += 1
        done = self.t >= self.horizon
        if not done:
            plan = self.plan_for(action)
            mixes = {n: self.menu.mix_fractions(l["pattern_ids"]) for n, l in plan["layers"].items()}
            masks = {n: self.pattern_set.masks[torch.tensor(l["pattern_ids"])] for n, l in plan["layers"].items()}
            shares = {n: self.latency_model.layer_ms(n, m) / rec["predicted_ms"] for n, m in masks.items()}
            self._obs = self.graph.with_state(mixes, shares)
        return self._obs, rec["reward"], done, rec

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"t": self.t, "evaluations": copy.deepcopy(self.evaluations), "obs": self._obs}

    def load_state_dict(self, state: dict) -> None:
        self.t = state["t"]
        self.evaluations = copy.deepcopy(state["evaluations"])
        self._obs = state["obs"]
