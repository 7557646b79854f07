"""The pruning environment: a sequential decision process over the prunable layers, in graph order.

Episode: ``L`` steps, one per prunable layer (``graph.prunable`` order, i.e. execution order). At step
``t`` the agent picks the mix-menu entry of layer ``t``; after the last step the complete plan is
applied with ``autosculpt.sparsify``, BN statistics are re-estimated on a few TRAINING batches,
accuracy is measured on the VALIDATION split (the test split is never seen during the search), and
the plan's cost comes from the latency model.

State (an observation is a ``torch_geometric.data.Data``): the model graph (``x``: the node features of
:mod:`autosculpt.graph`, each column standardised over the graph's nodes, the same tensor in every
observation), ``layer_state`` (L, S): per prunable layer the decisions made so far
(:data:`LAYER_STATE_FEATURES`: decided, current, its dense cost and decided cost × L / limit, the
decided kept fraction and pattern mix; the policy scatters these onto the layers' nodes); ``current_index``
(the node of the layer to decide now); ``glob``, a row of budget features (:data:`GLOBAL_FEATURES`:
progress, cost of the decided prefix and of the rest (dense and at its cheapest) relative to the
limit, budget left, and how much of the remaining layers' prunable slack the budget still allows)
followed (``slot_features=True``, default) by a one-hot of the current layer and the kept fraction
decided for each layer so far, one slot per layer in graph order (``global_feature_names``): the same
decisions as the node features, in a fixed place where the heads read them directly; and ``action_mask``, the menu entries allowed now. With ``constrain=True``
(default) an entry is allowed when the budget can still be met by pruning every later layer as much
as the menu allows (AMC-style): costs are additive over layers in both the FLOPs count and the latency
model, so every complete plan then meets the budget, and no evaluation is wasted on one that cannot.

Reward (what the agent maximises), paid at the last step of the episode::

    cost   = predicted latency in ms          (budget given as a speedup or a latency)
           | multiply-accumulates that run     (budget given as a FLOPs reduction ratio)
    limit  = dense latency / target_speedup  |  target_latency_ms  |  (1 - target_flops_ratio) · dense MACs
    excess = max(0, cost / limit - 1)         # 0.2 = 20% over the budget
    reward = val_accuracy - penalty · excess  # penalty = 2 by default

A plan that meets the budget earns exactly its validation accuracy (in [0, 1]); one that misses it
(possible with ``constrain=False``, or when even the cheapest plan misses the budget) loses 2
accuracy points per 1% of excess. With ``shaping=True`` every step also earns
``Φ(s_{t+1}) - Φ(s_t)``, a potential-based term (Ng et al. 1999) with ``Φ(s) = -penalty · excess of
(decided prefix + the rest at its cheapest)`` shifted so that ``Φ(s_0) = 0``, and ``Φ = 0`` at the end
of the episode: an episode's rewards sum to exactly the reward above, and the optimal policy is
unchanged. Accuracy is measured without fine-tuning (after BN recalibration), which ranks plans by how
much they damage the trained network; identical plans are evaluated once (``evaluations`` memo).
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

__all__ = ["Budget", "PruningEnv", "LAYER_STATE_FEATURES", "GLOBAL_FEATURES"]  # Budget: autosculpt.budget

LAYER_STATE_FEATURES = ("decided", "current", "dense_cost", "decided_cost", "decided_kept_fraction")
"""The first columns of an observation's ``layer_state`` (one row per prunable layer); the decided pattern
mix follows (``decided_mix_0`` ...; zeros while undecided). Costs are × L / limit (1: an even share of
the budget)."""

GLOBAL_FEATURES = ("progress", "used_over_limit", "rest_dense_over_limit", "rest_min_over_limit", "left",
                   "slack_allowed", "current_dense_over_limit", "current_share_of_rest")
"""The observation's ``glob`` row: ``progress`` = t / L; ``used`` = (fixed cost + decided prefix) / limit;
the rest (layers t..L-1) dense and at its cheapest, / limit; ``left`` = 1 - used; ``slack_allowed`` = the
fraction of the rest's prunable cost (dense - cheapest) the budget still allows (≥ 1: the rest may stay
dense, ≤ 0: it must be pruned to the minimum; clipped to [-1, 2]); the current layer's dense cost / limit
and its share of the rest's dense cost."""


class PruningEnv:
    """Environment over one trained model (see the module docstring for state, action and reward).

    Args:
        model: the trained dense model (not modified).
        train_data: BN recalibration batches come from here.
        val_data: accuracy is measured here.
        latency_model: a profiled (or profile-able) ``LatencyModel`` / ``FlopsLatencyModel``.
        example_input: an input batch the latency is measured for.
        budget: a :class:`Budget`.
        pattern_set: the patterns plans use.
        bn_batches, bn_batch_size: BN recalibration.
        penalty: the reward's over-budget weight.
        seed: fixes the BN recalibration batches.
        threads: torch threads for the accuracy evaluation (default: the count at construction).
        constrain: allow only menu entries after which the budget can still be met (action mask).
        shaping: add the potential-based budget term to every step's reward (sums to the same return).
        slot_features: append to ``glob`` a one-hot of the current layer and the kept fraction decided for
            each layer so far (0: undecided), one slot per prunable layer in graph order.
    """

    def __init__(self, model: nn.Module, train_data, val_data, latency_model, example_input: torch.Tensor,
                 budget: Budget, pattern_set: PatternSet = PAPER6, bn_batches: int = 4,
                 bn_batch_size: int = 128, eval_batch_size: int = 512, penalty: float = 2.0, seed: int = 0,
                 threads: Optional[int] = None, constrain: bool = True, shaping: bool = False,
                 slot_features: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not isinstance(budget, Budget):
            raise TypeError(f"budget: expected a Budget, got {type(budget).__name__}")
        self.model = copy.deepcopy(model).eval()
        self.train_data, self.val_data = train_data, val_data
        self.latency_model = latency_model
        self.example_input = example_input
        self.budget = budget
        self.pattern_set = pattern_set
        self.bn_batches, self.bn_batch_size, self.eval_batch_size = bn_batches, bn_batch_size, eval_batch_size
        self.penalty, self.seed = float(penalty), seed
        self.threads = int(threads) if threads is not None else torch.get_num_threads()
        self.constrain, self.shaping, self.slot_features = bool(constrain), bool(shaping), bool(slot_features)
        self.menu = MixMenu(pattern_set)
        if not latency_model.layers:
            latency_model.profile(self.model, example_input)
        self.graph: ModelGraph = build_graph(self.model, example_input, pattern_set, latency_model.latency_shares())
        missing = [n for n in self.graph.prunable if n not in latency_model.layers]
        if missing:
            raise ValueError(f"latency_model: was profiled for another model (layers {missing[:3]} unknown)")
        if not self.graph.prunable:
            raise ValueError("model: has no prunable 3×3 convolution (nothing to search)")
        self.modules = dict(self.model.named_modules())
        self.dense_ms = latency_model.dense_ms()
        self.dense_flops = latency_model.flops(None)
        self.limit = budget.limit(self.dense_ms, self.dense_flops)
        self._ids_cache: Dict[Tuple[str, int], List[int]] = {}
        self._kept_per_pattern = pattern_set.kept_fractions().float()
        self.evaluations: Dict[tuple, dict] = {}  # action tuple -> record (memo: identical plans are not re-run)
        # action tuple -> validation accuracy evaluated ahead of its episode (a distributed search shares
        # out the plans of a rollout among its processes); consumed by record_for, never checkpointed
        self.accuracy_cache: Dict[tuple, float] = {}
        self._cost_table()
        self.layer_state_names = list(LAYER_STATE_FEATURES) + [f"decided_mix_{i}" for i in range(len(pattern_set))]
        self.feature_names = list(self.graph.feature_names) + self.layer_state_names  # the encoder's input columns
        self.global_feature_names = list(GLOBAL_FEATURES)
        if self.slot_features:
            self.global_feature_names += [f"current_is_{n}" for n in self.graph.prunable]
            self.global_feature_names += [f"kept_fraction_{n}" for n in self.graph.prunable]
        self.t = 0
        self.decisions: List[int] = []
        self._phi0 = self._potential(0, [])
        # The graph's node features standardised per column, once: raw columns range from shares of 1e-3
        # to log channel counts of 6, which saturates the encoder's first tanh and slows the critic down
        # (bench/results/rl-learning.md). Every observation shares this tensor and the edges (a shallow
        # copy), so rollouts, replay and checkpoints hold only the small per-layer state.
        x0 = self.graph.data.x
        std = x0.std(0)
        self._x_mean, self._x_std = x0.mean(0), torch.where(std > 1e-6, std, torch.ones_like(std))
        self._base = copy.copy(self.graph.data)
        self._base.x = (x0 - self._x_mean) / self._x_std
        self._obs = self._observation()

    # -- costs -------------------------------------------------------------------------------
    def _cost(self, plan: dict) -> float:
        """The budgeted cost of a plan: MACs for a FLOPs budget, predicted ms otherwise."""
        return self.latency_model.flops(plan) if self.budget.uses_flops else self.latency_model.predict(plan)

    def _cost_table(self) -> None:
        """Per-layer cost of every menu entry (``layer_cost[l][a]``) and the fixed cost of the rest of the
        model: both the FLOPs count and the latency model are sums over layers, so a plan costs exactly
        ``fixed_cost + Σ_l layer_cost[l][a_l]``."""
        dense_plan = {"version": PLAN_VERSION, "layers": {}}
        base = self._cost(dense_plan)
        dense = [float(self.graph.layers[n]["flops"]) if self.budget.uses_flops else self.latency_model.layer_ms(n, None)
                 for n in self.graph.prunable]
        table = []
        for li, name in enumerate(self.graph.prunable):
            row = []
            for a in range(len(self.menu)):
                one = {"version": PLAN_VERSION, "layers": {name: self._layer_plan(name, a)}}
                row.append(dense[li] + self._cost(one) - base)
            table.append(row)
        self.layer_cost = torch.tensor(table, dtype=torch.float64)  # (L, A)
        self.layer_dense_cost = torch.tensor(dense, dtype=torch.float64)
        self.fixed_cost = float(base - sum(dense))
        # suffix sums: cost of layers t..L-1 when dense / at their cheapest entry
        self._rest_dense = torch.cat([self.layer_dense_cost.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
        mins = self.layer_cost.min(1).values
        self._rest_min = torch.cat([mins.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])

    def plan_cost(self, action) -> float:
        """The cost of a complete action from the per-layer table (equals the latency model's)."""
        a = torch.as_tensor(action, dtype=torch.long).view(-1)
        return self.fixed_cost + float(self.layer_cost[torch.arange(len(a)), a].sum())

    def _prefix_cost(self, decisions) -> float:
        return float(sum(float(self.layer_cost[i, a]) for i, a in enumerate(decisions)))

    def allowed_actions(self, t: Optional[int] = None, decisions: Optional[List[int]] = None) -> torch.Tensor:
        """Bool (A,) mask of the menu entries layer ``t`` may take (all True with ``constrain=False``)."""
        t = self.t if t is None else t
        decisions = self.decisions if decisions is None else decisions
        n = len(self.menu)
        if not self.constrain or t >= self.num_layers:
            return torch.ones(n, dtype=torch.bool)
        spent = self.fixed_cost + self._prefix_cost(decisions)
        total = spent + self.layer_cost[t] + self._rest_min[t + 1]
        ok = total <= self.limit * (1 + 1e-9)
        if not bool(ok.any()):  # even the cheapest plan misses the budget: the cheapest entries only
            ok = self.layer_cost[t] <= self.layer_cost[t].min() * (1 + 1e-12)
        return ok

    def _potential(self, t: int, decisions) -> float:
        """Φ(s_t) of the shaping term: the over-budget penalty of the decided prefix with the rest at its
        cheapest (the best the rest can do); Φ is 0 at the end of the episode."""
        if t >= self.num_layers:
            return 0.0
        cost = self.fixed_cost + self._prefix_cost(decisions) + float(self._rest_min[t])
        return -self.penalty * max(0.0, cost / self.limit - 1.0)

    # -- observations ------------------------------------------------------------------------
    def _observation(self):
        """The state before deciding layer ``self.t`` (or the complete plan once ``t == L``)."""
        L, t = self.num_layers, self.t
        state = torch.zeros(L, len(self.layer_state_names))
        state[:, 2] = (self.layer_dense_cost * L / self.limit).float()
        if t < L:
            state[t, 1] = 1.0
        for li, a in enumerate(self.decisions):
            mix = self.menu.mix_fractions(self._ids(self.graph.prunable[li], a))
            state[li, 0] = 1.0
            state[li, 3] = float(self.layer_cost[li, a] * L / self.limit)
            state[li, 4] = float((mix * self._kept_per_pattern).sum())
            state[li, len(LAYER_STATE_FEATURES):] = mix
        data = copy.copy(self._base)  # shares x and the edges with every other observation
        data.layer_state = state
        cur = self._base.prunable_index[min(t, L - 1)]
        used = (self.fixed_cost + self._prefix_cost(self.decisions)) / self.limit
        rest_dense, rest_min = float(self._rest_dense[t]) / self.limit, float(self._rest_min[t]) / self.limit
        slack = rest_dense - rest_min
        allowed = (1.0 - used - rest_min) / slack if slack > 0 else (2.0 if used + rest_min <= 1 else -1.0)
        cur_dense = float(self.layer_dense_cost[t]) / self.limit if t < L else 0.0
        share = cur_dense / rest_dense if rest_dense > 0 else 0.0
        glob = [t / L, used, rest_dense, rest_min, 1.0 - used, max(-1.0, min(2.0, allowed)), cur_dense, share]
        if self.slot_features:
            glob += [1.0 if i == t else 0.0 for i in range(L)]
            glob += [self.menu.kept_fractions[a] for a in self.decisions] + [0.0] * (L - len(self.decisions))
        data.glob = torch.tensor([glob], dtype=torch.float32)
        data.current_index = torch.tensor([int(cur)], dtype=torch.long)
        data.action_mask = self.allowed_actions()[None]
        return data

    # -- plans -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.graph.prunable)

    def _ids(self, name: str, a: int) -> List[int]:
        key = (name, int(a))
        if key not in self._ids_cache:
            self._ids_cache[key] = self.menu.pattern_ids(self.modules[name].weight, int(a)).tolist()
        return self._ids_cache[key]

    def _layer_plan(self, name: str, a: int) -> dict:
        return conv_layer_plan(self.pattern_set, self._ids(name, a))

    def plan_for(self, action) -> dict:
        """The plan (JSON-able) for a complete action: one menu index per prunable layer, in graph order."""
        action = [int(a) for a in torch.as_tensor(action).view(-1).tolist()]
        if len(action) != self.num_layers:
            raise ValueError(f"action: expected {self.num_layers} menu indices, got {len(action)}")
        for a in action:
            if not 0 <= a < len(self.menu):
                raise ValueError(f"action: menu index must be in [0, {len(self.menu)}), got {a}")
        return {"version": PLAN_VERSION,
                "layers": {name: self._layer_plan(name, a) for name, a in zip(self.graph.prunable, action)}}

    def evaluate_plan(self, plan: dict) -> float:
        """Validation accuracy of the model sparsified by ``plan`` after BN recalibration.

        The accuracy copy forces the layers' dense path (identical maths, masked weights) so that no
        kernel timing happens during accuracy evaluation; latency comes from the latency model only.
        Torch's global RNG is left as it was.
        """
        eval_plan = {"version": plan["version"],
                     "layers": {n: dict(l, path="dense") for n, l in plan["layers"].items()}}
        # The evaluation draws from torch's global RNG (measured: sparsify / BN recalibration advance it);
        # a forked RNG keeps the agent's random stream independent of which plans were evaluated and
        # which were recalled from the memo (or from any cache of accuracies).
        with torch.random.fork_rng(devices=[]), timing.threads(self.threads):
            pruned = sparsify(self.model, eval_plan, backend="torch")
            recalibrate_bn(pruned, self.train_data, self.bn_batches, self.bn_batch_size, seed=self.seed)
            return evaluate(pruned, self.val_data, self.eval_batch_size)

    def reward_of(self, val_acc: float, cost: float) -> float:
        """The reward formula of the module docstring."""
        excess = max(0.0, cost / self.limit - 1.0)
        return val_acc - self.penalty * excess

    def record_for(self, action) -> dict:
        """Evaluates (or recalls) one complete action: plan metrics and reward."""
        key = tuple(int(a) for a in torch.as_tensor(action).view(-1).tolist())
        if key in self.evaluations:
            rec = self.evaluations[key]
            rec["visits"] += 1
            return rec
        plan = self.plan_for(key)
        acc = self.accuracy_cache.pop(key) if key in self.accuracy_cache else self.evaluate_plan(plan)
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
        """Starts an episode: no layer decided, the first prunable layer current."""
        self.t, self.decisions = 0, []
        self._obs = self._observation()
        return self._obs

    def step(self, action, evaluate: bool = True):
        """Decides the current layer's menu entry. Returns (obs, reward, done, info); after the last
        layer ``done`` is True and ``info`` is the complete plan's record (see :meth:`record_for`),
        before it ``info`` is ``{}``. ``evaluate=False`` only looks ahead (which plans a policy will
        sample): the complete plan is neither evaluated nor recorded, ``info`` stays ``{}`` and the
        reward leaves out the plan's term."""
        a = int(torch.as_tensor(action).view(-1)[0]) if torch.as_tensor(action).numel() == 1 else None
        if a is None:
            raise ValueError(f"action: expected one menu index (the current layer's), got {action!r}")
        if self.t >= self.num_layers:
            raise RuntimeError("step: the episode is over; call reset()")
        if not 0 <= a < len(self.menu):
            raise ValueError(f"action: menu index must be in [0, {len(self.menu)}), got {a}")
        if not bool(self.allowed_actions()[a]):
            raise ValueError(f"action: menu entry {a} is masked at layer {self.t} (the budget could not be met)")
        phi = self._potential(self.t, self.decisions) - self._phi0
        self.decisions.append(a)
        self.t += 1
        done = self.t >= self.num_layers
        info: dict = {}
        reward = 0.0
        if done and evaluate:
            info = self.record_for(self.decisions)
            reward = info["reward"]
        if self.shaping:
            phi_next = 0.0 if done else self._potential(self.t, self.decisions) - self._phi0
            reward += phi_next - phi
        self._obs = self._observation()
        return self._obs, reward, done, info

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"t": self.t, "decisions": list(self.decisions), "evaluations": copy.deepcopy(self.evaluations)}

    def load_state_dict(self, state: dict) -> None:
        self.t = state["t"]
        self.decisions = list(state["decisions"])
        self.evaluations = copy.deepcopy(state["evaluations"])
        self._obs = self._observation()
