"""The GNN actor-critic for the sequential pruning environment (:mod:`autosculpt.rl.env`).

Observations are ``torch_geometric.data.Data`` graphs with ``x`` (node features), ``edge_index``,
``prunable_index``, optionally ``layer_state`` (L, S): per-layer state columns that are scattered onto
the prunable nodes (zeros elsewhere) and appended to ``x``, ``current_index`` (the node of the layer
to decide), ``glob`` (1, G) budget features and ``action_mask`` (1, A) bool. An action is one
menu index for the current layer; its log-probability is that of the masked categorical the action was
sampled from, recomputed exactly by :meth:`GNNActorCritic.evaluate` for a batch of observations.

Actor and critic each have their own encoder (a shared one lets the value loss reshape the policy's
features; PPO implementations such as cleanrl's keep them apart). Both read the current layer's
embedding, the mean over all nodes, the mean over the prunable layers and the budget row.
"""
from __future__ import annotations

import copy
from typing import List, Optional

import torch
from torch import nn

__all__ = ["GATv2Encoder", "MLPEncoder", "GNNActorCritic"]

_MASKED = -1e9  # logit of a disallowed action (finite: no NaN in softmax or entropy)


class GATv2Encoder(nn.Module):
    """Stacked GATv2 layers (multi-head attention over graph neighbours) with residual connections.

    Messages flow both along and against the data flow (each edge is added reversed too), so a layer
    sees both what feeds it and what consumes its output. Any module with the same call signature
    ``encoder(x, edge_index) -> (num_nodes, out_dim)`` and an ``out_dim`` attribute can replace it.
    """

    def __init__(self, in_dim: int, hidden: int = 64, heads: int = 4, layers: int = 2, dropout: float = 0.0):
        super().__init__()
        from .._optional import require

        GATv2Conv = require("torch_geometric.nn", what="the GNN policy (autosculpt.search)").GATv2Conv

        if hidden % heads:
            raise ValueError(f"hidden: must be divisible by heads={heads}, got {hidden}")
        self.inp = nn.Linear(in_dim, hidden)
        self.convs = nn.ModuleList(
            GATv2Conv(hidden, hidden // heads, heads=heads, dropout=dropout, add_self_loops=True) for _ in range(layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.out_dim = hidden

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        both = torch.cat([edge_index, edge_index.flip(0)], 1)
        h = torch.tanh(self.inp(x))
        for conv, norm in zip(self.convs, self.norms):
            h = norm(h + torch.tanh(conv(h, both)))
        return h


class MLPEncoder(nn.Module):
    """The GNN ablation: :class:`GATv2Encoder`'s shape (input projection, ``layers`` residual blocks
    with LayerNorm, width ``hidden``) with each attention layer replaced by a per-node linear layer,
    so a node's embedding depends on its own features only; ``edge_index`` is ignored."""

    def __init__(self, in_dim: int, hidden: int = 64, layers: int = 2):
        super().__init__()
        self.inp = nn.Linear(in_dim, hidden)
        self.lins = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.out_dim = hidden

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for lin, norm in zip(self.lins, self.norms):
            h = norm(h + torch.tanh(lin(h)))
        return h


class _Head(nn.Module):
    """Encoder + readout: [current layer, mean over nodes, mean over prunable layers, budget row] → MLP."""

    def __init__(self, encoder: nn.Module, global_dim: int, hidden: int, out: int):
        super().__init__()
        self.encoder = encoder
        d = int(getattr(encoder, "out_dim", hidden))
        self.mlp = nn.Sequential(nn.Linear(3 * d + global_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, out))

    def forward(self, batch, graph_batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
        from torch_geometric.nn import global_mean_pool

        x = batch.x
        state = getattr(batch, "layer_state", None)
        if state is not None:  # the per-layer state onto the prunable nodes
            extra = x.new_zeros(x.shape[0], state.shape[1])
            extra[batch.prunable_index] = state
            x = torch.cat([x, extra], 1)
        h = self.encoder(x, batch.edge_index)
        pooled = global_mean_pool(h, graph_batch, num_graphs)
        layers = global_mean_pool(h[batch.prunable_index], graph_batch[batch.prunable_index], num_graphs)
        parts = [h[batch.current_index], pooled, layers]
        if getattr(batch, "glob", None) is not None:
            parts.append(batch.glob.view(num_graphs, -1))
        return self.mlp(torch.cat(parts, 1))


class GNNActorCritic(nn.Module):
    """Actor-critic over model graphs (see module docstring).

    Args:
        in_dim: encoder input width: ``x`` columns + ``layer_state`` columns (``len(PruningEnv.feature_names)``).
        num_actions: menu size (same for every layer).
        global_dim: width of the observations' ``glob`` row (``len(env.GLOBAL_FEATURES)``; 0: none).
        encoder: a graph encoder for the actor (the critic gets a deep copy); default :class:`GATv2Encoder`.
        hidden: width of the heads.
        init_bias: optional (num_actions,) initial logits (e.g. to start near the budget); default uniform.
    """

    def __init__(self, in_dim: int, num_actions: int, global_dim: int = 0, encoder: Optional[nn.Module] = None,
                 hidden: int = 64, init_bias: Optional[torch.Tensor] = None):
        super().__init__()
        enc = encoder if encoder is not None else GATv2Encoder(in_dim, hidden)
        self.actor = _Head(enc, global_dim, hidden, num_actions)
        self.critic = _Head(copy.deepcopy(enc), global_dim, hidden, 1)
        last = self.actor.mlp[-1]
        nn.init.orthogonal_(last.weight, 0.01)  # near-uniform start
        with torch.no_grad():
            last.bias.copy_(init_bias if init_bias is not None else torch.zeros(num_actions))
        self.num_actions = num_actions

    @staticmethod
    def _batch(obs_list):
        from torch_geometric.data import Batch

        return Batch.from_data_list(list(obs_list))

    def _forward(self, batch):
        n = int(batch.num_graphs) if hasattr(batch, "num_graphs") and getattr(batch, "batch", None) is not None else 1
        graph_batch = batch.batch if getattr(batch, "batch", None) is not None else torch.zeros(batch.x.shape[0], dtype=torch.long)
        logits = self.actor(batch, graph_batch, n)
        mask = getattr(batch, "action_mask", None)
        if mask is not None:
            logits = logits.masked_fill(~mask.view(n, -1), _MASKED)
        value = self.critic(batch, graph_batch, n).squeeze(-1)
        return logits, value

    def act(self, obs, deterministic: bool = False):
        """Samples the current layer's menu index. Returns (action (), log-prob (), value ())."""
        logits, value = self._forward(obs)
        dist = torch.distributions.Categorical(logits=logits[0])
        action = logits[0].argmax() if deterministic else dist.sample()
        return action, dist.log_prob(action), value[0]

    def evaluate(self, obs_list: List, actions: torch.Tensor):
        """Log-prob, entropy and value (each (B,)) of a batch of observations and the actions taken."""
        logits, value = self._forward(self._batch(obs_list))
        dist = torch.distributions.Categorical(logits=logits)
        actions = actions.view(-1)
        return dist.log_prob(actions), dist.entropy(), value

    def value(self, obs_list: List) -> torch.Tensor:
        """The critic alone (B,) for a batch of observations."""
        batch = self._batch(obs_list)
        return self.critic(batch, batch.batch, int(batch.num_graphs)).squeeze(-1)

    def probabilities(self, obs) -> torch.Tensor:
        """Action probabilities (num_actions,) for one observation (masked entries are 0)."""
        with torch.no_grad():
            return torch.softmax(self._forward(obs)[0][0], -1)
