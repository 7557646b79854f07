"""The GNN actor-critic: a torch_geometric encoder over the model graph, one embedding per prunable
layer, a per-layer categorical over the mix menu, and a critic on the pooled graph.

Observations are ``torch_geometric.data.Data`` graphs from :mod:`autosculpt.graph` (with
``prunable_index``); an action is a LongTensor (num_prunable,) of menu indices. The log-probability of
an action is the sum of its per-layer log-probabilities — exactly the action the environment applies.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

__all__ = ["GATv2Encoder", "GNNActorCritic"]


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


class GNNActorCritic(nn.Module):
    """Actor-critic over model graphs (see module docstring).

    Args:
        in_dim: node feature width (``len(ModelGraph.feature_names)``).
        num_actions: menu size (same for every layer).
        encoder: a graph encoder; default :class:`GATv2Encoder`.
        hidden: width of the heads.
        init_bias: optional (num_actions,) initial logits shared by all layers (e.g. to start near the
            budget); default uniform.
    """

    def __init__(self, in_dim: int, num_actions: int, encoder: Optional[nn.Module] = None, hidden: int = 64,
                 init_bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.encoder = encoder if encoder is not None else GATv2Encoder(in_dim, hidden)
        d = int(getattr(self.encoder, "out_dim", hidden))
        # actor input: the layer's own embedding + the pooled graph (global context)
        self.actor = nn.Sequential(nn.Linear(2 * d, hidden), nn.Tanh(), nn.Linear(hidden, num_actions))
        self.critic = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.orthogonal_(self.actor[-1].weight, 0.01)  # near-uniform start
        with torch.no_grad():
            self.actor[-1].bias.copy_(init_bias if init_bias is not None else torch.zeros(num_actions))
        self.num_actions = num_actions

    def _forward(self, batch):
        from torch_geometric.nn import global_mean_pool

        h = self.encoder(batch.x, batch.edge_index)
        graph_batch = batch.batch if getattr(batch, "batch", None) is not None else torch.zeros(h.shape[0], dtype=torch.long)
        pooled = global_mean_pool(h, graph_batch)  # (G, d)
        layer_h = h[batch.prunable_index]  # (G * L, d), graphs in order
        layer_graph = graph_batch[batch.prunable_index]
        logits = self.actor(torch.cat([layer_h, pooled[layer_graph]], 1))
        value = self.critic(pooled).squeeze(-1)
        return logits, value

    def act(self, obs, deterministic: bool = False):
        """Samples one menu index per prunable layer. Returns (action (L,), summed log-prob, value)."""
        logits, value = self._forward(obs)
        dist = torch.distributions.Categorical(logits=logits)
        action = logits.argmax(-1) if deterministic else dist.sample()
        return action, dist.log_prob(action).sum(), value[0]

    def evaluate(self, obs_list: List, actions: torch.Tensor):
        """Log-prob (summed over layers), mean per-layer entropy and value for a batch of graphs."""
        from torch_geometric.data import Batch

        batch = Batch.from_data_list(list(obs_list))
        logits, value = self._forward(batch)
        g = len(obs_list)
        dist = torch.distributions.Categorical(logits=logits.view(g, -1, self.num_actions))
        actions = actions.view(g, -1)
        return dist.log_prob(actions).sum(-1), dist.entropy().mean(-1), value

    def probabilities(self, obs) -> torch.Tensor:
        """Per-layer action probabilities (L, num_actions) for one observation."""
        with torch.no_grad():
            return torch.softmax(self._forward(obs)[0], -1)
