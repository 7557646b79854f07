"""Reinforcement learning for the search: hand-written PPO (env- and policy-agnostic), the GNN
policy, and the pruning environment."""
from .ppo import PPO, MLPActorCritic, PPOConfig, RolloutBuffer, compute_gae

__all__ = ["PPO", "PPOConfig", "RolloutBuffer", "compute_gae", "MLPActorCritic"]
