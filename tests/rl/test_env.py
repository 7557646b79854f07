"""The sequential pruning environment: one layer per step, the observation carries the decisions made
so far, the current layer and the budget; the action mask keeps every plan within the budget; the
per-layer cost table equals the latency model; shaping sums to the final reward; the GNN policy's
log-probabilities are those of the masked distribution the action was sampled from."""
import pytest
import torch

from autosculpt.rl.env import GLOBAL_FEATURES, LAYER_STATE_FEATURES, Budget, PruningEnv
from autosculpt.runtime.latency import FlopsLatencyModel

pytest.importorskip("torch_geometric")
pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def parts():
    from autosculpt.data.digits import load_digits_splits
    from autosculpt.models import get_model

    torch.manual_seed(0)
    tr, va, _ = load_digits_splits(0)
    model = get_model("digits_cnn", channels=(8, 16, 16, 16)).eval()  # untrained: accuracy plays no role here
    x = torch.stack([tr[i][0] for i in range(8)])
    return model, tr, va, x


def make_env(parts, **kw):
    model, tr, va, x = parts
    budget = kw.pop("budget", Budget(target_flops_ratio=0.5))
    return PruningEnv(model, tr, va, FlopsLatencyModel(), x, budget, bn_batches=1, **kw)


def test_observation_changes_every_step_and_carries_the_decisions(parts):
    env = make_env(parts)
    col = {n: i for i, n in enumerate(env.layer_state_names)}
    nodes = env.graph.data.prunable_index
    L = env.num_layers
    obs = env.reset()
    assert env.global_feature_names[:len(GLOBAL_FEATURES)] == list(GLOBAL_FEATURES)
    assert env.layer_state_names[:len(LAYER_STATE_FEATURES)] == list(LAYER_STATE_FEATURES)
    assert len(env.feature_names) == obs.x.shape[1] + obs.layer_state.shape[1]
    assert obs.layer_state.shape == (L, len(env.layer_state_names))
    assert obs.glob.shape == (1, len(env.global_feature_names)) and obs.action_mask.shape == (1, len(env.menu))
    assert int(obs.current_index) == int(nodes[0]) and obs.layer_state[0, col["current"]] == 1.0
    assert float(obs.layer_state[:, col["decided"]].sum()) == 0.0
    seen, choices = [obs], [3, 1, 4, 5]
    for t, a in enumerate(choices):
        a = a if bool(obs.action_mask[0, a]) else int(obs.action_mask[0].nonzero()[-1])
        obs, reward, done, info = env.step(a)
        seen.append(obs)
        row = obs.layer_state[t]
        # the decided layer's row carries its flag, its mix and kept fraction, and its cost
        assert row[col["decided"]] == 1.0 and row[col["current"]] == 0.0
        mix = env.menu.mix_fractions(env._ids(env.graph.prunable[t], a))
        torch.testing.assert_close(row[len(LAYER_STATE_FEATURES):], mix)
        assert float(row[col["decided_kept_fraction"]]) == pytest.approx(env.menu.kept_fractions[a], abs=0.02)
        assert float(row[col["decided_cost"]]) == pytest.approx(float(env.layer_cost[t, a] * L / env.limit), rel=1e-5)
        assert float(obs.layer_state[:, col["decided"]].sum()) == t + 1  # all decisions so far, none after
        # the glob row: progress and the budget used so far
        assert float(obs.glob[0, 0]) == pytest.approx((t + 1) / L)
        used = (env.fixed_cost + sum(float(env.layer_cost[i, d]) for i, d in enumerate(env.decisions))) / env.limit
        assert float(obs.glob[0, 1]) == pytest.approx(used, rel=1e-5)
        g = dict(zip(env.global_feature_names, obs.glob[0].tolist()))
        name = env.graph.prunable[t]
        assert g[f"kept_fraction_{name}"] == pytest.approx(env.menu.kept_fractions[a])
        assert g[f"current_is_{name}"] == 0.0
        if t + 1 < L:
            assert g[f"current_is_{env.graph.prunable[t + 1]}"] == 1.0
            assert g[f"kept_fraction_{env.graph.prunable[t + 1]}"] == 0.0
        assert done == (t == L - 1)
        if not done:
            assert reward == 0.0 and info == {}
            assert int(obs.current_index) == int(nodes[t + 1]) and obs.layer_state[t + 1, col["current"]] == 1.0
    # every observation differs from the one before it
    for a, b in zip(seen, seen[1:]):
        assert not torch.equal(a.layer_state, b.layer_state) and not torch.equal(a.glob, b.glob)
    # the graph part is shared, not copied, between observations
    assert all(o.x.data_ptr() == seen[0].x.data_ptr() and o.edge_index.data_ptr() == seen[0].edge_index.data_ptr()
               for o in seen)
    assert info["action"] == env.decisions and reward == info["reward"]
    # a new episode starts from the same (dense) state again
    again = env.reset()
    assert torch.equal(again.layer_state, seen[0].layer_state) and torch.equal(again.glob, seen[0].glob)


@pytest.mark.parametrize("budget", [Budget(target_flops_ratio=0.6), Budget(target_speedup=1.6)])
def test_cost_table_equals_the_latency_model(parts, budget):
    env = make_env(parts, budget=budget)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        action = torch.randint(0, len(env.menu), (env.num_layers,), generator=gen)
        plan = env.plan_for(action)
        want = env.latency_model.flops(plan) if budget.uses_flops else env.latency_model.predict(plan)
        assert env.plan_cost(action) == pytest.approx(want, rel=1e-9)


def test_action_mask_keeps_every_plan_in_budget(parts):
    env = make_env(parts, budget=Budget(target_flops_ratio=0.7))
    gen = torch.Generator().manual_seed(1)
    masked_somewhere = False
    for _ in range(6):
        obs, done = env.reset(), False
        while not done:
            allowed = obs.action_mask[0].nonzero().view(-1)
            masked_somewhere |= len(allowed) < len(env.menu)
            a = allowed[torch.randint(len(allowed), (1,), generator=gen)]
            obs, _, done, rec = env.step(a)
        assert rec["meets_budget"], rec
    assert masked_somewhere  # the budget is tight enough that the mask had to act
    # a masked entry is refused
    obs = env.reset()
    env.step(0)  # dense first layer
    while env.t < env.num_layers - 1 and bool(env.allowed_actions().all()):
        env.step(0)
    if not bool(env.allowed_actions().all()):
        with pytest.raises(ValueError, match="masked"):
            env.step(int((~env.allowed_actions()).nonzero()[0]))
    # without the constraint every entry is allowed
    free = make_env(parts, budget=Budget(target_flops_ratio=0.7), constrain=False)
    assert bool(free.reset().action_mask.all())


def test_shaping_sums_to_the_final_reward(parts):
    env = make_env(parts, budget=Budget(target_flops_ratio=0.5), constrain=False, shaping=True)
    for actions in ([0] * env.num_layers, [5] * env.num_layers, [0, 5, 0, 5][: env.num_layers]):
        env.reset()
        rewards = []
        for a in actions:
            _, r, done, rec = env.step(a)
            rewards.append(r)
        assert done
        assert sum(rewards) == pytest.approx(rec["reward"], abs=1e-9)
        if actions == [0] * env.num_layers:
            # the dense plan misses the budget: the shaping term says so before the last step
            assert not rec["meets_budget"] and min(rewards[:-1]) < 0


def test_step_rejects_bad_actions(parts):
    env = make_env(parts)
    env.reset()
    with pytest.raises(ValueError, match="one menu index"):
        env.step([0, 1])
    with pytest.raises(ValueError, match="menu index"):
        env.step(len(env.menu))
    for _ in range(env.num_layers):
        env.step(int(env.allowed_actions().nonzero()[-1]))
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)


def test_state_dict_round_trip(parts):
    env = make_env(parts)
    env.reset()
    env.step(2)
    state = env.state_dict()
    other = make_env(parts)
    other.load_state_dict(state)
    assert other.decisions == [2] and other.t == 1
    assert torch.equal(other._obs.x, env._obs.x) and torch.equal(other._obs.layer_state, env._obs.layer_state)
    assert torch.equal(other._obs.glob, env._obs.glob)


def test_gnn_policy_log_probs_are_those_of_the_masked_action(parts):
    from autosculpt.rl.policy import GNNActorCritic

    env = make_env(parts, budget=Budget(target_flops_ratio=0.7))
    torch.manual_seed(0)
    pol = GNNActorCritic(len(env.feature_names), len(env.menu), len(env.global_feature_names))
    with torch.no_grad():
        for p in pol.actor.mlp[-1].parameters():  # far from uniform
            p.normal_(0, 1)
    obs_list, actions, logps, values = [], [], [], []
    obs, done = env.reset(), False
    while not done:
        action, logp, value = pol.act(obs)
        probs = pol.probabilities(obs)
        assert probs.shape == (len(env.menu),)
        assert bool((probs[~obs.action_mask[0]] == 0).all())
        assert bool(obs.action_mask[0, action])
        torch.testing.assert_close(logp, probs[action].log())
        obs_list.append(obs)
        actions.append(action)
        logps.append(logp)
        values.append(value)
        obs, _, done, _ = env.step(action)
    lp, ent, v = pol.evaluate(obs_list, torch.stack(actions))
    torch.testing.assert_close(lp, torch.stack(logps))
    torch.testing.assert_close(v, torch.stack(values))
    torch.testing.assert_close(pol.value(obs_list), torch.stack(values))
    assert ent.shape == (len(obs_list),) and bool((ent >= 0).all())
    # the value depends on the state (different observations, different values)
    assert len({round(float(x), 6) for x in values}) > 1


def test_gnn_policy_encoder_is_swappable(parts):
    from torch import nn

    from autosculpt.rl.policy import GNNActorCritic

    class MLPEncoder(nn.Module):
        out_dim = 32

        def __init__(self, d):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(d, 32), nn.Tanh())

        def forward(self, x, edge_index):
            return self.net(x)

    env = make_env(parts)
    d = len(env.feature_names)
    pol = GNNActorCritic(d, len(env.menu), len(env.global_feature_names), encoder=MLPEncoder(d), hidden=16)
    obs = env.reset()
    action, logp, value = pol.act(obs)
    lp, _, _ = pol.evaluate([obs], action[None])
    torch.testing.assert_close(lp[0], logp)
    assert pol.actor.encoder is not pol.critic.encoder  # the critic has its own copy


def test_evaluating_a_plan_leaves_the_global_rng_alone(parts):
    """The agent's random stream must not depend on which plans were evaluated and which recalled."""
    env = make_env(parts)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    env.evaluate_plan(env.plan_for([2] * env.num_layers))
    assert torch.equal(before, torch.get_rng_state())
