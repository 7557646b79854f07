"""PPO core: GAE against a hand computation, a real learning test on a toy env with a known optimum,
seeding, and exact resume from a state dict."""
import numpy as np
import pytest
import torch
from torch import nn

from autosculpt.rl.ppo import PPO, MLPActorCritic, PPOConfig, compute_gae

# Tiny networks: one thread avoids OpenMP fork/join overhead, which dominates on 2 shared cores.
pytestmark = pytest.mark.usefixtures("one_thread_module")


class MatchTargetEnv:
    """Each step shows a random target in {0..k-1} (one-hot) plus the step counter; action == target
    earns 1. Episodes last ``length`` steps, so the optimal return is ``length`` and a random policy
    earns ``length / k`` on average."""

    def __init__(self, k=4, length=8, seed=0):
        self.k, self.length = k, length
        self.rng = np.random.default_rng(seed)

    def _obs(self):
        o = np.zeros(self.k + 1, dtype=np.float32)
        o[self.target] = 1.0
        o[-1] = self.t / self.length
        return torch.from_numpy(o)

    def reset(self):
        self.t = 0
        self.target = int(self.rng.integers(self.k))
        return self._obs()

    def step(self, action):
        reward = float(int(action) == self.target)
        self.t += 1
        done = self.t >= self.length
        self.target = int(self.rng.integers(self.k))
        return self._obs(), reward, done, {}


def test_gae_matches_hand_computation():
    r = torch.tensor([1.0, 0.0, 2.0])
    v = torch.tensor([0.5, 0.4, 0.3])
    d = torch.tensor([0.0, 1.0, 0.0])
    g, lam = 0.9, 0.8
    adv, ret = compute_gae(r, v, d, next_value=0.7, gamma=g, lam=lam)
    d2 = 2.0 + g * 0.7 - 0.3
    d1 = 0.0 - 0.4  # episode ended after step 1: no bootstrap
    d0 = 1.0 + g * 0.4 - 0.5
    want = torch.tensor([d0 + g * lam * d1, d1, d2])
    torch.testing.assert_close(adv, want)
    torch.testing.assert_close(ret, want + v)


def _train(seed, steps=4096):
    env = MatchTargetEnv(seed=seed)
    torch.manual_seed(seed)
    policy = MLPActorCritic(5, 4, hidden=32)
    ppo = PPO(policy, PPOConfig(num_steps=128, num_minibatches=4, update_epochs=4, learning_rate=3e-3,
                                ent_coef=0.0, target_kl=None, seed=seed))
    returns = ppo.learn(env, steps)
    return returns, ppo


def test_ppo_learns_toy_env_to_near_optimal_return():
    returns, ppo = _train(seed=0)
    first, last = np.mean(returns[:20]), np.mean(returns[-50:])
    assert first < 4.0  # starts near random (expected 2.0)
    assert last >= 7.2, f"PPO reached only {last:.2f} of the optimal return 8"
    for s in ppo.stats:
        for key in ("approx_kl", "clip_fraction", "explained_variance", "entropy"):
            assert key in s
    assert ppo.stats[-1]["entropy"] < ppo.stats[0]["entropy"]


def test_ppo_is_seeded():
    a, _ = _train(seed=3, steps=512)
    b, _ = _train(seed=3, steps=512)
    assert a == b


def test_ppo_resume_from_state_dict_is_exact():
    cfg = PPOConfig(num_steps=32, num_minibatches=2, seed=1)
    env_a = MatchTargetEnv(seed=5)
    ppo_a = PPO(MLPActorCritic(5, 4, 16), cfg)
    ppo_a.learn(env_a, 80)  # stops mid-rollout
    state = ppo_a.state_dict()
    rng_state = env_a.rng.bit_generator.state
    tail_a = ppo_a.learn(env_a, 96)

    env_b = MatchTargetEnv(seed=5)
    env_b.rng.bit_generator.state = rng_state
    ppo_b = PPO(MLPActorCritic(5, 4, 16), cfg)
    ppo_b.load_state_dict(state)
    tail_b = ppo_b.learn(env_b, 96)
    assert tail_a == tail_b
    for pa, pb in zip(ppo_a.policy.parameters(), ppo_b.policy.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_bad_config_rejected():
    with pytest.raises(ValueError, match="num_minibatches"):
        PPOConfig(num_steps=4, num_minibatches=8)
    with pytest.raises(TypeError, match="policy"):
        PPO(torch.nn.Linear(2, 2))


def _graphs():
    from autosculpt.graph import build_graph
    from autosculpt.models import get_model

    torch.manual_seed(0)
    a = build_graph(get_model("resnet20"), torch.randn(1, 3, 32, 32))
    b = build_graph(get_model("resnet20"), torch.randn(1, 3, 32, 32))
    return a, b


def test_gnn_policy_log_probs_are_those_of_the_applied_action():
    from autosculpt.rl.policy import GNNActorCritic

    a, _ = _graphs()
    torch.manual_seed(0)
    pol = GNNActorCritic(a.data.x.shape[1], 6)
    with torch.no_grad():
        for p in pol.actor[-1].parameters():  # make the policy far from uniform
            p.normal_(0, 1)
    action, logp, value = pol.act(a.data)
    assert action.shape == (19,) and action.dtype == torch.long
    probs = pol.probabilities(a.data)
    assert probs.shape == (19, 6)
    torch.testing.assert_close(logp, probs[torch.arange(19), action].log().sum())
    # evaluate() on a batch of graphs recomputes exactly the same log-prob and value per graph
    other = torch.randint(0, 6, (19,))
    lp, ent, v = pol.evaluate([a.data, a.data], torch.stack([action, other]))
    torch.testing.assert_close(lp[0], logp)
    torch.testing.assert_close(lp[1], probs[torch.arange(19), other].log().sum())
    torch.testing.assert_close(v, torch.stack([value, value]))
    assert ent.shape == (2,) and bool((ent > 0).all())


def test_gnn_policy_encoder_is_swappable():
    from autosculpt.rl.policy import GNNActorCritic

    class MLPEncoder(nn.Module):
        out_dim = 32

        def __init__(self, d):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(d, 32), nn.Tanh())

        def forward(self, x, edge_index):
            return self.net(x)

    a, _ = _graphs()
    pol = GNNActorCritic(a.data.x.shape[1], 6, encoder=MLPEncoder(a.data.x.shape[1]), hidden=16)
    action, logp, value = pol.act(a.data)
    lp, _, _ = pol.evaluate([a.data], action[None])
    torch.testing.assert_close(lp[0], logp)
