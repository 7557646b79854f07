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
    value = policy.value(obs_list)                        # (B,) critic only; needed by value_replay

The rollout buffer stores the log-probabilities returned by ``act`` (the frozen "old" policy at
collection time); the update recomputes them with ``evaluate`` and takes the clipped-surrogate step.
One environment; observations can be anything the policy understands (vectors, graphs).

A rollout is ``num_steps`` transitions, or (``rollout_episodes`` > 0) that many whole episodes, so an
update never bootstraps across a cut episode. Each update runs ``update_epochs`` passes of
``num_minibatches`` minibatches and stops as soon as one minibatch's approximate KL to the collecting
policy exceeds ``target_kl`` (checked before that minibatch's step, so no step is taken from a policy
that has already moved too far). Every update logs approx-KL, clip fraction, entropy and the critic's
explained variance on the rollout (``PPO.stats``).
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
    """Transitions collected per rollout; the policy is updated after each rollout (unused when
    ``rollout_episodes`` > 0)."""
    rollout_episodes: int = 0
    """When > 0, a rollout is this many whole episodes (any number of steps) instead of ``num_steps``
    transitions: with fixed-length episodes of L steps, an update every ``rollout_episodes × L`` steps."""
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
    """Normalise advantages within each minibatch (cleanrl's choice)."""
    adv_scale: str = "minibatch"
    """How advantages are scaled when ``norm_adv``: ``"minibatch"`` standardises them within each
    minibatch; ``"running"`` divides them by the running standard deviation of the returns (needs
    ``norm_value``), so a rollout whose episodes all scored alike moves the policy little instead of
    having its small differences blown up to unit size."""
    clip_coef: float = 0.2
    """Surrogate clipping: the probability ratio is kept within [1 - clip, 1 + clip]."""
    clip_vloss: bool = True
    """Clip the value-function update around the old value estimates too."""
    ent_coef: float = 0.01
    """Weight of the entropy bonus (keeps exploring)."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    norm_value: bool = False
    """The critic predicts returns standardised by running statistics of all returns seen so far (its
    raw output v means ``mean + std · v``): the value loss works at unit scale whatever the rewards'
    scale (a pruning reward varies by a few hundredths between plans)."""
    value_replay: int = 0
    """0: the critic trains with the actor, on the current rollout only (plain PPO). ``k`` > 0: the actor's
    epochs train the actor alone, then a value phase trains the critic on the returns of the last ``k``
    rollouts (this one included; as in phasic policy gradient's auxiliary phase), ``value_epochs``
    passes in shuffled minibatches of ``value_minibatch_size``. A rollout of a few episodes holds only a
    few distinct returns; a critic fitted to it alone chases them and learns nothing that carries over
    (bench/results/rl-learning.md). Needs a policy whose critic shares no parameters with the actor."""
    value_epochs: int = 2
    """Passes over the replayed returns per update (``value_replay`` > 0)."""
    value_minibatch_size: int = 32
    """Transitions per minibatch of the value phase (``value_replay`` > 0)."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip."""
    target_kl: Optional[float] = 0.05
    """Stop the update as soon as a minibatch's approximate KL to the old policy exceeds this, before
    that minibatch's step (None: never)."""
    seed: int = 0
    """Seeds python, numpy and torch at construction."""

    def __post_init__(self):
        if not isinstance(self.rollout_episodes, int) or self.rollout_episodes < 0:
            raise ValueError(f"rollout_episodes: expected a non-negative int, got {self.rollout_episodes!r}")
        if self.num_minibatches < 1 or (self.rollout_episodes == 0 and not 1 <= self.num_minibatches <= self.num_steps):
            raise ValueError(f"num_steps/num_minibatches: need 1 <= num_minibatches <= num_steps, got "
                             f"{self.num_steps}/{self.num_minibatches}")
        for name in ("value_replay", "value_epochs", "value_minibatch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "value_replay" else 1):
                raise ValueError(f"{name}: expected a {'non-negative' if name == 'value_replay' else 'positive'} int, got {v!r}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.gae_lambda <= 1:
            raise ValueError(f"gamma and gae_lambda must lie in [0, 1], got {self.gamma}, {self.gae_lambda}")
        if self.adv_scale not in ("minibatch", "running"):
            raise ValueError(f"adv_scale: expected 'minibatch' or 'running', got {self.adv_scale!r}")
        if self.adv_scale == "running" and not self.norm_value:
            raise ValueError("adv_scale='running' needs norm_value=True (it uses the running return statistics)")
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

    @property
    def episodes(self) -> int:
        """Episodes that ended within the rollout."""
        return int(sum(self.dones))

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
        if config is not None and config.value_replay > 0 and not hasattr(policy, "value"):
            raise TypeError("policy: value_replay needs a policy with value(obs_list) (a critic of its own)")
        self.config = config or PPOConfig()
        seed_everything(self.config.seed)
        self.policy = policy
        self.optimizer = torch.optim.Adam(policy.parameters(), lr=self.config.learning_rate, eps=1e-5)
        self.buffer = RolloutBuffer()
        self.updates = 0
        self.steps = 0
        self.stats: List[Dict[str, float]] = []
        self.return_stats = {"count": 0.0, "mean": 0.0, "var": 1.0}  # running statistics (norm_value)
        self.replay: List[Dict[str, Any]] = []  # the last value_replay rollouts: {"obs": [...], "returns": tensor}

    # -- value normalisation -------------------------------------------------------------------
    def _value_scale(self):
        """(mean, std) mapping the critic's raw output to a value (identity without ``norm_value``)."""
        if not self.config.norm_value or self.return_stats["count"] == 0:
            return 0.0, 1.0
        return self.return_stats["mean"], max(self.return_stats["var"], 1e-8) ** 0.5

    def _update_return_stats(self, returns: torch.Tensor) -> None:
        """Merges a rollout's returns into the running statistics (parallel Welford)."""
        rs, n = self.return_stats, float(len(returns))
        m, v = float(returns.mean()), float(returns.var(unbiased=False))
        tot = rs["count"] + n
        delta = m - rs["mean"]
        m2 = rs["var"] * rs["count"] + v * n + delta ** 2 * rs["count"] * n / tot
        rs.update(count=tot, mean=rs["mean"] + delta * n / tot, var=m2 / tot)

    # -- collection ----------------------------------------------------------------------
    def collect(self, env, obs):
        """Acts once in ``env`` from ``obs`` and stores the transition. Returns (next_obs, reward, done, info)."""
        with torch.no_grad():
            action, log_prob, value = self.policy.act(obs)
        mean, std = self._value_scale()
        value = mean + std * float(value)
        next_obs, reward, done, info = env.step(action)
        self.buffer.add(obs, action, log_prob, value, reward, done)
        self.steps += 1
        return next_obs, reward, done, info

    def ready(self) -> bool:
        """Whether the rollout is complete (``num_steps`` transitions, or ``rollout_episodes`` episodes)."""
        if self.config.rollout_episodes > 0:
            return self.buffer.episodes >= self.config.rollout_episodes
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
        mean, std = self._value_scale()
        with torch.no_grad():
            next_value = 0.0 if next_done else mean + std * float(self.policy.act(next_obs)[2])
        rewards, values = torch.tensor(buf.rewards), torch.tensor(buf.values)
        advantages, returns = compute_gae(rewards, values, torch.tensor(buf.dones), next_value, c.gamma, c.gae_lambda)
        if c.norm_value:  # the value loss compares standardised returns with the critic's raw output
            self._update_return_stats(returns)
            mean, std = self._value_scale()
        target, old_v = (returns - mean) / std, (values - mean) / std
        old_logp = torch.tensor(buf.log_probs)
        actions = torch.stack(buf.actions)
        n = len(buf)
        mb_size = max(1, n // c.num_minibatches)
        clipfracs, kls, entropies = [], [], []
        pg_loss = v_loss = torch.tensor(0.0)
        epochs_run, minibatch_steps, early_stop = 0, 0, False
        for _epoch in range(c.update_epochs):
            epochs_run += 1
            order = torch.randperm(n)
            for start in range(0, n, mb_size):
                idx = order[start:start + mb_size]
                new_logp, entropy, new_value = self.policy.evaluate([buf.obs[i] for i in idx], actions[idx])
                logratio = new_logp - old_logp[idx]
                ratio = logratio.exp()
                with torch.no_grad():
                    approx_kl = float(((ratio - 1) - logratio).mean())  # the low-variance k3 estimator
                kls.append(approx_kl)
                entropies.append(float(entropy.detach().mean()))
                if c.target_kl is not None and approx_kl > c.target_kl:
                    early_stop = True  # the policy moved far enough from the one that collected the data
                    break
                clipfracs.append(float(((ratio - 1.0).abs() > c.clip_coef).float().mean()))
                mb_adv = advantages[idx]
                if c.norm_adv and c.adv_scale == "running":
                    mb_adv = mb_adv / std
                elif c.norm_adv and len(idx) > 1:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                pg_loss = torch.max(-mb_adv * ratio, -mb_adv * ratio.clamp(1 - c.clip_coef, 1 + c.clip_coef)).mean()
                new_value = new_value.view(-1)
                if c.clip_vloss:
                    v_clipped = old_v[idx] + (new_value - old_v[idx]).clamp(-c.clip_coef, c.clip_coef)
                    v_loss = 0.5 * torch.max((new_value - target[idx]) ** 2, (v_clipped - target[idx]) ** 2).mean()
                else:
                    v_loss = 0.5 * ((new_value - target[idx]) ** 2).mean()
                loss = pg_loss - c.ent_coef * entropy.mean()
                if c.value_replay == 0:
                    loss = loss + c.vf_coef * v_loss
                self.optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(self.policy.parameters(), c.max_grad_norm)
                self.optimizer.step()
                minibatch_steps += 1
            if early_stop:
                break
        value_phase_loss = self._value_phase(buf.obs, returns) if c.value_replay > 0 else float("nan")
        # explained variance of the values the rollout was collected with (cleanrl's definition)
        var_y = float(returns.var()) if n > 1 else 0.0
        var_res = float((returns - values).var()) if n > 1 else 0.0
        explained_var = float("nan") if var_y == 0 else 1.0 - var_res / var_y
        stats = {
            "update": self.updates, "steps": self.steps, "transitions": n, "episodes": buf.episodes,
            "policy_loss": float(pg_loss.detach()), "value_loss": float(v_loss.detach()),
            "entropy": float(np.mean(entropies)), "approx_kl": kls[-1], "max_approx_kl": max(kls),
            "clip_fraction": float(np.mean(clipfracs)) if clipfracs else 0.0,
            "explained_variance": explained_var, "return_mean": float(returns.mean()), "return_var": var_y,
            "residual_mean": float((returns - values).mean()), "residual_var": var_res,
            "epochs": epochs_run, "minibatch_steps": minibatch_steps, "early_stop": early_stop,
            "value_phase_loss": value_phase_loss,
            "mean_reward": float(rewards.mean()), "lr": float(self.optimizer.param_groups[0]["lr"]),
        }
        self.updates += 1
        self.stats.append(stats)
        buf.clear()
        return stats

    def _value_phase(self, obs, returns: torch.Tensor) -> float:
        """Trains the critic on the returns of the last ``value_replay`` rollouts (this one included);
        returns the mean value loss of the last pass."""
        c = self.config
        self.replay.append({"obs": list(obs), "returns": returns.detach().clone()})
        del self.replay[:-c.value_replay]
        all_obs = [o for r in self.replay for o in r["obs"]]
        mean, std = self._value_scale()
        target = (torch.cat([r["returns"] for r in self.replay]) - mean) / std
        n = len(all_obs)
        losses: List[float] = []
        for _ in range(c.value_epochs):
            losses = []
            for idx in torch.tensor_split(torch.randperm(n), max(1, round(n / c.value_minibatch_size))):
                v_loss = 0.5 * ((self.policy.value([all_obs[i] for i in idx]).view(-1) - target[idx]) ** 2).mean()
                self.optimizer.zero_grad()
                v_loss.backward()
                nn.utils.clip_grad_norm_(self.policy.parameters(), c.max_grad_norm)
                self.optimizer.step()
                losses.append(float(v_loss.detach()))
        return float(np.mean(losses))

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
            "return_stats": dict(self.return_stats), "replay": list(self.replay),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        })

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.buffer = RolloutBuffer(**state["buffer"])
        self.updates, self.steps, self.stats = state["updates"], state["steps"], list(state["stats"])
        self.return_stats = dict(state.get("return_stats", {"count": 0.0, "mean": 0.0, "var": 1.0}))
        self.replay = [dict(r) for r in state.get("replay", [])]
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

    def value(self, obs_list):
        return self.critic(torch.stack([torch.as_tensor(o, dtype=torch.float32) for o in obs_list])).squeeze(-1)
