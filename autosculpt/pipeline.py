"""The jobs behind the CLI: ``prune`` (search → fine-tune → save → measure → report) and ``finetune``.

Each stage of ``prune`` leaves a file in the run folder; with ``resume`` a finished stage is read
back instead of redone, and an interrupted stage continues from its own checkpoint (the search's in
``search/``, fine-tuning's in ``finetune_checkpoint.pt``).
"""
from __future__ import annotations

import json
import os
import platform
import time
import warnings
from datetime import datetime, timezone
from typing import Callable, Dict, Optional

import torch

from . import config as cfgmod
from ._version import __version__
from .timing import set_threads

__all__ = ["run_prune", "run_finetune", "new_run_dir", "Interrupted"]

Log = Callable[[str], None]


class Interrupted(Exception):
    """Ctrl-C during a job; ``checkpoint`` names what was saved and how to resume."""

    def __init__(self, message: str):
        super().__init__(message)


INFERENCE_FORM = ("each model in its fastest deployed form (autosculpt.optimize_for_inference over the routes "
                  "autosculpt / autosculpt_channels_last / autosculpt_graph: BatchNorm folded, epilogues fused, "
                  "weights packed once; the graph route runs the whole model as one C++ call); "
                  "median (IQR) of interleaved repeats")


def final_budget_check(cfg: dict, latency: dict, flops_met: bool) -> dict:
    """Whether the FINAL measurement meets the budget: ``{"met": bool, "measured": value, "target":
    value, "what": text}``. A speed budget is checked on the search batch's measured median speedup
    (or latency); a FLOPs budget (counted, not measured: ``flops_met`` is the search's exact check of
    the prunable convs' multiply-accumulates) is reported as the search found it."""
    b = str(cfg["search_batch"])
    if cfg.get("target_speedup") is not None:
        got, want = latency[b]["speedup"], float(cfg["target_speedup"])
        return {"met": got >= want, "measured": got, "target": want, "what": f"measured speedup at batch {b}"}
    if cfg.get("target_latency_ms") is not None:
        got, want = latency[b]["pruned"], float(cfg["target_latency_ms"])
        return {"met": got <= want, "measured": got, "target": want, "what": f"measured latency (ms) at batch {b}"}
    return {"met": bool(flops_met), "measured": None, "target": float(cfg["target_flops_ratio"]),
            "what": "fraction of the prunable convs' MACs removed (counted by the search)"}


def new_run_dir(cfg: dict) -> str:
    """``<runs_dir>/<name>`` (or a UTC timestamp); a taken timestamp gets a numeric suffix."""
    name = cfg.get("name") or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = os.path.join(cfg["runs_dir"], name)
    if not cfg.get("name"):
        base, i = path, 1
        while os.path.exists(path):
            i += 1
            path = f"{base}-{i}"
    return path


def validate_config(cfg: dict) -> None:
    """Checks every setting before a run writes or allocates anything (see
    :func:`autosculpt.config.validate_config`, where all the checks live)."""
    cfgmod.validate_config(cfg)


def _device(cfg: dict) -> torch.device:
    try:
        dev = torch.device(cfg["device"])
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {cfg['device']!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: CUDA was requested but no CUDA GPU is usable here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {cfg['device']!r}")
    return dev


def _setup(cfg: dict) -> None:
    if cfg.get("threads") is not None:
        if not isinstance(cfg["threads"], int) or cfg["threads"] < 1:
            raise ValueError(f"threads: expected a positive int, got {cfg['threads']!r}")
        set_threads(cfg["threads"])
    if not isinstance(cfg.get("seed"), int) or isinstance(cfg.get("seed"), bool):
        raise ValueError(f"seed: expected an int, got {cfg.get('seed')!r}")
    torch.manual_seed(cfg["seed"])


def _batch(data, n: int) -> torch.Tensor:
    """The first ``n`` inputs of ``data`` (cycled if it is smaller) as one batch."""
    return torch.stack([data[i % len(data)][0] for i in range(n)])


def _load_data(cfg: dict):
    """The data set, and the checks of the batch sizes against it (before any batch is built)."""
    from .data import get_dataset

    splits = get_dataset(cfg["data"], cfg["seed"], image_size=cfg["image_size"])
    cfgmod.check_batches_for_data(cfg, splits.input_shape)
    return splits


def _resolve_model(cfg: dict, splits):
    """(factory, metadata) of the configured model for the data's classes and input shape."""
    from .models.pretrained import resolve_model

    return resolve_model(cfg["model"], splits.num_classes, splits.input_shape, cfg.get("model_args") or {})


def _load_data_and_dense(cfg: dict, device: torch.device, log: Log, splits, resolved):
    """The data splits, the model's factory and metadata, and the dense model (trained or cached)."""
    from .models.pretrained import dense_model

    factory, meta = resolved
    meta = {**meta, "data": cfg["data"], "num_classes": splits.num_classes, "input_shape": list(splits.input_shape)}
    dense, source = dense_model(factory, meta, splits, cfg["seed"], epochs=cfg["dense_epochs"], lr=cfg["dense_lr"],
                                batch_size=cfg["batch_size"], weights=cfg.get("weights"), device=device,
                                progress=cfg["progress"], log=log)
    return splits, factory, meta, dense.eval(), source


def _check_searchable(name: str, factory, splits) -> None:
    """Fails before any dense training when the search would find nothing to prune: its action space is
    the pattern mix of each 3×3 conv (zero padding, groups = 1), so a model without one (a ViT, an
    MLP) cannot be searched."""
    from .patterns import PAPER6
    from .runtime.hooks import collect_layers

    model = factory().eval()
    with torch.no_grad():
        layers = collect_layers(model, torch.zeros(1, *splits.input_shape), PAPER6)
    if not layers:
        raise ValueError(
            f"model: {name} ({type(model).__name__}) has no prunable 3×3 conv, and the search chooses the "
            "pattern mix of each 3×3 conv (channel groups and attention heads are not in its action space "
            "yet); a channel plan for it: autosculpt.plan.plan_for_mac_cut(model, example_input, mac_cut)")


def _search_fn():
    import autosculpt

    fn = getattr(autosculpt, "search", None)
    if not callable(fn):
        from .search import search as fn  # noqa: F811 - the module form, before the package re-exports it
    return fn


def _search_result_cls():
    from .search import SearchResult

    return SearchResult


def _budget_text(cfg: dict) -> str:
    if cfg.get("target_speedup") is not None:
        return f"{cfg['target_speedup']:g}× measured speedup"
    if cfg.get("target_latency_ms") is not None:
        return f"latency ≤ {cfg['target_latency_ms']:g} ms"
    return f"{cfg['target_flops_ratio']:g} of prunable FLOPs removed"


def run_prune(cfg: dict, run_dir: str, *, resume: bool = False, log: Log = print) -> Optional[dict]:
    """Prunes ``cfg['model']`` on ``cfg['data']`` into ``run_dir``; returns the summary dict.

    Under ``torchrun`` (several processes): the dense model (when trained) and the fine-tuning are
    data-parallel, the search shares out its candidates' accuracy evaluation (``autosculpt.search``),
    latency is measured on rank 0 only, and only rank 0 writes files, measures the final latencies
    and returns the summary; the other ranks return None once fine-tuning is done."""
    from .finetune import FinetuneConfig, finetune, init_distributed, shutdown_distributed, world_info
    from .io import load, save
    from .measure import count_flops, count_params, layer_latency, measure_latency_stats
    from .plan import sparsify
    from .report import render_report, write_json

    t_start = time.perf_counter()
    validate_config(cfg)
    _setup(cfg)
    dist_device = init_distributed()
    device = dist_device if dist_device is not None else _device(cfg)
    main = world_info()[0] == 0
    if not main:
        log = _silent
    stage_s: Dict[str, float] = {}

    t0 = time.perf_counter()
    splits = _load_data(cfg)  # checks the batch sizes against the data before the run folder exists
    resolved = _resolve_model(cfg, splits)
    _check_searchable(cfg["model"], resolved[0], splits)  # the search has something to prune: before any training
    if main:
        os.makedirs(run_dir, exist_ok=True)
        cfgmod.save_config(cfg, os.path.join(run_dir, "config.yaml"))
    splits, factory, meta, dense, dense_source = _load_data_and_dense(cfg, device, log, splits, resolved)
    train, val, test = splits
    stage_s["data_and_dense_model"] = time.perf_counter() - t0
    search_input = _batch(val, cfg["search_batch"]).to(device)

    # -- search ---------------------------------------------------------------------------------
    result_path = os.path.join(run_dir, "search_result.json")
    t0 = time.perf_counter()
    if resume and os.path.exists(result_path):
        try:
            result = _search_result_cls().load(result_path)
        except ValueError as e:
            raise ValueError(f"resume: {e}; delete {result_path!r} to run the search again") from None
        log(f"search: done before, read {result_path}")
    else:
        from .runtime.latency import LatencyModel

        cache_folder = cfgmod.cache_dir() if cfg["latency_cache"] == "user" else os.path.join(run_dir, "search")
        lm = LatencyModel(device, cache_path=os.path.join(cache_folder, "latency_cache.json"), backend=cfg["backend"])
        kwargs = {k: cfg[k] for k in ("target_speedup", "target_latency_ms", "target_flops_ratio") if cfg.get(k) is not None}
        if cfg.get("episodes") is not None:
            kwargs["episodes"] = cfg["episodes"]
        kwargs["margin"] = cfg["margin"]
        log(f"search: {meta['model']} on {cfg['data']}, budget {_budget_text(cfg)} at batch {cfg['search_batch']}")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                result = _search_fn()(dense, train, val, seed=cfg["seed"], checkpoint_dir=os.path.join(run_dir, "search"),
                                      resume=resume, latency_model=lm, example_input=search_input,
                                      progress=cfg["progress"], **kwargs)
        except KeyboardInterrupt:
            raise Interrupted(f"search interrupted; its state is saved in {os.path.join(run_dir, 'search')}") from None
        for w in caught:
            text = str(w.message)
            log(f"search: warning: {text[len('search: '):] if text.startswith('search: ') else text}")
        if main:
            result.save(result_path)
    stage_s["search"] = time.perf_counter() - t0
    plan = result.best_plan
    if main:
        write_json(plan, os.path.join(run_dir, "plan.json"))
    if not result.met_budget:
        log("search: WARNING: the chosen plan does not meet the budget when measured (see report)")

    # -- fine-tune ------------------------------------------------------------------------------
    model_path = os.path.join(run_dir, "model.pt")
    ft_path = os.path.join(run_dir, "finetune.json")
    t0 = time.perf_counter()
    if resume and os.path.exists(model_path) and os.path.exists(ft_path):
        pruned = load(model_path, factory, backend=cfg["backend"]).to(device)
        with open(ft_path) as f:
            ft = json.load(f)
        log(f"fine-tune: done before, read {model_path}")
    else:
        pruned = sparsify(dense, plan, backend=cfg["backend"]).to(device)
        ftcfg = FinetuneConfig(epochs=cfg["finetune_epochs"], lr=cfg["lr"], batch_size=cfg["batch_size"],
                               momentum=cfg["momentum"], weight_decay=cfg["weight_decay"], seed=cfg["seed"])
        ckpt = os.path.join(run_dir, "finetune_checkpoint.pt")
        try:
            res = finetune(pruned, train, val, test, ftcfg, checkpoint_path=ckpt, resume=resume, progress=cfg["progress"])
        except KeyboardInterrupt:
            raise Interrupted(f"fine-tuning interrupted; checkpoint saved in {ckpt}") from None
        ft = {**res.to_dict(), "epochs": ftcfg.epochs}
        if main:
            save(pruned, model_path, plan=plan, meta={**meta, "val_acc": res.best_val_acc, "test_acc": res.test_acc,
                                                       "seed": cfg["seed"]})
            write_json(ft, ft_path)
    stage_s["finetune"] = time.perf_counter() - t0
    # The rest (final measurement, report) is rank 0's alone: the process group ends here.
    shutdown_distributed()
    if not main:
        return None

    # -- measure --------------------------------------------------------------------------------
    from .finetune import evaluate

    t0 = time.perf_counter()
    pruned.eval()
    dense_val, dense_test = evaluate(dense, val), evaluate(dense, test)
    one = _batch(val, 1).to(device)
    latency = {}
    batches = list(dict.fromkeys([*map(int, cfg["latency_batches"]), int(cfg["search_batch"])]))
    for b in batches:
        x = _batch(val, b).to(device)
        t = measure_latency_stats({"dense": dense, "pruned": pruned}, x, reps=cfg["latency_reps"],
                                  progress=cfg["progress"], desc=f"latency batch {b}")
        latency[str(b)] = {"dense": t["dense"].median_ms, "pruned": t["pruned"].median_ms,
                           "speedup": t["dense"].median_ms / t["pruned"].median_ms,
                           "dense_iqr": t["dense"].iqr_ms, "pruned_iqr": t["pruned"].iqr_ms,
                           "dense_route": t["dense"].route, "pruned_route": t["pruned"].route,
                           "load_average": t["pruned"].load_average}
    layers = layer_latency(dense, pruned, search_input, reps=max(5, cfg["latency_reps"] // 2), progress=cfg["progress"])
    write_json(layers, os.path.join(run_dir, "layer_latency.json"))
    stage_s["measure"] = time.perf_counter() - t0

    hist = result.history
    chosen_index = next((i for i, r in enumerate(hist) if r.get("index") == result.best_record.get("index")), None)
    summary = {
        "run_dir": os.path.abspath(run_dir),
        "budget": _budget_text(cfg),
        "met_budget_in_search": bool(result.met_budget),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "versions": {"autosculpt": __version__, "torch": str(torch.__version__)},
        "config": cfg,
        "dense": {"val_acc": dense_val, "test_acc": dense_test, "flops": count_flops(dense, one),
                  "params": count_params(dense), "weights": dense_source},
        "pruned": {"val_acc": ft["best_val_acc"], "test_acc": ft["test_acc"], "flops": count_flops(pruned, one),
                   "params": count_params(pruned), "file": os.path.abspath(model_path)},
        "latency_ms": latency,
        "latency_timed_as": INFERENCE_FORM,
        "met_budget_final": final_budget_check(cfg, latency, result.met_budget),
        "search": {
            "episodes": result.settings.get("episodes"), "evaluated_plans": len(hist), "seconds": result.wall_time_s,
            "chosen_index": chosen_index, "chosen_val_acc": result.best_record.get("val_acc"),
            "chosen_predicted_ms": result.best_record.get("predicted_ms"),
            "chosen_measured_ms": result.best_record.get("measured_ms"),
            "budget_latency_ms": None if result.budget.get("uses_flops") else result.budget.get("limit"),
            "dense_latency_ms": result.dense.get("predicted_ms"), "batch": cfg["search_batch"],
            "verification": result.verification,
        },
        "finetune": {k: ft.get(k) for k in ("epochs", "best_val_acc", "best_epoch", "test_acc", "world_size")},
        "stage_seconds": stage_s,
    }
    summary["stage_seconds"]["total"] = time.perf_counter() - t_start
    write_json(summary, os.path.join(run_dir, "summary.json"))
    render_report(run_dir)
    return summary


def _silent(msg: str) -> None:
    pass


def run_finetune(model_file: str, cfg: dict, *, data_spec: Optional[str] = None, out: Optional[str] = None,
                 checkpoint: Optional[str] = None, resume: bool = False, model_spec: Optional[str] = None,
                 image_size_given: Optional[int] = None, log: Log = print) -> Optional[dict]:
    """Fine-tunes a saved pruned model (``autosculpt finetune``); DDP when launched by torchrun.

    The data set, model and seed default to those recorded in the file. Rank 0 writes ``out``
    (default: ``<model_file stem>-finetuned.pt``) and returns the result; other ranks return None.
    """
    from .data import get_dataset
    from .finetune import FinetuneConfig, finetune, init_distributed, is_main_process
    from .io import load, read, save
    from .models.pretrained import resolve_model

    validate_config(cfg)
    # The output paths are checked before any work: a bad --out must not cost a whole training run.
    out = cfgmod.check_output_file(out or f"{os.path.splitext(model_file)[0]}-finetuned.pt", "--out")
    checkpoint = cfgmod.check_output_file(checkpoint or f"{os.path.splitext(out)[0]}-checkpoint.pt", "--checkpoint")
    _setup(cfg)
    dist_device = init_distributed()
    device = dist_device if dist_device is not None else _device(cfg)
    saved = read(model_file)
    meta = saved.meta
    from_file = data_spec is None
    data_spec = data_spec or meta.get("data") or cfg["data"]
    image_size = cfg["image_size"]
    if from_file and image_size_given is None and meta.get("input_shape"):
        image_size = int(meta["input_shape"][-1])  # the resolution the model was trained at
    elif image_size_given is not None:
        image_size = image_size_given
    splits = get_dataset(data_spec, cfg["seed"], image_size=image_size)
    if meta.get("input_shape") and tuple(meta["input_shape"]) != tuple(splits.input_shape):
        log(f"finetune: note: the model was trained on inputs {tuple(meta['input_shape'])}, the data gives {splits.input_shape}")
    if model_spec:
        factory, _ = resolve_model(model_spec, splits.num_classes, splits.input_shape, cfg.get("model_args") or meta.get("model_args"))
        model = load(model_file, factory, backend=cfg["backend"])
    else:
        model = load(model_file, backend=cfg["backend"])
    model = model.to(device)
    ftcfg = FinetuneConfig(epochs=cfg["finetune_epochs"], lr=cfg["lr"], batch_size=cfg["batch_size"],
                           momentum=cfg["momentum"], weight_decay=cfg["weight_decay"], seed=cfg["seed"])
    try:
        res = finetune(model, splits.train, splits.val, splits.test, ftcfg, checkpoint_path=checkpoint, resume=resume,
                       progress=cfg["progress"])
    except KeyboardInterrupt:
        raise Interrupted(f"fine-tuning interrupted; checkpoint saved in {checkpoint}") from None
    if not is_main_process():
        return None
    save(model, out, plan=saved.plan, meta={**meta, "data": data_spec, "val_acc": res.best_val_acc,
                                            "test_acc": res.test_acc, "finetune": res.history})
    return {**res.to_dict(), "out": os.path.abspath(out), "data": data_spec}
