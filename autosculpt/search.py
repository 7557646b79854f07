"""``autosculpt.search``: find the pattern-pruning plan with the best validation accuracy among plans
whose measured latency meets a budget, with a graph-neural PPO agent.

Pipeline: model → graph (:mod:`autosculpt.graph`) → :class:`~autosculpt.rl.env.PruningEnv`, a sequential
decision process: an episode visits the prunable layers in graph order and the GNN actor-critic
(:mod:`autosculpt.rl.policy`) picks one pattern mix per step, seeing the graph with the decisions made
so far, the current layer and the budget used and left (decided prefix, the rest dense / at its
cheapest). Entries after which the budget can no longer be met are masked. After the last layer the
complete plan is applied, BN recalibrated, validation accuracy measured and the plan's predicted
latency (or MACs) taken from the latency model; the episode's reward is paid at that step::

    reward = val_accuracy - penalty · max(0, cost / limit - 1)

(optionally with a potential-based shaping term per step that sums to the same return; see
:mod:`autosculpt.rl.env`). Hand-written PPO (:mod:`autosculpt.rl.ppo`) updates after every
``rollout_episodes`` episodes (default 4, i.e. 4 × L transitions), with per-minibatch approx-KL early
stopping; every update's statistics (explained variance, approx-KL, clip fraction, entropy, ...) are
kept in :attr:`SearchResult.ppo_stats`. Every evaluated plan is recorded (identical plans are evaluated
once). At the end the most accurate plans that meet the budget by prediction are run end to end
(``LatencyModel.verify``) and the best one whose MEASURED latency meets the budget is returned.

The state (policy, optimiser, partial rollout, RNG, evaluated plans, latency profile) is checkpointed
after every episode with an atomic write; ``resume=True`` continues from the last checkpoint and ends
exactly where an uninterrupted run would have. Same seed → same result on the CPU, given the same
latency profile (a deterministic latency model, or a ``LatencyModel`` whose measurements come from its
cache; fresh measurements on a noisy machine differ from run to run).

Called in every process of an initialised ``torch.distributed`` group (``torchrun``; see
:func:`autosculpt.finetune.init_distributed`), the search shares out the accuracy evaluation of the
plans of each rollout among the ranks (see "several processes" below) and returns the same result on
every rank, equal to a single process's; only rank 0 measures latency and writes files.
"""
from __future__ import annotations

import copy
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from . import timing
from ._atomic import atomic_torch_save, atomic_write_text
from .budget import Budget
from .config import DEFAULTS
from .patterns import PAPER6, PatternSet
from .rl.env import PruningEnv
from .rl.policy import GNNActorCritic
from .rl.ppo import PPO, PPOConfig, seed_everything
from .train import evaluate

__all__ = ["search", "SearchResult", "Budget", "SelectionSettings", "Selection", "select_plan", "default_ppo_config"]

CHECKPOINT_NAME = "search_state.pt"
RESULT_NAME = "search_result.json"


@dataclass
class SearchResult:
    """What a search found.

    Attributes:
        best_plan: the chosen plan (JSON-able); ``autosculpt.sparsify(model, best_plan)`` applies it.
        best_record: its history record.
        history: one record per evaluated plan (in evaluation order): ``val_acc``, ``predicted_ms``,
            ``measured_ms`` (None unless run end to end), ``flops``, ``flops_ratio_removed``,
            ``predicted_speedup``, ``meets_budget`` (by prediction), ``reward``, ``action``,
            ``kept_fraction`` per layer, ``first_episode``, ``visits``.
        budget: the budget as given, plus ``margin`` and ``limit`` (ms, or MACs for a FLOPs budget: the
            limit the search aimed at, i.e. tightened by the margin).
        dense: the unpruned model: ``val_acc``, ``predicted_ms``, ``measured_ms``, ``flops``.
        met_budget: whether the best plan's measured latency (or FLOPs) meets the budget.
        verification: ``LatencyModel.verify`` output for the best plan (predicted vs measured).
        episode_rewards: the reward of every episode.
        ppo_stats: one log per PPO update: ``explained_variance`` (of the critic on the update's rollout),
            ``approx_kl`` (of the last minibatch looked at), ``max_approx_kl``, ``clip_fraction``,
            ``entropy``, ``early_stop`` (the KL limit stopped the update), ``minibatch_steps``,
            ``episode`` (the episode after which it ran), losses, ``return_var``, ``lr``.
        settings: the search arguments that shape the result (seed, episodes, constrain, ppo, ...).
        wall_time_s: total search time, summed over resumed runs.
    """

    best_plan: dict
    best_record: dict
    history: List[dict]
    budget: dict
    dense: dict
    met_budget: bool
    verification: Optional[dict] = None
    episode_rewards: List[float] = field(default_factory=list)
    ppo_stats: List[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    wall_time_s: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> "SearchResult":
        data = json.loads(text)
        if not isinstance(data, dict) or "best_plan" not in data:
            raise ValueError("SearchResult.from_json: expected the JSON written by SearchResult.to_json")
        return cls(**data)

    def save(self, path: str) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str) -> "SearchResult":
        """Reads a file written by :meth:`save`; a missing, empty, truncated or foreign file raises an
        error naming it (FileNotFoundError or ValueError)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"search result {path!r} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"search result {path!r} is unreadable ({type(e).__name__}: {e})") from None
        if not text.strip():
            raise ValueError(f"search result {path!r} is empty (the writing run was probably killed)")
        try:
            return cls.from_json(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"search result {path!r} is truncated or corrupt (invalid JSON: {e})") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"search result {path!r} is not a search result ({e})") from None


# -- checkpoint encoding -----------------------------------------------------------------------------
# The search state holds a few objects that are not tensors or plain data (numpy's RNG state array,
# torch_geometric ``Data`` observations). They are stored as tagged dicts of tensors and plain data, so
# the checkpoint is read with ``torch.load(weights_only=True)``: loading a checkpoint never runs code.

STATE_FORMAT = "autosculpt-search-state"
STATE_FORMAT_VERSION = 3  # 3: the sequential environment (one layer per step)
_TAG = "__autosculpt_type__"


def _encode_state(obj, where: str = "state"):
    import numpy as np

    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor, torch.Size, torch.dtype, torch.device)):
        return obj
    if isinstance(obj, (np.ndarray, np.generic)):
        arr = np.asarray(obj)
        if arr.dtype.hasobject:
            raise TypeError(f"search checkpoint: {where} is a numpy array of Python objects; cannot store it safely")
        raw = np.frombuffer(np.ascontiguousarray(arr).tobytes(), dtype=np.uint8).copy()
        return {_TAG: "ndarray" if isinstance(obj, np.ndarray) else "npscalar", "dtype": arr.dtype.str,
                "shape": list(arr.shape), "bytes": torch.from_numpy(raw)}
    if isinstance(obj, dict):
        if _TAG in obj:
            raise TypeError(f"search checkpoint: {where} uses the reserved key {_TAG!r}")
        return {k: _encode_state(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, list):
        return [_encode_state(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(_encode_state(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if type(obj).__module__.startswith("torch_geometric") and hasattr(obj, "to_dict"):
        return {_TAG: "pyg_data", "store": _encode_state(obj.to_dict(), f"{where}.store")}
    raise TypeError(f"search checkpoint: {where} is a {type(obj).__name__}, which cannot be stored safely "
                    "(only tensors, plain data, numpy arrays and graph observations)")


def _decode_state(obj):
    if isinstance(obj, dict):
        tag = obj.get(_TAG)
        if tag in ("ndarray", "npscalar"):
            import numpy as np

            arr = np.frombuffer(obj["bytes"].numpy().tobytes(), dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
            return arr if tag == "ndarray" else arr[()]
        if tag == "pyg_data":
            from torch_geometric.data import Data

            return Data.from_dict(_decode_state(obj["store"]))
        if tag is not None:
            raise ValueError(f"unknown tagged entry {tag!r}")
        return {k: _decode_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_state(v) for v in obj]
    if isinstance(obj, tuple) and not isinstance(obj, torch.Size):
        return tuple(_decode_state(v) for v in obj)
    return obj


def _save_checkpoint(state: dict, path: str) -> None:
    atomic_torch_save({"format": STATE_FORMAT, "format_version": STATE_FORMAT_VERSION,
                       "state": _encode_state(state)}, path)


def _load_checkpoint(path: str) -> dict:
    """Reads a search checkpoint with ``weights_only=True``; every failure names the file and says
    what to do."""
    import pickle
    import zipfile

    todo = "delete it (or use a fresh checkpoint_dir) to start the search over"
    if os.path.getsize(path) == 0:
        raise ValueError(f"resume: the search checkpoint {path!r} is empty (the run was probably killed while "
                         f"writing it); {todo}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"resume: the search checkpoint {path!r} holds objects other than tensors and plain data; "
                         f"it is refused because loading it could run code (older autosculpt versions wrote such "
                         f"checkpoints); {todo}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"resume: the search checkpoint {path!r} is truncated or corrupt ({first}); {todo}") from None
    if (not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT
            or payload.get("format_version") != STATE_FORMAT_VERSION or not isinstance(payload.get("state"), dict)):
        raise ValueError(f"resume: {path!r} is not a search checkpoint of this autosculpt version; {todo}")
    try:
        state = _decode_state(payload["state"])
        required = ("settings", "episode", "ppo", "env", "latency", "dense", "episode_rewards", "wall_time_s")
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"missing {missing}")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"resume: the search checkpoint {path!r} is corrupt ({e}); {todo}") from None
    return state


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, float):
        return o
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


# -- the final selection -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectionSettings:
    """How the final plan is chosen and when a measured plan meets its budget: the same for the search,
    :func:`autosculpt.baselines.random_search`, the other baselines and ``bench/compare.py`` (their
    defaults are these, and ``search()``'s ``margin``, ``verify_top`` and ``verify_tolerance`` defaults
    are these fields' defaults)."""

    margin: float = DEFAULTS["margin"]
    """The search (its reward and "meets the budget by prediction") aims this fraction past a speed
    budget, and :func:`select_plan` prefers a plan whose measurement beats the budget by half of it
    (:attr:`check_margin`), so that the plan still meets the budget when the user measures it on a noisy
    machine. FLOPs budgets are exact and get no margin. The run configuration's ``margin`` setting."""
    verify_top: int = 5
    """How many candidates (best first) are measured end to end at most."""
    tolerance: float = 0.0
    """A measured plan meets a speed budget when its speedup is at least ``target × (1 - tolerance)`` (or
    its latency at most ``target_latency_ms × (1 + tolerance)``); 0: the target itself."""

    def __post_init__(self):
        for name in ("margin", "tolerance"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1:
                raise ValueError(f"{name}: expected a fraction in [0, 1), got {v!r}")
        if not isinstance(self.verify_top, int) or isinstance(self.verify_top, bool) or self.verify_top < 0:
            raise ValueError(f"verify_top: expected a non-negative int, got {self.verify_top!r}")

    @property
    def check_margin(self) -> float:
        """How far past the budget a measurement must be for :func:`select_plan` to stop at that plan."""
        return self.margin / 2

    def meets(self, verification: dict, budget: Budget, margin: Optional[float] = None) -> bool:
        """Whether an end-to-end measurement (``measured_speedup`` for a speedup budget, ``measured_ms``
        for a latency budget) meets ``budget`` within :attr:`tolerance`, or, given a ``margin``, beats
        the budget tightened by that margin (exactly, no tolerance). FLOPs budgets are exact: the
        prediction IS the count of what runs, so they are always met here."""
        if budget.uses_flops:
            return True
        tol = self.tolerance if margin is None else 0.0
        b = budget if margin is None else budget.with_margin(margin)
        if b.target_speedup is not None:
            return verification["measured_speedup"] >= b.target_speedup * (1 - tol)
        return verification["measured_ms"] <= b.target_latency_ms * (1 + tol)


class Selection(NamedTuple):
    """What :func:`select_plan` chose: ``choice`` (one of the candidates, or the fallback), its
    ``verification`` (None when nothing was measured), ``met_budget``, and ``checked``: every measured
    candidate with the measurement it was judged by, in the order measured."""

    choice: Any
    verification: Optional[dict]
    met_budget: bool
    checked: List[Tuple[Any, dict]]


def select_plan(candidates: Sequence, budget: Budget, settings: Optional[SelectionSettings] = None, *,
                verify: Callable[[Any], dict], on_measured: Optional[Callable[[Any, dict], None]] = None,
                fallback: Any = None, warn: bool = True) -> Selection:
    """THE plan selection: the best candidate that meets ``budget`` when measured end to end.

    The search, :func:`autosculpt.baselines.random_search` (the most accurate plans that meet the budget
    by prediction), :func:`~autosculpt.baselines.uniform_baseline` and
    :func:`~autosculpt.baselines.l1_filter_baseline` (the plan their bisection is at) and
    ``bench/compare.py`` all choose, or judge, a plan with this function and the same ``settings``.

    Args:
        candidates: best first (the search: most accurate first), each meeting the budget by prediction.
        budget: the budget as the user gave it (not tightened by the margin).
        settings: :class:`SelectionSettings` (default: the defaults, as the search).
        verify: ``verify(candidate)`` measures it end to end: a dict with ``measured_speedup`` and
            ``measured_ms`` (``LatencyModel.verify``'s output).
        on_measured: called as ``on_measured(candidate, verification)`` with the measurement each
            measured candidate is judged by.
        fallback: returned (not measured, not met) when there is no candidate; without one, no
            candidate is a ValueError.
        warn: a RuntimeWarning when the fallback is returned or no candidate met the budget measured
            (the baselines' bisections pass False: there a miss means "try a smaller plan").

    The first ``settings.verify_top`` candidates are measured in order; a candidate that meets the budget
    is timed a second time and judged by the slower timing (on a shared machine a slow phase can flatter
    the pruned model for one whole measurement). The first whose measurement beats the budget by
    ``settings.check_margin`` wins; if none does, the first that meets the budget (``settings.tolerance``);
    if none does, the fastest measured, with ``met_budget`` False.
    """
    settings = SelectionSettings() if settings is None else settings
    candidates = list(candidates)
    if not candidates:
        if fallback is None:
            raise ValueError("select_plan: no candidates (and no fallback)")
        if warn:
            sp = fallback.get("predicted_speedup") if isinstance(fallback, dict) else None
            note = f" (predicted speedup {sp:.2f}×)" if isinstance(sp, (int, float)) else ""
            aim = f" aimed {settings.margin:g} past it" if settings.margin and not budget.uses_flops else ""
            warnings.warn(f"search: no evaluated plan meets the budget {budget.as_dict()}{aim}; returning the "
                          f"highest-reward plan{note}. Try more episodes or a looser budget.", RuntimeWarning)
        return Selection(fallback, None, False, [])
    checked: List[Tuple[Any, dict]] = []
    chosen = None
    for cand in candidates[:max(1, settings.verify_top)]:
        v = verify(cand)
        if not budget.uses_flops and settings.meets(v, budget):
            v = min(v, verify(cand), key=lambda r: r["measured_speedup"])
        checked.append((cand, v))
        if on_measured is not None:
            on_measured(cand, v)
        if settings.meets(v, budget, margin=settings.check_margin):
            chosen = (cand, v)
            break
    if chosen is None:
        met = [(c, v) for c, v in checked if settings.meets(v, budget)]
        if met:
            chosen = met[0]  # checked best first
    if chosen is not None:
        return Selection(chosen[0], chosen[1], True, checked)
    cand, v = max(checked, key=lambda c: c[1]["measured_speedup"])
    if warn:
        sp = v.get("predicted_speedup")
        note = f", predicted {sp:.2f}×" if isinstance(sp, (int, float)) else ""
        warnings.warn(f"search: none of the {len(checked)} most accurate in-budget plans met the budget when measured "
                      f"end to end (best measured speedup {v['measured_speedup']:.2f}×{note}); returning the fastest "
                      "of them.", RuntimeWarning)
    return Selection(cand, v, False, checked)


def _default_example_input(data, batch: int) -> torch.Tensor:
    n = min(batch, len(data))
    return torch.stack([data[i][0] for i in range(n)])


def search(
    model: nn.Module,
    train_data,
    val_data,
    *,
    target_speedup: Optional[float] = None,
    target_latency_ms: Optional[float] = None,
    target_flops_ratio: Optional[float] = None,
    episodes: int = DEFAULTS["episodes"],
    seed: int = DEFAULTS["seed"],
    checkpoint_dir: Optional[str] = None,
    resume: bool = False,
    latency_model=None,
    example_input: Optional[torch.Tensor] = None,
    progress: bool = DEFAULTS["progress"],
    pattern_set: PatternSet = PAPER6,
    ppo_config: Optional[PPOConfig] = None,
    constrain: bool = True,
    shaping: bool = False,
    bn_batches: int = 2,
    penalty: float = 2.0,
    verify_top: int = SelectionSettings.verify_top,
    verify_tolerance: float = SelectionSettings.tolerance,
    margin: float = SelectionSettings.margin,
    latency_batch_size: int = DEFAULTS["search_batch"],
    encoder: Optional[nn.Module] = None,
    callback: Optional[Callable[[int, dict], None]] = None,
) -> SearchResult:
    """Searches a pattern-pruning plan for ``model`` under a speed budget (see module docstring).

    Args:
        model: a trained, ``torch.fx``-traceable model (not modified).
        train_data: dataset of (input, label); only used for BN recalibration.
        val_data: dataset of (input, label); the accuracy the search maximises. Never pass the test set.
        target_speedup / target_latency_ms / target_flops_ratio: the budget (exactly one): dense/pruned
            latency ≥ target_speedup; pruned latency ≤ target_latency_ms; or fraction of prunable
            multiply-accumulates removed ≥ target_flops_ratio (paper-style).
        episodes: episodes to run (each decides every prunable layer once and evaluates one plan).
        seed: seeds everything; same seed → same result (see module docstring).
        checkpoint_dir: where the state is saved after every episode (and the latency cache, when
            ``latency_model`` is not given). None: no checkpoints.
        resume: continue from ``checkpoint_dir``'s checkpoint (settings must match); starts fresh if
            there is none.
        latency_model: a ``runtime.LatencyModel`` (measured; default one on the CPU) or
            ``runtime.FlopsLatencyModel`` (deterministic).
        example_input: the input batch latency is measured for; default: the first
            ``latency_batch_size`` training inputs.
        progress: show a tqdm bar.
        pattern_set: the patterns plans use (default the paper's six).
        ppo_config: PPO hyper-parameters (default: :func:`default_ppo_config`, an update every 4
            episodes); its ``seed`` is replaced by ``seed``.
        constrain: mask the menu entries after which the budget can no longer be met (every plan then
            meets the budget by prediction).
        shaping: add the potential-based budget term to every step's reward (see ``autosculpt.rl.env``).
        bn_batches: BN recalibration batches per evaluated plan.
        penalty: over-budget weight of the reward (see ``autosculpt.rl.env``).
        verify_top: how many of the most accurate in-budget plans are measured end to end at the end
            (:attr:`SelectionSettings.verify_top`).
        verify_tolerance: measured latency may exceed the limit by this fraction when a plan is checked
            end to end (0: the measured speedup must reach the target; :attr:`SelectionSettings.tolerance`).
        margin: the search (reward and "meets the budget by prediction") aims this fraction past the
            budget, and the end-to-end check of the chosen plan asks for half of it, so that the plan
            still meets the budget when the user measures it on a noisy machine (predictions of measured
            speedups are typically within 5-15%; timings of one model differ by several % from one
            measurement to the next). FLOPs budgets are exact and get no margin.
        latency_batch_size: the batch of the default ``example_input``.

    The defaults of ``episodes``, ``seed``, ``progress``, ``margin`` and ``latency_batch_size`` are the run
    configuration's (``autosculpt.config.DEFAULTS``: ``episodes``, ``seed``, ``progress``, ``margin``,
    ``search_batch``), so ``autosculpt.search(...)`` and ``autosculpt prune`` search alike; the final
    plan is chosen by :func:`select_plan` with ``SelectionSettings(margin, verify_top, verify_tolerance)``.
        encoder: optional replacement graph encoder for the policy.
        callback: called as ``callback(episode, record)`` after each episode's checkpoint.
    """
    from ._optional import ensure

    ensure("autosculpt.search", "torch_geometric", "scipy")
    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    budget = Budget(target_speedup, target_latency_ms, target_flops_ratio)
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not 0 <= margin < 1:
        raise ValueError(f"margin: expected a fraction in [0, 1), got {margin!r}")
    if not isinstance(episodes, int) or isinstance(episodes, bool) or episodes < 1:
        raise ValueError(f"episodes: expected a positive int, got {episodes!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    for name, data in (("train_data", train_data), ("val_data", val_data)):
        if not hasattr(data, "__len__") or not hasattr(data, "__getitem__") or len(data) == 0:
            raise ValueError(f"{name}: expected a non-empty dataset of (input, label) pairs")
    if resume and checkpoint_dir is None:
        raise ValueError("resume: needs checkpoint_dir (where the interrupted search saved its state)")
    if example_input is None:
        example_input = _default_example_input(train_data, latency_batch_size)
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input: expected a torch.Tensor, got {type(example_input).__name__}")
    if latency_model is None:
        from .runtime.latency import LatencyModel

        cache = os.path.join(checkpoint_dir, "latency_cache.json") if checkpoint_dir else None
        latency_model = LatencyModel("cpu", cache_path=cache, pattern_set=pattern_set)
    selection = SelectionSettings(margin=margin, verify_top=verify_top, tolerance=verify_tolerance)
    ppo_config = copy.deepcopy(ppo_config) if ppo_config is not None else default_ppo_config()
    ppo_config.seed = seed
    settings = {
        "seed": seed, "episodes": episodes, "formulation": "sequential", "constrain": bool(constrain),
        "shaping": bool(shaping), "bn_batches": bn_batches, "penalty": penalty,
        "budget": budget.as_dict(), "margin": float(margin), "pattern_set": pattern_set.to_json(), "ppo": asdict(ppo_config),
        "example_input_shape": list(example_input.shape), "latency_model": type(latency_model).__name__,
    }
    ckpt_path = os.path.join(checkpoint_dir, CHECKPOINT_NAME) if checkpoint_dir else None
    rank, world = _world()
    state = None
    if resume and ckpt_path and os.path.exists(ckpt_path):
        state = _load_checkpoint(ckpt_path)
        old = dict(state["settings"])
        mismatched = [k for k in settings if k != "episodes" and old.get(k) != settings[k]]
        if mismatched:
            raise ValueError(f"resume: the checkpoint in {checkpoint_dir} was made with other settings ({mismatched}); "
                             "use the same arguments or a fresh checkpoint_dir")

    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank has read the checkpoint before rank 0 writes the next one
    seed_everything(seed)
    model = copy.deepcopy(model).eval()
    if state is not None:
        latency_model.load_state_dict(state["latency"])
    elif world == 1:
        latency_model.profile(model, example_input, progress=progress)
    else:  # latency is measured once, on rank 0 (the others would disturb and differ); all predict alike
        if rank == 0:
            latency_model.profile(model, example_input, progress=progress)
        # (with rank 0's random state after profiling too: the policy's initial weights are drawn next)
        sent = _broadcast_json({"profile": latency_model.state_dict(), "rng": _rng_state()} if rank == 0 else None)
        if rank != 0:
            latency_model.load_state_dict(sent["profile"])
            _set_rng_state(sent["rng"])
    env = PruningEnv(model, train_data, val_data, latency_model, example_input, budget.with_margin(margin), pattern_set,
                     bn_batches=bn_batches, penalty=penalty, seed=seed, threads=torch.get_num_threads(),
                     constrain=constrain, shaping=shaping)
    # The policy's graphs are tiny: one thread avoids OpenMP fork/join overhead (and pathological
    # slow-downs when the cores are shared); the accuracy evaluation uses the caller's thread count.
    # Only rank 0 writes files (checkpoints, the result) and shows progress.
    main = rank == 0
    with timing.threads(1):
        return _run(env, model, train_data, val_data, latency_model, example_input, budget, settings, state,
                    ckpt_path if main else None, checkpoint_dir if main else None, episodes, seed, ppo_config,
                    encoder, progress and main, callback, selection, t_start)


def _run(env, model, train_data, val_data, latency_model, example_input, budget, settings, state, ckpt_path,
         checkpoint_dir, episodes, seed, ppo_config, encoder, progress, callback, selection, t_start):
    """The episode loop of :func:`search` (arguments as there; ``ckpt_path`` and ``checkpoint_dir`` are
    None on the ranks other than 0 of a distributed search)."""
    rank, world = _world()
    policy = GNNActorCritic(len(env.feature_names), len(env.menu), len(env.global_feature_names), encoder=encoder,
                            init_bias=_budget_centred_bias(env))
    ppo = PPO(policy, ppo_config)  # seeds python/numpy/torch again: identical start on every run
    if state is not None:
        ppo.load_state_dict(state["ppo"])
        env.load_state_dict(state["env"])
        dense, first_episode, episode_rewards = state["dense"], state["episode"] + 1, list(state["episode_rewards"])
        elapsed_before = state["wall_time_s"]
    else:
        with timing.threads(env.threads):
            dense = {"val_acc": evaluate(model, val_data), "predicted_ms": env.dense_ms, "measured_ms": None,
                     "flops": env.dense_flops}
        first_episode, episode_rewards, elapsed_before = 0, [], 0.0

    bar = None
    if progress:
        from ._optional import tqdm

        bar = tqdm(total=episodes, initial=min(first_episode, episodes), desc="search", unit="episode")
    looked_ahead_to = first_episode
    for episode in range(first_episode, episodes):
        if world > 1 and episode >= looked_ahead_to and ppo.config.rollout_episodes > 0:
            # the episodes up to the next PPO update: their plans' accuracies, shared out among the ranks
            n = min(ppo.config.rollout_episodes - ppo.buffer.episodes, episodes - episode)
            _evaluate_ahead(env, ppo.policy, n, rank, world)
            looked_ahead_to = episode + n
        obs, done, ep_reward = env.reset(), False, 0.0
        while not done:
            obs, reward, done, rec = ppo.collect(env, obs)
            rec.setdefault("first_episode", episode)
            ep_reward += reward
            if ppo.ready():
                ppo.update(obs, done)["episode"] = episode
        episode_rewards.append(ep_reward)
        if ckpt_path:
            _save_checkpoint({
                "settings": settings, "episode": episode, "ppo": ppo.state_dict(), "env": env.state_dict(),
                "latency": latency_model.state_dict(), "dense": dense, "episode_rewards": episode_rewards,
                "wall_time_s": elapsed_before + time.perf_counter() - t_start,
            }, ckpt_path)
        if bar is not None:
            ok = [r["val_acc"] for r in env.evaluations.values() if r["meets_budget"]]
            bar.set_postfix(plans=len(env.evaluations), best_in_budget=f"{max(ok):.4f}" if ok else "-")
            bar.update(1)
        if callback is not None:
            callback(episode, rec)
    if bar is not None:
        bar.close()

    if rank != 0:  # the end-to-end measurements (and so the choice) are rank 0's; it sends the result
        return SearchResult.from_json(_broadcast_text(None))
    history = sorted(env.evaluations.values(), key=lambda r: r["index"])
    timing.set_threads(env.threads)  # end-to-end latency is measured with the caller's threads (restored by search)
    best, verification, met, checked = select_plan(env.in_budget_by_accuracy(), budget, selection,
                                                   verify=env.verify_record, on_measured=env.note_measured,
                                                   fallback=env.best_by_reward())
    if checked:
        dense["measured_ms"] = checked[-1][1]["dense_measured_ms"]
    result = SearchResult(
        best_plan=env.plan_for(best["action"]), best_record=best, history=history,
        budget={**budget.as_dict(), "margin": settings["margin"], "limit": env.limit, "uses_flops": budget.uses_flops},
        dense=dense,
        met_budget=met, verification=verification, episode_rewards=episode_rewards, ppo_stats=list(ppo.stats),
        settings=settings, wall_time_s=elapsed_before + time.perf_counter() - t_start,
    )
    if checkpoint_dir:
        result.save(os.path.join(checkpoint_dir, RESULT_NAME))
    if world > 1:
        _broadcast_text(result.to_json())
    return result


# -- several processes (torchrun) ------------------------------------------------------------------
# Under an initialised torch.distributed process group (``torchrun``; autosculpt.finetune.init_distributed)
# every rank runs the same agent with the same seed, so all sample the same plans. The accuracies of
# the plans of one PPO rollout (the episodes before the next update) are evaluated ahead, each new plan
# by one rank on the whole validation split (round robin), and gathered: every rank then has every
# accuracy a single process would have computed, bit for bit, and the agents stay identical. Latency is
# measured on rank 0 only and sent to the others. Messages are JSON text (exact for floats), never pickles.


def _world() -> Tuple[int, int]:
    from .finetune import world_info

    return world_info()


def _broadcast_text(text: Optional[str], src: int = 0) -> str:
    from .finetune import broadcast_text

    return broadcast_text(text, src)


def _comm_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _rng_state() -> dict:
    """Python's, numpy's and torch's (CPU) random states as plain data."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state().tolist(),
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(internal), gauss_next]}


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _broadcast_json(obj, src: int = 0):
    """Rank ``src``'s plain-data ``obj`` on every rank."""
    return json.loads(_broadcast_text(json.dumps(obj) if obj is not None else None, src))


def _all_gather_json(obj) -> list:
    """Every rank's plain-data ``obj``, in rank order."""
    import torch.distributed as dist

    dev, world = _comm_device(), dist.get_world_size()
    raw = json.dumps(obj).encode("utf-8")
    size = torch.tensor([len(raw)], dtype=torch.long, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    n = max(int(s) for s in sizes)
    mine = torch.zeros(n, dtype=torch.uint8)
    mine[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    bufs = [torch.empty(n, dtype=torch.uint8, device=dev) for _ in range(world)]
    dist.all_gather(bufs, mine.to(dev))
    return [json.loads(b[:int(s)].cpu().numpy().tobytes().decode("utf-8")) for b, s in zip(bufs, sizes)]


def _sample_ahead(env: PruningEnv, policy: nn.Module, n: int) -> List[tuple]:
    """The complete actions of the next ``n`` episodes as the episode loop will sample them, drawn from a
    copy of the random state (restored after), without evaluating any plan. The loop draws the same
    numbers: the policy does not change before the next update, the observations do not depend on
    rewards, and accuracy evaluation draws from a forked RNG (``PruningEnv.evaluate_plan``)."""
    import random

    import numpy as np

    actions = []
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            for _ in range(n):
                obs, done = env.reset(), False
                while not done:
                    with torch.no_grad():
                        action, _, _ = policy.act(obs)
                    obs, _, done, _ = env.step(action, evaluate=False)
                actions.append(tuple(env.decisions))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
        env.reset()
    return actions


def _evaluate_ahead(env: PruningEnv, policy: nn.Module, n: int, rank: int, world: int) -> None:
    """Evaluates the new plans of the next ``n`` episodes, shared out round robin among the ranks, and
    leaves every accuracy in ``env.accuracy_cache`` on every rank (consumed by ``env.record_for``)."""
    actions = _sample_ahead(env, policy, n)
    todo = [a for a in dict.fromkeys(actions) if a not in env.evaluations]  # new plans, first seen first
    mine = [[list(a), env.evaluate_plan(env.plan_for(a))] for a in todo[rank::world]]
    gathered = _all_gather_json({"actions": [list(a) for a in actions], "accuracies": mine})
    if any(g["actions"] != gathered[0]["actions"] for g in gathered):
        raise RuntimeError("search: the processes sampled different plans (their agents diverged); a distributed "
                           "search needs the same seed, data, model and settings on every rank")
    env.accuracy_cache = {tuple(a): acc for g in gathered for a, acc in g["accuracies"]}


def default_ppo_config() -> PPOConfig:
    """The search's PPO hyper-parameters: an update every 4 episodes (4 × L transitions for L prunable
    layers), 4 epochs of 4 minibatches, KL-limited per minibatch, undiscounted (the reward comes at the
    end of a fixed-length episode); standardised value targets and a critic trained on the returns of
    the last 8 rollouts (32 episodes); entropy bonus 0.03. ``bench/results/rl-learning.md`` records how
    they were chosen."""
    return PPOConfig(rollout_episodes=4, num_minibatches=4, update_epochs=4, learning_rate=1e-3, gamma=1.0,
                     gae_lambda=0.95, ent_coef=0.03, target_kl=0.05, clip_vloss=False, norm_value=True,
                     value_replay=8, value_epochs=2, value_minibatch_size=32)


def _budget_centred_bias(env: PruningEnv, sharpness: float = 1.0, force: bool = False) -> torch.Tensor:
    """The policy's initial logits. With the action mask (``env.constrain``): uniform over the allowed
    entries, which explores mixed plans; centring every layer on one entry started the search around
    the UNIFORM plan at the budget, among the least accurate plans that meet it (bench/results/
    rl-learning.md). Without the mask (or ``force``): centred on the densest menu entry whose uniform
    plan meets the budget, so that the first plans sampled are near the budget instead of half of them
    far over it. Costs come from the latency model only."""
    n = len(env.menu)
    if env.constrain and not force:
        return torch.zeros(n)
    j = n - 1
    for i in range(n):
        if env.plan_cost([i] * env.num_layers) <= env.limit:
            j = i
            break
    return -sharpness * (torch.arange(n) - j).abs().float()
