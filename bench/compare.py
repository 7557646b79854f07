"""AutoSculpt against simpler ways to reach the same MEASURED speed (issue: evaluation).

For every (model, target speedup, seed) each method gets the same trained dense model, the same data
splits, the same latency model and budget (target speedup at ``--budget-batch``) and the same
fine-tuning budget:

- ``autosculpt``:   ``autosculpt.search`` (GNN + PPO, reward from the measured-latency model);
- ``paper_reward``: the same search with the paper's reward: accuracy with a FLOPs band only
  (``target_flops_ratio = 1 - 1/target``: "2× faster" read as "half the FLOPs of the prunable
  convs"), no latency term; its measured latency is reported as it is, met or not;
- ``random``:       random plans over the search's action space, as many as autosculpt evaluated,
  same selection (:func:`autosculpt.baselines.random_search`);
- ``uniform``:      the same pattern mix in every layer, kept fraction bisected to the budget
  (:func:`autosculpt.baselines.uniform_baseline`);
- ``l1_filter``:    L1-norm filter pruning with channels removed (torch-pruning), ratio bisected on
  the measured speedup (:func:`autosculpt.baselines.l1_filter_baseline`);
- ``taylor_filter``: the same with torch-pruning's Taylor importance, gradients from 4 training
  batches (:func:`autosculpt.baselines.taylor_filter_baseline`);
- ``halp``:         HALP-style latency-lookup-table greedy: lower the kept fraction of the layer losing
  the least Taylor importance per millisecond saved until the prediction meets the budget, then
  measured (:func:`autosculpt.baselines.halp_greedy`);
- ``autosculpt_mlp``: the ablation: the same search with an MLP encoder instead of the GNN
  (:func:`autosculpt.baselines.mlp_encoder`).

Each result is fine-tuned with :func:`autosculpt.finetune.finetune` (best epoch on validation, test
evaluated once), then timed at batch 1 and 8 side by side with the dense model (interleaved medians,
threads fixed). ``met_budget`` is the method's own end-to-end check with the latency model at the
budget batch, judged by the search's own selection (:func:`autosculpt.search.select_plan` with
:data:`SELECTION`, the search's default :class:`~autosculpt.search.SelectionSettings`: measured speedup
≥ target × (1 - tolerance), tolerance 0); ``met_budget_final`` applies the same test to the final
interleaved measurement. Every method gets these same selection settings.

    python -m bench.compare                         # default: digits CNN + ResNet-20 on digits, 2× and 3×, 3 seeds
    python -m bench.compare --quick                 # ~1-2 min smoke run (writes to a temp folder)
    python -m bench.compare --data cifar10:PATH     # CIFAR-10 from a local python-pickle folder
    python -m bench.compare --data digits-clutter --out bench/results/compare-clutter.json   # the unsaturated set

Records go to ``bench/results/compare.json`` (written after every record: a killed run resumes and
skips what is done) and the table to ``compare.md``. The dense model, latency cache and search
checkpoints live in the user cache folder (``$AUTOSCULPT_CACHE``).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from autosculpt import timing  # noqa: E402
from bench.timing import cpu_name  # noqa: E402

METHODS = ("autosculpt", "autosculpt_mlp", "paper_reward", "random", "uniform", "l1_filter", "taylor_filter",
           "halp")  # random needs autosculpt's plan count
SEARCHES = ("autosculpt", "autosculpt_mlp", "paper_reward")
RECORD_FIELDS = ("method", "model", "target_speedup", "seed", "val_acc", "test_acc", "latency_ms_b1", "latency_ms_b8",
                 "speedup_b1", "speedup_b8", "search_seconds", "met_budget")
# How every method's plan is chosen and judged: the search's defaults, passed to each method.
from autosculpt.search import SelectionSettings  # noqa: E402

SELECTION = SelectionSettings()
TOLERANCE = SELECTION.tolerance  # how far a measured speedup may fall short of the target (as in the search)


@dataclass
class CompareConfig:
    """Everything that shapes a comparison run (the part that must match for a resume is ``config_id``)."""

    models: List[str] = field(default_factory=lambda: ["digits_cnn", "resnet20"])
    """Built-in model names."""
    targets: List[float] = field(default_factory=lambda: [2.0, 3.0])
    """Target speedups (dense / pruned measured latency at ``budget_batch``)."""
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds of the search, baselines and fine-tuning (data split and dense model are fixed by seed 0)."""
    methods: List[str] = field(default_factory=lambda: list(METHODS))
    """Which methods to run."""
    data: str = "digits"
    """``digits`` (8×8 for the digits CNN, upsampled to 32×32 for the other models) or ``cifar10:PATH``."""
    episodes: int = 48
    """Search episodes (one plan each) for autosculpt and paper_reward."""
    episodes_per_model: Dict[str, int] = field(default_factory=lambda: {"resnet20": 24})
    """Per-model overrides of ``episodes`` (a ResNet-20 plan takes ~30× longer to evaluate than a digits CNN plan)."""
    finetune_epochs: int = 4
    """Fine-tuning epochs for every method."""
    finetune_epochs_per_model: Dict[str, int] = field(default_factory=dict)
    """Per-model overrides of ``finetune_epochs``."""
    finetune_lr: float = 0.01
    """Peak fine-tuning learning rate (cosine)."""
    dense_epochs: int = 15
    """Training epochs of the dense model (cached)."""
    budget_batch: int = 8
    """Batch size the budget is stated and checked at (the search's latency-model input)."""
    threads: int = 1
    """Threads for every latency measurement, and for training (on a shared 2-core machine one thread
    trained 6-9× faster than two: OpenMP threads wait on each other when the cores are busy)."""
    latency: str = "measured"
    """``measured`` (``LatencyModel`` on this CPU) or ``flops`` (deterministic ``FlopsLatencyModel``, tests)."""
    repeats: int = 15
    """Interleaved timing repeats of the final measurement."""
    train_subset: int = 0
    """Use only this many training images (0: all), for quick runs."""
    finetune_subset: int = 0
    """Fine-tune every method on this many training images (a fixed random subset; 0: all of them).
    The dense model, BN recalibration and gradients still use the whole training split."""
    model_kwargs: Dict[str, dict] = field(default_factory=dict)
    """Extra constructor arguments per model (e.g. narrower channels for tests)."""

    def config_id(self) -> str:
        keep = {k: v for k, v in asdict(self).items() if k not in ("models", "targets", "seeds", "methods")}
        if not keep["finetune_subset"]:
            del keep["finetune_subset"]  # (added later: runs without it keep their id)
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:10]

    def check(self) -> "CompareConfig":
        from autosculpt.models import MODEL_NAMES

        bad = [m for m in self.models if m not in MODEL_NAMES or m == "vit_tiny"]
        if bad:
            raise ValueError(f"models: {bad} are not built-in CNNs; choose from {[m for m in MODEL_NAMES if m != 'vit_tiny']}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"methods: unknown {bad}; expected some of {list(METHODS)}")
        if "random" in self.methods and "autosculpt" not in self.methods:
            raise ValueError("methods: 'random' evaluates as many plans as 'autosculpt' did; include autosculpt")
        if not self.targets or any(not t > 1 for t in self.targets):
            raise ValueError(f"targets: expected speedups > 1, got {self.targets}")
        if self.latency not in ("measured", "flops"):
            raise ValueError(f"latency: expected 'measured' or 'flops', got {self.latency!r}")
        if not isinstance(self.finetune_subset, int) or self.finetune_subset < 0:
            raise ValueError(f"finetune_subset: expected a non-negative int, got {self.finetune_subset!r}")
        for name in ("episodes", "finetune_epochs", "dense_epochs", "budget_batch", "threads", "repeats"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if not self.seeds:
            raise ValueError("seeds: expected at least one seed")
        return self


# --------------------------------------------------------------------------- data and models


def _subset(data, n: int, seed: int = 0):
    if not n or n >= len(data):
        return data
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    if isinstance(data, torch.utils.data.TensorDataset):
        return torch.utils.data.TensorDataset(*(t[idx] for t in data.tensors))
    return torch.utils.data.Subset(data, idx)


def load_splits(data: str, model_name: str, train_subset: int = 0):
    """(train, val, test) with ``num_classes``/``input_shape``/``spec``: the digits at 8×8 for the
    digits CNN and bilinearly upsampled to 32×32 ("digits32") for the others; or the given spec."""
    from autosculpt.data import DataSplits, get_dataset

    if data == "digits" and model_name != "digits_cnn":
        import torch.nn.functional as F
        from torch.utils.data import TensorDataset

        from autosculpt.data.digits import load_digits_splits

        def up(d):
            x, y = d.tensors
            return TensorDataset(F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).contiguous(), y)

        tr, va, te = (up(d) for d in load_digits_splits(0))
        splits = DataSplits(tr, va, te, 10, (1, 32, 32), "digits32")
    else:
        splits = get_dataset(data, seed=0)
    if train_subset:
        splits = DataSplits(_subset(splits.train, train_subset), splits.val, splits.test, splits.num_classes,
                            splits.input_shape, splits.spec + f"-sub{train_subset}")
    return splits


def make_latency_model(cfg: CompareConfig, work: Path):
    from autosculpt.runtime.latency import FlopsLatencyModel, LatencyModel

    if cfg.latency == "flops":
        # latency exactly proportional to the 3×3 MACs that run: budgets are reachable on tiny test models
        return FlopsLatencyModel(ms_per_mflop=1.0, overhead_ms=0.0, remainder_ms=0.0)
    return LatencyModel("cpu", cache_path=str(work / "latency_cache.json"), threads=cfg.threads)


# --------------------------------------------------------------------------- one record


def _as_eval_plan(plan: dict) -> dict:
    """The plan with every conv on the dense path (same maths on masked weights): fine-tuning
    trains through torch's conv; the timing copy goes back to "auto" (kernel or fallback)."""
    return {**plan, "layers": {n: {**l, "path": "dense"} for n, l in plan["layers"].items()}}


def _set_auto_path(model: nn.Module) -> None:
    from autosculpt.nn import PatternConv2d

    for m in model.modules():
        if isinstance(m, PatternConv2d):
            m.path = "auto"


def measure_pair(dense: nn.Module, pruned: nn.Module, input_shape, batches: Sequence[int], threads: int,
                 repeats: int, latency_model=None) -> Dict[int, Dict[str, float]]:
    """Milliseconds of dense and pruned at each batch, interleaved medians with ``threads`` threads, both
    in the form ``latency_model`` times (a measured ``LatencyModel``: its form, "deployed", on the route
    it chose for the dense model, :func:`autosculpt.deploy.timed_form`), else in their fused inference
    form (:func:`autosculpt.fuse.for_inference`: BatchNorm folded, ReLUs and shortcut adds fused)."""
    from autosculpt.fuse import for_inference

    form = getattr(latency_model, "form", None)
    if form is not None:
        from autosculpt.deploy import timed_form

        route = latency_model.route or latency_model.candidate_routes[0]
        for_inference = lambda m, x: timed_form(m, x, form, (route,))[0]  # noqa: E731
    out = {}
    with timing.threads(threads):
        dense, pruned = dense.eval(), pruned.eval()
        for b in batches:
            x = torch.randn(b, *input_shape, generator=torch.Generator().manual_seed(b))
            with torch.no_grad():
                d, p = for_inference(dense, x), for_inference(pruned, x)
                t = timing.time_interleaved({"dense": lambda: d(x), "pruned": lambda: p(x)}, repeats, warmup=3,
                                            min_time_s=0.01)
            out[b] = {"dense_ms": t["dense"].median_ms, "pruned_ms": t["pruned"].median_ms}
    return out


def _timed_form_name(lm) -> str:
    form = getattr(lm, "form", None)
    return "fused" if form is None else (f"{form}:{lm.route}" if form == "deployed" else form)


def _check_with_latency_model(lm, dense, plan, example_input, target: float) -> dict:
    from autosculpt.budget import Budget
    from autosculpt.search import select_plan

    _, v, met, _ = select_plan([plan], Budget(target_speedup=target), SELECTION, warn=False,
                               verify=lambda p: lm.verify(dense, p, example_input))
    return {"predicted_speedup": v["predicted_speedup"], "measured_speedup": v["measured_speedup"], "met": met}


def run_method(method: str, cfg: CompareConfig, model_name: str, target: float, seed: int, dense: nn.Module,
               splits, lm, work: Path, plans_to_match: Optional[int], log=print) -> dict:
    """Runs one method for one (model, target, seed), fine-tunes and measures it; returns the record."""
    from autosculpt import search
    from autosculpt.baselines import (
        halp_greedy,
        l1_filter_baseline,
        mlp_encoder,
        random_search,
        taylor_filter_baseline,
        uniform_baseline,
    )
    from autosculpt.budget import Budget
    from autosculpt.finetune import FinetuneConfig, evaluate, finetune
    from autosculpt.flops import count_macs
    from autosculpt.plan import sparsify
    from autosculpt.rl.ppo import seed_everything

    seed_everything(seed)
    train, val, test = splits
    example = torch.stack([train[i][0] for i in range(cfg.budget_batch)])
    extra: dict = {}
    plan = None
    t0 = time.perf_counter()
    if method in SEARCHES:
        budget = ({"target_speedup": target} if method != "paper_reward"
                  else {"target_flops_ratio": 1.0 - 1.0 / target})
        encoder = mlp_encoder() if method == "autosculpt_mlp" else None
        ck = work / "searches" / f"{model_name}-{method}-t{target:g}-s{seed}"
        res = search(dense, train, val, **budget, episodes=cfg.episodes_per_model.get(model_name, cfg.episodes), seed=seed, checkpoint_dir=str(ck), resume=True,
                     latency_model=lm, example_input=example, progress=False, margin=SELECTION.margin,
                     verify_top=SELECTION.verify_top, verify_tolerance=SELECTION.tolerance, encoder=encoder)
        plan, search_s = res.best_plan, res.wall_time_s
        extra.update(evaluated_plans=len(res.history), val_acc_before_finetune=res.best_record["val_acc"],
                     setting=None, search_met_own_budget=res.met_budget)
        check = _check_with_latency_model(lm, dense, plan, example, target)
    elif method == "random":
        res = random_search(dense, train, val, num_plans=int(plans_to_match), latency_model=lm, example_input=example,
                            target_speedup=target, seed=seed, selection=SELECTION)
        plan, search_s = res.best_plan, res.wall_time_s
        extra.update(evaluated_plans=len(res.history), val_acc_before_finetune=res.best_record["val_acc"], setting=None)
        check = _check_with_latency_model(lm, dense, plan, example, target)
    elif method == "uniform":
        r = uniform_baseline(dense, lm, example, target, selection=SELECTION)
        plan, search_s = r.plan, r.wall_time_s
        check = {"predicted_speedup": lm.dense_ms() / r.predicted_ms, "measured_speedup": r.measured_speedup,
                 "met": r.met_budget}
        extra.update(evaluated_plans=len(r.trials), setting=r.setting)
    elif method == "halp":
        r = halp_greedy(dense, lm, example, target, train_data=train, seed=seed, selection=SELECTION)
        plan, search_s = r.plan, r.wall_time_s
        check = {"predicted_speedup": lm.dense_ms() / r.predicted_ms, "measured_speedup": r.measured_speedup,
                 "met": r.met_budget}
        extra.update(evaluated_plans=len(r.trials), setting=r.setting, greedy_steps=r.trials[-1]["steps"])
    elif method in ("l1_filter", "taylor_filter"):
        r = (l1_filter_baseline(dense, lm, example, target, selection=SELECTION) if method == "l1_filter" else
             taylor_filter_baseline(dense, lm, example, target, train_data=train, seed=seed, selection=SELECTION))
        search_s = r.wall_time_s
        check = {"predicted_speedup": None, "measured_speedup": r.measured_speedup, "met": r.met_budget}
        extra.update(evaluated_plans=len(r.trials), setting=r.setting)
        pruned = r.model
    else:
        raise ValueError(f"method: unknown {method!r}")
    if plan is not None:
        pruned = sparsify(dense, _as_eval_plan(plan))
    if "val_acc_before_finetune" not in extra:
        extra["val_acc_before_finetune"] = evaluate(pruned, val)

    t_ft = time.perf_counter()
    ft_train = _subset(train, cfg.finetune_subset, seed=0)
    ft = finetune(pruned, ft_train, val, test, FinetuneConfig(epochs=cfg.finetune_epochs_per_model.get(model_name, cfg.finetune_epochs), lr=cfg.finetune_lr, seed=seed),
                  progress=False)
    ft_s = time.perf_counter() - t_ft
    _set_auto_path(pruned)
    t = measure_pair(dense, pruned, splits.input_shape, (1, 8), cfg.threads, cfg.repeats, lm)
    x1 = example[:1]
    macs_ratio = count_macs(pruned, x1)["total"] / count_macs(dense, x1)["total"]
    sp = {b: t[b]["dense_ms"] / t[b]["pruned_ms"] for b in t}
    final_sp = sp.get(cfg.budget_batch)
    if final_sp is None:
        final_sp = (lambda m: m[cfg.budget_batch]["dense_ms"] / m[cfg.budget_batch]["pruned_ms"])(
            measure_pair(dense, pruned, splits.input_shape, (cfg.budget_batch,), cfg.threads, cfg.repeats, lm))
    rec = {
        "method": method, "model": model_name, "data": splits.spec, "target_speedup": float(target), "seed": int(seed),
        "val_acc": ft.best_val_acc, "test_acc": ft.test_acc,
        "latency_ms_b1": t[1]["pruned_ms"], "latency_ms_b8": t[8]["pruned_ms"],
        "dense_latency_ms_b1": t[1]["dense_ms"], "dense_latency_ms_b8": t[8]["dense_ms"],
        "speedup_b1": sp[1], "speedup_b8": sp[8],
        "search_seconds": search_s, "finetune_seconds": ft_s, "wall_seconds": time.perf_counter() - t0,
        "met_budget": bool(check["met"]), "budget_check": check, "budget_tolerance": TOLERANCE,
        "met_budget_final": SELECTION.meets({"measured_speedup": final_sp}, Budget(target_speedup=target)),
        "macs_ratio": macs_ratio, "params": sum(p.numel() for p in pruned.parameters()),
        "budget_batch": cfg.budget_batch, "threads": cfg.threads, "config_id": cfg.config_id(),
        "machine": cpu_name(), "torch": torch.__version__, "timed_form": _timed_form_name(lm), **extra,
    }
    log(f"[compare] {model_name} {target:g}x seed {seed} {method:12s} val {rec['val_acc']:.4f} test {rec['test_acc']:.4f} "
        f"speedup b1 {sp[1]:.2f} b8 {sp[8]:.2f} met {rec['met_budget']} search {search_s:.0f}s ft {ft_s:.0f}s")
    return rec


# --------------------------------------------------------------------------- the run


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_records(path: Path, config_id: str) -> List[dict]:
    """Records of an earlier run with the same settings (resume); a file from other settings is an error."""
    if not path.exists():
        return []
    try:
        records = json.loads(path.read_text())
        if not isinstance(records, list):
            raise ValueError("not a list")
    except ValueError as exc:
        raise ValueError(f"{path}: not a compare.json record list ({exc}); move it away or pass --fresh") from None
    other = {r.get("config_id") for r in records} - {config_id}
    if other:
        raise ValueError(f"{path}: holds records made with other settings (config {sorted(map(str, other))} vs now "
                         f"{config_id}); pass --fresh to start over or --out elsewhere")
    return records


def _key(r: dict) -> tuple:
    return (r["method"], r["model"], float(r["target_speedup"]), int(r["seed"]))


def run_compare(cfg: CompareConfig, out_json: Path, *, fresh: bool = False, work: Optional[Path] = None,
                log=print, command: str = "python -m bench.compare") -> List[dict]:
    """Runs every missing (model, target, seed, method) record, writing ``out_json`` after each and
    the markdown table (``out_json`` with suffix .md) at the end. Returns all records."""
    from autosculpt.config import cache_dir
    from autosculpt.finetune import evaluate
    from autosculpt.models import get_model
    from autosculpt.models.pretrained import dense_model

    cfg.check()
    cid = cfg.config_id()
    work = Path(work) if work is not None else Path(cache_dir()) / "compare" / cid
    records = [] if fresh else load_records(out_json, cid)
    if fresh and work.exists():
        import shutil

        shutil.rmtree(work / "searches", ignore_errors=True)
    done = {_key(r) for r in records}
    t_start = time.perf_counter()
    log(f"[compare] config {cid}: {asdict(cfg)}; {len(records)} records already done; work folder {work}")
    for model_name in cfg.models:
        splits = load_splits(cfg.data, model_name, cfg.train_subset)
        kwargs = {"num_classes": splits.num_classes, "in_chans": splits.input_shape[0], **cfg.model_kwargs.get(model_name, {})}
        factory = lambda: get_model(model_name, **kwargs)  # noqa: E731
        dense, _ = dense_model(factory, {"model": model_name, "model_args": kwargs}, splits, seed=0,
                               epochs=cfg.dense_epochs, progress=False, log=log)
        dense.eval()
        dense_acc = {"dense_val_acc": evaluate(dense, splits.val), "dense_test_acc": evaluate(dense, splits.test)}
        lm = make_latency_model(cfg, work)
        for seed in cfg.seeds:  # seeds outermost: a run cut short still has whole seeds for every target
            for target in cfg.targets:
                plans_to_match = None
                for method in cfg.methods:
                    key = (method, model_name, float(target), int(seed))
                    if key in done:
                        if method == "autosculpt":
                            plans_to_match = next(r["evaluated_plans"] for r in records if _key(r) == key)
                        continue
                    rec = run_method(method, cfg, model_name, target, seed, dense, splits, lm, work, plans_to_match, log)
                    rec.update(dense_acc)
                    if method == "autosculpt":
                        plans_to_match = rec["evaluated_plans"]
                    records.append(rec)
                    done.add(key)
                    _atomic_write(out_json, json.dumps(records, indent=1))
                    log(f"[compare] {len(records)} records, {time.perf_counter() - t_start:.0f}s elapsed")
    _atomic_write(out_json, json.dumps(records, indent=1))
    _atomic_write(out_json.with_suffix(".md"), render_markdown(records, cfg, command))
    return records


# --------------------------------------------------------------------------- report


def _mean_std(values: Sequence[float]) -> str:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "—"
    m = statistics.fmean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{m:.3f} ± {s:.3f}"


_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def ci95(values: Sequence[float]) -> float:
    """Half-width of the 95% confidence interval of the mean (Student t, n - 1 degrees of freedom);
    0 for a single value."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n < 2:
        return 0.0
    t = _T975.get(n - 1)
    if t is None:
        from scipy.stats import t as student

        t = float(student.ppf(0.975, n - 1))
    return t * statistics.stdev(vals) / math.sqrt(n)


def _mean_ci(values: Sequence[float]) -> str:
    vals = [v for v in values if v is not None]
    return f"{statistics.fmean(vals):.3f} ± {ci95(vals):.3f}" if vals else "—"


def target_summary(records: List[dict], ours: str = "autosculpt") -> List[dict]:
    """Per (model, target): ours and the best baseline (highest mean test accuracy among the other
    methods), the margin (paired per seed: ours − best baseline, mean ± 95% CI) and whether the issue's
    target holds: margin ≥ 1 point and every seed of ours meeting the budget in the final measurement."""
    rows = []
    for model, target in sorted({(r["model"], float(r["target_speedup"])) for r in records}):
        rs = [r for r in records if r["model"] == model and float(r["target_speedup"]) == target]
        by = {}
        for r in rs:
            by.setdefault(r["method"], {})[int(r["seed"])] = r
        if ours not in by or len(by) < 2:
            continue
        means = {m: statistics.fmean(r["test_acc"] for r in v.values()) for m, v in by.items()}
        base = max((m for m in by if m != ours), key=lambda m: means[m])
        met_all = {m: all(r.get("met_budget_final", False) for r in v.values()) for m, v in by.items()}
        base_met = max((m for m in by if m != ours and met_all[m]), key=lambda m: means[m], default=None)
        seeds = sorted(set(by[ours]) & set(by[base]))
        diff = [by[ours][s]["test_acc"] - by[base][s]["test_acc"] for s in seeds]
        ours_met = sum(r.get("met_budget_final", False) for r in by[ours].values())
        rows.append({
            "model": model, "target_speedup": target, "ours": _mean_ci([r["test_acc"] for r in by[ours].values()]),
            "ours_met": f"{ours_met}/{len(by[ours])}", "best_baseline": base,
            "best_baseline_acc": _mean_ci([r["test_acc"] for r in by[base].values()]),
            "best_baseline_met": f"{sum(r.get('met_budget_final', False) for r in by[base].values())}/{len(by[base])}",
            "best_met_baseline": base_met,
            "best_met_baseline_acc": _mean_ci([r["test_acc"] for r in by[base_met].values()]) if base_met else "—",
            "margin": statistics.fmean(diff) if diff else float("nan"), "margin_ci": ci95(diff),
            "target_met": bool(diff) and statistics.fmean(diff) >= 0.01 and ours_met == len(by[ours]),
        })
    return rows


def summarize(records: List[dict]) -> List[dict]:
    """One row per (model, target, method): means/stds over seeds."""
    groups: Dict[tuple, List[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], float(r["target_speedup"]), r["method"]), []).append(r)
    order = {m: i for i, m in enumerate(METHODS)}
    rows = []
    for (model, target, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], order.get(kv[0][2], 99))):
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        rows.append({
            "model": model, "target_speedup": target, "method": method, "n": len(rs),
            "val_acc": _mean_std([r["val_acc"] for r in rs]), "test_acc": _mean_std([r["test_acc"] for r in rs]),
            "test_acc_ci": _mean_ci([r["test_acc"] for r in rs]),
            "test_acc_mean": statistics.fmean(r["test_acc"] for r in rs),
            "latency_ms_b1": med("latency_ms_b1"), "latency_ms_b8": med("latency_ms_b8"),
            "speedup_b1": _mean_std([r["speedup_b1"] for r in rs]), "speedup_b8": _mean_std([r["speedup_b8"] for r in rs]),
            "met": f"{sum(r['met_budget'] for r in rs)}/{len(rs)}",
            "met_final": f"{sum(r.get('met_budget_final', False) for r in rs)}/{len(rs)}",
            "search_seconds": statistics.fmean(r["search_seconds"] for r in rs),
            "macs_ratio": statistics.fmean(r["macs_ratio"] for r in rs),
            "dense_test_acc": rs[0].get("dense_test_acc"), "dense_val_acc": rs[0].get("dense_val_acc"),
            "dense_ms_b1": statistics.median(r["dense_latency_ms_b1"] for r in rs),
            "dense_ms_b8": statistics.median(r["dense_latency_ms_b8"] for r in rs),
        })
    return rows


def render_markdown(records: List[dict], cfg: CompareConfig, command: str = "python -m bench.compare",
                    notes: Sequence[str] = ()) -> str:
    rows = summarize(records)
    seeds = sorted({r["seed"] for r in records})
    lines = [
        "# AutoSculpt vs baselines at equal measured-latency budgets",
        "",
        f"Machine: {cpu_name()}; latency with {cfg.threads} thread(s), budget checked at batch {cfg.budget_batch}; "
        f"torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        (f"Data: `{cfg.data}` (digits: 8×8 for the digits CNN, upsampled to 32×32 for the others; fixed split, seed 0). "
         if cfg.data == "digits" else
         f"Data: `{cfg.data}` (fixed splits, seed 0" + ("; 1×32×32 canvases split by source digit, see "
                                                       "bench/results/digits-clutter.md" if cfg.data == "digits-clutter" else "")
         + "). ") +
        f"Dense models trained {cfg.dense_epochs} epochs once (seed 0); seeds {seeds} vary search, baselines and "
        f"fine-tuning.",
        f"Budgets: search {cfg.episodes} episodes (one plan each; overrides {cfg.episodes_per_model}; random search "
        "evaluates as many distinct plans as "
        f"autosculpt did); fine-tuning {cfg.finetune_epochs} epochs (overrides {cfg.finetune_epochs_per_model}), lr {cfg.finetune_lr}"
        + (f", on a fixed subset of {cfg.finetune_subset} training images" if cfg.finetune_subset else "")
        + f", the same for every method; latency "
        f"model: {cfg.latency}" + (f"; training subset {cfg.train_subset} images" if cfg.train_subset else "") + ".",
        "Accuracies: mean ± std over seeds, and mean ± half-width of the 95% confidence interval of the mean (Student t) "
        "for test (val = best fine-tuning epoch; test evaluated once). Latency: median over "
        "seeds of interleaved medians beside the dense model, every model in the form the latency model times "
        f"({', '.join(sorted({r.get('timed_form', 'fused') for r in records}))}; fused = BatchNorm folded, pattern convs "
        "with ReLU and shortcut adds fused; deployed:ROUTE = autosculpt.deploy's deployed form on the route the "
        "latency model chose for the dense model). met = the method's own end-to-end check with the "
        f"latency model at batch {cfg.budget_batch} (speedup ≥ {1 - TOLERANCE:g} × target, as the search's selection "
        "judges it); final = the same on the final timing. "
        "paper_reward = the search with a FLOPs band (1 − 1/target of the prunable convs' MACs) and no latency term.",
        "",
    ]
    summary = target_summary(records)
    if summary:
        lines += [
            "## Summary per model × target",
            "",
            "best baseline = the highest mean test accuracy among the other methods, met or not; margin = autosculpt − "
            "best baseline, paired by seed (mean ± 95% CI); target = margin ≥ 1 point with every autosculpt seed meeting "
            "the budget in the final measurement.",
            "",
            "| model | target | autosculpt test | final met | best baseline | its test | its final met | best baseline meeting the budget on every seed | margin | target |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in summary:
            bm = f"{r['best_met_baseline']} {r['best_met_baseline_acc']}" if r["best_met_baseline"] else "—"
            lines.append(f"| {r['model']} | {r['target_speedup']:g}× | {r['ours']} | {r['ours_met']} | {r['best_baseline']} "
                         f"| {r['best_baseline_acc']} | {r['best_baseline_met']} | {bm} "
                         f"| {100 * r['margin']:+.1f} ± {100 * r['margin_ci']:.1f} pt | {'met' if r['target_met'] else 'NOT met'} |")
        lines += ["", "## All methods", ""]
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    lines += [
        "| model | target | method | n | val acc | test acc ± std | test acc ± 95% CI | ms b1 | ms b8 | speedup b1 | speedup b8 | met | final | MACs kept | search s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    last = None
    for r in rows:
        if (r["model"], r["target_speedup"]) != last:
            last = (r["model"], r["target_speedup"])
            dv, dt = r["dense_val_acc"], r["dense_test_acc"]
            lines.append(f"| {r['model']} | {r['target_speedup']:g}× | *dense* | | {dv:.3f} | {dt:.3f} | | {r['dense_ms_b1']:.3f} "
                         f"| {r['dense_ms_b8']:.3f} | 1 | 1 | | | 1.00 | |")
        lines.append(
            f"| {r['model']} | {r['target_speedup']:g}× | {r['method']} | {r['n']} | {r['val_acc']} | {r['test_acc']} | {r['test_acc_ci']} "
            f"| {r['latency_ms_b1']:.3f} | {r['latency_ms_b8']:.3f} | {r['speedup_b1']} | {r['speedup_b8']} "
            f"| {r['met']} | {r['met_final']} | {r['macs_ratio']:.2f} | {r['search_seconds']:.0f} |")
    lines += ["", f"Reproduce: `{command}`", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = CompareConfig()
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: digits CNN, 2×, 1 seed, 4 episodes, 1 fine-tuning epoch, 300 training images; "
                         "writes to a temp folder unless --out is given")
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--targets", nargs="+", type=float, default=None)
    ap.add_argument("--seeds", type=int, default=None, help=f"number of seeds (default {len(d.seeds)})")
    ap.add_argument("--seed-offset", type=int, default=0, help="first seed (e.g. to run seeds in separate processes)")
    ap.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    ap.add_argument("--data", default=None, help="digits (default), digits-clutter or cifar10:PATH")
    ap.add_argument("--episodes", type=int, default=None)
    ap.add_argument("--finetune-epochs", type=int, default=None)
    ap.add_argument("--dense-epochs", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="threads of every latency measurement and of training (default 1)")
    ap.add_argument("--latency", choices=("measured", "flops"), default=None)
    ap.add_argument("--train-subset", type=int, default=None)
    ap.add_argument("--finetune-subset", type=int, default=None,
                    help="fine-tune every method on this many training images (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="records JSON (default bench/results/compare.json)")
    ap.add_argument("--fresh", action="store_true", help="ignore earlier records in --out and start over")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the .md from the records in --out")
    ap.add_argument("--note", action="append", default=[], help="a note for the .md (repeatable)")
    ap.add_argument("--merge", nargs="+", type=Path, default=[],
                    help="with --report-only: add the records of these files (same settings, e.g. runs of other "
                         "seeds or models in separate processes) to --out first")
    args = ap.parse_args(argv)

    cfg = CompareConfig()
    if args.quick:
        cfg = dataclasses.replace(cfg, models=["digits_cnn"], targets=[2.0], seeds=[0], episodes=4, episodes_per_model={},
                                  finetune_epochs=1, finetune_epochs_per_model={},
                                  dense_epochs=3, repeats=5, train_subset=300)
    for name in ("models", "targets", "methods", "data", "episodes", "finetune_epochs", "dense_epochs", "threads",
                 "latency", "train_subset", "finetune_subset"):
        v = getattr(args, name)
        if v is not None:
            setattr(cfg, name, v)
    if args.episodes is not None:
        cfg.episodes_per_model = {}
    if args.finetune_epochs is not None:
        cfg.finetune_epochs_per_model = {}
    if args.seeds is not None:
        if args.seeds < 1:
            ap.error("--seeds: expected a positive number of seeds")
        cfg.seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
    elif args.seed_offset:
        cfg.seeds = [s + args.seed_offset for s in cfg.seeds]
    if args.data and args.data != "digits" and args.models is None and not args.quick:
        cfg.models = ["resnet20"]  # the digits CNN is built for 8×8 inputs
    out = args.out
    if out is None:
        out = (Path(tempfile.gettempdir()) / "autosculpt-compare-quick" / "compare.json" if args.quick
               else REPO / "bench" / "results" / "compare.json")
    try:
        cfg.check()
    except ValueError as exc:
        ap.error(str(exc))
    timing.set_threads(cfg.threads)  # training too: see CompareConfig.threads
    if args.report_only:
        records = load_records(out, cfg.config_id())
        done = {_key(r) for r in records}
        for extra in args.merge:
            for r in load_records(extra, cfg.config_id()):
                if _key(r) not in done:
                    records.append(r)
                    done.add(_key(r))
        if args.merge:
            _atomic_write(out, json.dumps(records, indent=1))
        _atomic_write(out.with_suffix(".md"), render_markdown(records, cfg, "python -m bench.compare", args.note))
        print(f"[compare] wrote {out.with_suffix('.md')} from {len(records)} records")
        return 0
    command = "python -m bench.compare" + "".join(" " + a for a in (argv if argv is not None else sys.argv[1:]))
    fresh = args.fresh or (args.quick and args.out is None)  # a smoke run in the temp folder starts over
    records = run_compare(cfg, out, fresh=fresh, command=command)
    print(render_markdown(records, cfg, command))
    print(f"[compare] wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
