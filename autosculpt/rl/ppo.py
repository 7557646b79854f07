"""Proximal Policy Optimisation, hand-written and readable in one pass (after cleanrl's ``ppo.py``).

The core knows nothing about pruning. It talks to any environment and any policy through two small
protocols:

Environment::

    obs = env.reset()
    obs, reward, done, info = env.step(action)

Policy (an ``nn.Module``)::

    action, log_prob, value = policy.act(obs)            # one observation; sampling, no grad needed
    log_prob, entropy, value = policy.evaluate(obs_list, actions)
        # a list of B observations and the B actions actually taken (stacked on dim 0) -> three (B,)
        # tensors: log-probability of exactly those actions under the CURRENT parameters, entropy, value

The rollout buffer stores the log-probabilities returned by ``act`` (the frozen "old" policy at
collection time); the update recomputes them with ``evaluate`` and takes the clipped-surrogate step.
One environment; observations can be anything the policy understands (vectors, graphs).
"""
from __future__ import annotations

import copy
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

__all__ = ["PPOConfig", "PPO", "RolloutBuffer", "compute_gae", "MLPActorCritic", "seed_everything"]


@dataclass
class PPOConfig:
    """PPO hyper-parameters (defaults suit short, expensive episodes such as pruning)."""

    num_steps: int = 16
    """Transitions collected per rollout; the policy is updated after each rollout."""
    learning_rate: float = 3e-4
    """Adam learning rate."""
    anneal_lr: bool = False
    """Linearly decay the learning rate to 0 over ``total_updates`` (needs ``total_updates`` > 0)."""
    total_updates: int = 0
    """Number of updates planned (only used by ``anneal_lr``)."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE λ: 0 = one-step TD advantages, 1 = Monte-Carlo returns minus the value."""
    update_epochs: int = 4
    """Passes over the rollout per update."""
    num_minibatches: int = 4
    """Minibatches per pass (minibatch size = num_steps // num_minibatches)."""
    norm_adv: bool = True
    """Normalise advantages within each minibatch."""
    clip_coef: float = 0.2
    """Surrogate clipping: the probability ratio is kept within [1 - clip, 1 + clip]."""
    clip_vloss: bool = True
    """Clip the value-function update around the old value estimates too."""
    ent_coef: float = 0.01
    """Weight of the entropy bonus (keeps exploring)."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip."""
    target_kl: Optional[float] = 0.05
    """Stop the update's epochs early once the approximate KL to the old policy exceeds this (None: never)."""
    seed: int = 0
    """Seeds python, numpy and torch at construction."""

    def __post_init__(self):
        if self.num_steps < 1 or self.num_minibatches < 1 or self.num_minibatches > self.num_steps:
            raise ValueError(f"num_steps/num_minibatches: need 1 <= num_minibatches <= num_steps, got "
                             f"{self.num_steps}/{self.num_minibatches}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.gae_lambda <= 1:
            raise ValueError(f"gamma and gae_lambda must lie in [0, 1], got {self.gamma}, {self.gae_lambda}")
        if self.learning_rate <= 0 or self.clip_coef <= 0:
            raise ValueError("learning_rate and clip_coef must be positive")


def seed_everything(seed: int) -> None:
    """Seeds python's ``random``, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, next_value: float,
                gamma: float, lam: float):
    """Generalised advantage estimation over one rollout.

    ``dones[t]`` is 1 when the episode ENDED with transition t (so nothing is bootstrapped past it);
    ``next_value`` is V of the observation after the last transition. Returns (advantages, returns).
    """
    T = len(rewards)
    adv = torch.zeros(T)
    last = 0.0
    for t in reversed(range(T)):
        v_next = next_value if t == T - 1 else values[t + 1]
        nonterminal = 1.0 - float(dones[t])
        delta = rewards[t] + gamma * v_next * nonterminal - values[t]
        last = delta + gamma * lam * nonterminal * last
        adv[t] = last
    return adv, adv + values


@dataclass
class RolloutBuffer:
    """Transitions of one rollout: observations (any objects), actions, old log-probs, values,
    rewards and done flags."""

    obs: List[Any] = field(default_factory=list)
    actions: List[torch.Tensor] = field(default_factory=list)
    log_probs: List[float] = field(default_factory=list)
    values: List[float] = field(default_factory=list)
    rewards: List[float] = field(default_factory=list)
    dones: List[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rewards)

    def add(self, obs, action, log_prob, value, reward, done) -> None:
        self.obs.append(obs)
        self.actions.append(torch.as_tensor(action).detach().clone())
        self.log_probs.append(float(log_prob))
        self.values.append(float(value))
        self.rewards.append(float(reward))
        self.dones.append(float(done))

    def clear(self) -> None:
        for f in (self.obs, self.actions, self.log_probs, self.values, self.rewards, self.dones):
            f.clear()


class PPO:
    """The PPO learner: collects transitions with :meth:`collect`, updates with :meth:`update` once
    :meth:`ready`, or runs the whole loop with :meth:`learn`. ``state_dict``/``load_state_dict`` cover
    everything needed to resume exactly (policy, optimiser, partial rollout, RNG states, counters)."""

    def __init__(self, policy: nn.Module, config: Optional[PPOConfig] = None):
        if not (hasattr(policy, "act") and hasattr(policy, "evaluate")):
            raise TypeError("policy: expected an nn.Module with act(obs) and evaluate(obs_list, actions)")
        self.config = config or PPOConfig()
        seed_everything(self.config.seed)
        self.policy = policy
        self.optimizer = torch.optim.Adam(policy.parameters(), lr=self.config.learning_rate, eps=1e-5)
        self.buffer = RolloutBuffer()
        self.updates = 0
        self.steps = 0
        self.stats: List[Dict[str, float]] = []

    # -- collection ----------------------------------------------------------------------
    def collect(self, env, obs):
        """Acts once in ``env`` from ``obs`` and stores the transition. Returns (next_obs, reward, done, info)."""
        with torch.no_grad():
            action, log_prob, value = self.policy.act(obs)
        next_obs, reward, done, info = env.step(action)
        self.buffer.add(obs, action, log_prob, value, reward, done)
        self.steps += 1
        return next_obs, reward, done, info

    def ready(self) -> bool:
        return len(self.buffer) >= self.config.num_steps

    # -- update --------------------------------------------------------------------------
    def update(self, next_obs, next_done: bool) -> Dict[str, float]:
        """One PPO update on the stored rollout, then clears it. Returns the logged statistics."""
        c, buf = self.config, self.buffer
        if len(buf) == 0:
            raise RuntimeError("PPO.update: the rollout buffer is empty")
        if c.anneal_lr and c.total_updates > 0:
            frac = max(0.0, 1.0 - self.updates / c.total_updates)
            for g in self.optimizer.param_groups:
                g["lr"] = frac * c.learning_rate
        with torch.no_grad():
            next_value = 0.0 if next_done else float(self.policy.act(next_obs)[2])
        rewards, values = torch.tensor(buf.rewards), torch.tensor(buf.values)
        advantages, returns = compute_gae(rewards, values, torch.tensor(buf.dones), next_value, c.gamma, c.gae_lambda)
        old_logp = torch.tensor(buf.log_probs)
        actions = torch.stack(buf.actions)
        n = len(buf)
        mb_size = max(1, n // c.num_minibatches)
        clipfracs, approx_kl, pg_loss, v_loss, entropy_mean = [], torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0)
        epochs_run = 0
        for _epoch in range(c.update_epochs):
            epochs_run += 1
            order = torch.randperm(n)
            for start in range(0, n, mb_size):
                idx = order[start:start + mb_size]
                new_logp, entropy, new_value = self.policy.evaluate([buf.obs[i] for i in idx], actions[idx])
                logratio = new_logp - old_logp[idx]
                ratio = logratio.exp()
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - logratio).mean()  # the low-variance k3 estimator
                    clipfracs.append(float(((ratio - 1.0).abs() > c.clip_coef).float().mean()))
                mb_adv = advantages[idx]
                if c.norm_adv and len(idx) > 1:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                pg_loss = torch.max(-mb_adv * ratio, -mb_adv * ratio.clamp(1 - c.clip_coef, 1 + c.clip_coef)).mean()
                new_value = new_value.view(-1)
                if c.clip_vloss:
                    v_clipped = values[idx] + (new_value - values[idx]).clamp(-c.clip_coef, c.clip_coef)
                    v_loss = 0.5 * torch.max((new_value - returns[idx]) ** 2, (v_clipped - returns[idx]) ** 2).mean()
                else:
                    v_loss = 0.5 * ((new_value - returns[idx]) ** 2).mean()
                entropy_mean = entropy.mean()
                loss = pg_loss - c.ent_coef * entropy_mean + c.vf_coef * v_loss
                self.optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(self.policy.parameters(), c.max_grad_norm)
                self.optimizer.step()
            if c.target_kl is not None and float(approx_kl) > c.target_kl:
                break  # KL early stop: the policy moved far enough from the one that collected the data
        var_y = returns.var() if n > 1 else torch.tensor(0.0)
        explained_var = float("nan") if var_y == 0 else float(1 - (returns - values).var() / var_y)
        stats = {
            "update": self.updates, "steps": self.steps, "policy_loss": float(pg_loss.detach()), "value_loss": float(v_loss.detach()),
            "entropy": float(entropy_mean.detach()), "approx_kl": float(approx_kl), "clip_fraction": float(np.mean(clipfracs)),
            "explained_variance": explained_var, "epochs": epochs_run, "mean_reward": float(rewards.mean()),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }
        self.updates += 1
        self.stats.append(stats)
        buf.clear()
        return stats

    def learn(self, env, total_steps: int, on_episode_end: Optional[Callable[[float, int], None]] = None) -> List[float]:
        """Runs ``total_steps`` environment steps with an update after every rollout; returns the
        undiscounted return of every finished episode."""
        returns, ep_ret, ep_len = [], 0.0, 0
        obs = env.reset()
        for _ in range(total_steps):
            obs, reward, done, _info = self.collect(env, obs)
            ep_ret += reward
            ep_len += 1
            if done:
                returns.append(ep_ret)
                if on_episode_end is not None:
                    on_episode_end(ep_ret, ep_len)
                ep_ret, ep_len = 0.0, 0
                obs = env.reset()
            if self.ready():
                self.update(obs, False)  # after a done, obs is the fresh episode's start: bootstrap is right
        return returns

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: policy, optimiser, partial rollout, counters, RNG.
        A deep copy: later training does not change it."""
        return copy.deepcopy({
            "config": asdict(self.config), "policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
            "buffer": asdict(self.buffer), "updates": self.updates, "steps": self.steps, "stats": list(self.stats),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        })

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.buffer = RolloutBuffer(**state["buffer"])
        self.updates, self.steps, self.stats = state["updates"], state["steps"], list(state["stats"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])


class MLPActorCritic(nn.Module):
    """Actor-critic for vector observations and ``n_actions`` discrete actions (two tanh MLPs)."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: int = 64):
        super().__init__()
        if obs_dim < 1 or n_actions < 1:
            raise ValueError(f"obs_dim and n_actions must be positive, got {obs_dim}, {n_actions}")

        def mlp(out: int, gain: float) -> nn.Sequential:
            layers = [nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, out)]
            for m in layers:
                if isinstance(m, nn.Linear):
                    nn.init.orthogonal_(m.weight, 2**0.5)
                    nn.init.zeros_(m.bias)
            nn.init.orthogonal_(layers[-1].weight, gain)
            return nn.Sequential(*layers)

        self.actor = mlp(n_actions, 0.01)  # small last layer: near-uniform initial policy
        self.critic = mlp(1, 1.0)

    def _dist(self, obs: torch.Tensor):
        return torch.distributions.Categorical(logits=self.actor(obs))

    def act(self, obs):
        obs = torch.as_tensor(obs, dtype=torch.float32)
        dist = self._dist(obs)
        action = dist.sample()
        return action, dist.log_prob(action), self.critic(obs).squeeze(-1)

    def evaluate(self, obs_list, actions):
        obs = torch.stack([torch.as_tensor(o, dtype=torch.float32) for o in obs_list])
        dist = self._dist(obs)
        return dist.log_prob(actions), dist.entropy(), self.critic(obs).squeeze(-1)
