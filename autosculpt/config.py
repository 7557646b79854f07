"""Run configuration: defaults < config file (YAML or TOML) < command-line flags.

Every setting has one flat key (the same name as its ``--flag`` with ``_`` for ``-``). The resolved
configuration is written to the run folder as ``config.yaml`` so a run can be repeated or resumed.
"""
from __future__ import annotations

import difflib
import os
from typing import Any, Dict, Optional

from ._atomic import atomic_write_text

__all__ = ["DEFAULTS", "HELP", "load_config_file", "resolve_config", "save_config", "cache_dir"]

# key -> (default, help). Order is the order of config.yaml.
_SPEC: Dict[str, tuple] = {
    "model": ("digits_cnn", "built-in model name or 'package.module:factory'"),
    "model_args": ({}, "keyword arguments for the model factory (dict)"),
    "weights": (None, "dense weights to start from (state_dict or autosculpt model file); default: train and cache"),
    "data": ("digits", "data set: digits | cifar10:PATH | cifar100:PATH | imagefolder:PATH"),
    "image_size": (32, "image-folder images are resized to this size"),
    "seed": (0, "seed for splits, search and training"),
    "target_speedup": (None, "speed budget: measured speedup over the dense model (default 2.0 if no budget is given)"),
    "target_latency_ms": (None, "speed budget: latency at the search batch size, in ms"),
    "target_flops_ratio": (None, "speed budget: kept fraction of FLOPs (paper style)"),
    "margin": (0.15, "the search aims this fraction past a speed budget, so the measured result still meets it on a noisy machine"),
    "episodes": (60, "search episodes (each evaluates one plan)"),
    "dense_epochs": (8, "epochs to train the dense model when no weights are given (cached)"),
    "finetune_epochs": (5, "fine-tuning epochs of the pruned model"),
    "lr": (0.01, "fine-tuning peak learning rate (cosine schedule)"),
    "dense_lr": (0.05, "learning rate for training the dense model"),
    "batch_size": (64, "training batch size (per process)"),
    "weight_decay": (5e-4, "SGD weight decay"),
    "momentum": (0.9, "SGD momentum"),
    "search_batch": (8, "batch size whose latency the search budget applies to"),
    "latency_cache": ("user", "measured kernel latencies: 'user' (cache folder, reused by later runs) or 'run' (measure afresh, keep in the run folder)"),
    "latency_batches": ([1, 8], "batch sizes of the latency measurement in the summary"),
    "latency_reps": (30, "timed repeats per latency measurement"),
    "threads": (None, "torch threads (default: torch's choice)"),
    "device": ("cpu", "cpu | cuda | cuda:N"),
    "backend": ("auto", "kernel backend of the pruned layers: auto | cpu | cuda | triton | torch"),
    "runs_dir": ("runs", "folder that holds run folders"),
    "name": (None, "run folder name (default: a timestamp)"),
    "progress": (True, "show progress bars"),
}
DEFAULTS: Dict[str, Any] = {k: v[0] for k, v in _SPEC.items()}
HELP: Dict[str, str] = {k: v[1] for k, v in _SPEC.items()}


def cache_dir() -> str:
    """The user cache folder: ``$AUTOSCULPT_CACHE``, else ``$XDG_CACHE_HOME/autosculpt``, else
    ``~/.cache/autosculpt``."""
    env = os.environ.get("AUTOSCULPT_CACHE")
    if env:
        return os.path.expanduser(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "autosculpt")


def load_config_file(path: str) -> Dict[str, Any]:
    """Reads a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file of flat settings; checks the keys."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config: file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext in (".yaml", ".yml"):
            from ._optional import require

            yaml = require("yaml", what=f"reading the YAML config {os.path.basename(path)!r}")
            with open(path) as f:
                data = yaml.safe_load(f)
        elif ext == ".toml":
            import tomllib

            with open(path, "rb") as f:
                data = tomllib.load(f)
        else:
            raise ValueError(f"config: {path!r} must end in .yaml, .yml or .toml")
    except (ValueError, ImportError):
        raise
    except Exception as e:  # noqa: BLE001 - parser errors of either format
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"config: cannot parse {path!r}: {first}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config: {path!r} must hold a mapping of settings, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    for k in data:
        if k not in _SPEC:
            close = difflib.get_close_matches(k, list(_SPEC), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"config: unknown setting {k!r} in {path!r}{hint}")
    return data


def resolve_config(file_values: Optional[Dict[str, Any]] = None, cli_values: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """defaults < file < CLI (CLI entries that are None mean "not given")."""
    cfg = dict(DEFAULTS)
    cfg.update(file_values or {})
    cfg.update({k: v for k, v in (cli_values or {}).items() if v is not None})
    budgets = [k for k in ("target_speedup", "target_latency_ms", "target_flops_ratio") if cfg.get(k) is not None]
    if len(budgets) > 1:
        # A flag given on the command line replaces a budget of another kind from the file.
        cli_budgets = [k for k in budgets if (cli_values or {}).get(k) is not None]
        if len(cli_budgets) == 1:
            for k in budgets:
                if k != cli_budgets[0]:
                    cfg[k] = None
        else:
            raise ValueError(f"config: give one speed budget, got {', '.join(budgets)}")
    if not any(cfg.get(k) is not None for k in ("target_speedup", "target_latency_ms", "target_flops_ratio")):
        cfg["target_speedup"] = 2.0
    return cfg


def save_config(cfg: Dict[str, Any], path: str) -> None:
    """Writes the resolved configuration as YAML with a comment per setting."""
    import json

    lines = ["# AutoSculpt run configuration (resolved: defaults < config file < command line)"]
    for k in _SPEC:
        if k in cfg:
            lines.append(f"# {HELP[k]}")
            lines.append(f"{k}: {json.dumps(cfg[k])}")  # JSON values are valid YAML flow scalars
    atomic_write_text(path, "\n".join(lines) + "\n")
