"""Run configuration: defaults < config file (YAML or TOML) < command-line flags.

Every setting has one flat key (the same name as its ``--flag`` with ``_`` for ``-``). The resolved
configuration is written to the run folder as ``config.yaml`` so a run can be repeated or resumed.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from ._atomic import atomic_write_text
from .budget import BUDGET_KEYS

__all__ = ["DEFAULTS", "HELP", "SETTINGS", "Setting", "load_config_file", "resolve_config", "save_config", "cache_dir",
           "validate_config", "check_setting", "check_batches_for_data", "check_output_file", "SettingError", "flag_of",
           "flag_help", "default_text", "FLAG_GROUPS"]


@dataclass(frozen=True)
class Setting:
    """One run setting: its default, its help and how the command line takes it.

    The command line (``autosculpt.cli``) generates every setting's flag from this: the flag's name,
    help text (with the default appended) and parsing all come from here, so a default or help text is
    written once. Its check (``check_setting``) is in ``_CHECKS`` below, one per setting.
    """

    default: Any
    """The value when neither a config file nor a flag gives one."""
    help: str
    """What the setting does (the comment in ``config.yaml`` and the flag's help)."""
    group: Optional[str]
    """The flag's argument group in ``--help`` (None: the command's own options)."""
    parse: Optional[type] = str
    """How the flag's text becomes a value (``str``, ``int``, ``float``) before ``check_setting`` checks it
    as the flag is parsed; None: the text is kept and checked with the whole configuration."""
    metavar: Optional[str] = None
    """The flag's value placeholder in ``--help``."""
    choices: Optional[tuple] = None
    """The allowed values (the check, and argparse's ``choices``)."""
    nargs: Optional[str] = None
    """argparse ``nargs`` (``"+"``: a list given as several words)."""
    cli: str = "value"
    """How the flag takes the setting: ``"value"`` (``--flag VALUE``), ``"key_value"`` (repeatable
    ``--flag KEY=VALUE``, collected into a mapping) or ``"off_switch"`` (``--flag`` sets it to False)."""
    flag: Optional[str] = None
    """The flag, when it is not ``--`` + the key with ``-`` for ``_``."""
    flag_help: Optional[str] = None
    """The flag's help when the flag does not just set the value (``--no-progress``)."""
    commands: tuple = ("prune", "finetune")
    """The commands that take the flag."""


_COMMON, _PRUNE = ("prune", "finetune"), ("prune",)
_MODEL, _TRAIN, _RUNTIME = "model and data", "training", "runtime"
_BUDGET, _SEARCH, _OUTPUT = "budget (one of)", "search and measurement", "output"
# The order of the flag groups in --help (None: the command's own options).
FLAG_GROUPS = (None, _MODEL, _TRAIN, _RUNTIME, _BUDGET, _SEARCH, _OUTPUT)

# key -> Setting. Order is the order of config.yaml (and of the flags within each --help group).
SETTINGS: Dict[str, Setting] = {
    "model": Setting("digits_cnn", "built-in model name or 'package.module:factory'", _MODEL),
    "model_args": Setting({}, "keyword arguments for the model factory (dict)", _MODEL, metavar="KEY=VALUE",
                          cli="key_value", flag="--model-arg",
                          flag_help="model factory argument (repeatable), e.g. --model-arg width_mult=0.5"),
    "weights": Setting(None, "dense weights to start from (state_dict or autosculpt model file); default: train and cache",
                       None, parse=None, metavar="FILE", commands=_PRUNE),
    "data": Setting("digits", "data set: digits | digits-clutter | cifar10:PATH | cifar100:PATH | imagefolder:PATH", _MODEL),
    "image_size": Setting(32, "image-folder images are resized to this size", _MODEL, parse=int),
    "seed": Setting(0, "seed for splits, search and training", _MODEL, parse=int),
    "target_speedup": Setting(None, "speed budget: measured speedup over the dense model (default 2.0 if no budget is given)",
                              _BUDGET, parse=float, metavar="X", commands=_PRUNE),
    "target_latency_ms": Setting(None, "speed budget: latency at the search batch size, in ms", _BUDGET, parse=float,
                                 metavar="MS", commands=_PRUNE),
    "target_flops_ratio": Setting(None, "speed budget: kept fraction of FLOPs (paper style)", _BUDGET, parse=float,
                                  metavar="R", commands=_PRUNE),
    "margin": Setting(0.15, "the search aims this fraction past a speed budget, so the measured result still meets it on a noisy machine",
                      _SEARCH, parse=float, metavar="F", commands=_PRUNE),
    "episodes": Setting(60, "search episodes (each evaluates one plan)", _SEARCH, parse=int, commands=_PRUNE),
    "dense_epochs": Setting(8, "epochs to train the dense model when no weights are given (cached)", _SEARCH, parse=int,
                            commands=_PRUNE),
    "finetune_epochs": Setting(5, "fine-tuning epochs of the pruned model", _TRAIN, parse=int),
    "lr": Setting(0.01, "fine-tuning peak learning rate (cosine schedule)", _TRAIN, parse=float),
    "dense_lr": Setting(0.05, "learning rate for training the dense model", _SEARCH, parse=float, commands=_PRUNE),
    "batch_size": Setting(64, "training batch size (per process)", _TRAIN, parse=int),
    "weight_decay": Setting(5e-4, "SGD weight decay", _TRAIN, parse=float),
    "momentum": Setting(0.9, "SGD momentum", _TRAIN, parse=float),
    "search_batch": Setting(8, "batch size whose latency the search budget applies to", _SEARCH, parse=int, commands=_PRUNE),
    "latency_cache": Setting("user", "measured kernel latencies: 'user' (cache folder, reused by later runs) or 'run' (measure afresh, keep in the run folder)",
                             _SEARCH, parse=None, choices=("user", "run"), commands=_PRUNE),
    "latency_batches": Setting([1, 8], "batch sizes of the latency measurement in the summary", _SEARCH, parse=int,
                               metavar="B", nargs="+", commands=_PRUNE),
    "latency_reps": Setting(30, "timed repeats per latency measurement", _SEARCH, parse=int, commands=_PRUNE),
    "threads": Setting(None, "torch threads (default: torch's choice)", _RUNTIME, parse=int),
    "device": Setting("cpu", "cpu | cuda | cuda:N", _RUNTIME, parse=None),
    "backend": Setting("auto", "kernel backend of the pruned layers: auto | cpu | cuda | triton | torch", _RUNTIME,
                       parse=None, choices=("auto", "cpu", "cuda", "triton", "torch")),
    "runs_dir": Setting("runs", "folder that holds run folders", _OUTPUT, metavar="DIR", commands=_PRUNE),
    "name": Setting(None, "run folder name (default: a timestamp)", _OUTPUT, commands=_PRUNE),
    "progress": Setting(True, "show progress bars", _RUNTIME, parse=None, cli="off_switch", flag="--no-progress",
                        flag_help="no progress bars"),
}
DEFAULTS: Dict[str, Any] = {k: v.default for k, v in SETTINGS.items()}
HELP: Dict[str, str] = {k: v.help for k, v in SETTINGS.items()}


def default_text(key: str) -> Optional[str]:
    """The default of setting ``key`` as ``--help`` shows it (``"0.15"``, ``"1 8"``), None when there is
    none to show (None, an empty mapping, or an off switch)."""
    s = SETTINGS[key]
    v = s.default
    if v is None or v == {} or s.cli == "off_switch":
        return None
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def flag_help(key: str) -> str:
    """The help text of setting ``key``'s flag: its help (or ``flag_help``) and its default, ``[value]``."""
    s = SETTINGS[key]
    text = s.flag_help or s.help
    shown = default_text(key)
    return text if shown is None else f"{text} [{shown}]"


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
        if k not in SETTINGS:
            close = difflib.get_close_matches(k, list(SETTINGS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"config: unknown setting {k!r} in {path!r}{hint}")
    return data


def resolve_config(file_values: Optional[Dict[str, Any]] = None, cli_values: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """defaults < file < CLI (CLI entries that are None mean "not given")."""
    cfg = dict(DEFAULTS)
    cfg.update(file_values or {})
    cfg.update({k: v for k, v in (cli_values or {}).items() if v is not None})
    budgets = [k for k in BUDGET_KEYS if cfg.get(k) is not None]
    if len(budgets) > 1:
        # A flag given on the command line replaces a budget of another kind from the file.
        cli_budgets = [k for k in budgets if (cli_values or {}).get(k) is not None]
        if len(cli_budgets) == 1:
            for k in budgets:
                if k != cli_budgets[0]:
                    cfg[k] = None
        else:
            raise ValueError(f"config: give one speed budget, got {', '.join(budgets)}")
    if not any(cfg.get(k) is not None for k in BUDGET_KEYS):
        cfg["target_speedup"] = 2.0
    return cfg


def save_config(cfg: Dict[str, Any], path: str) -> None:
    """Writes the resolved configuration as YAML with a comment per setting."""
    import json

    lines = ["# AutoSculpt run configuration (resolved: defaults < config file < command line)"]
    for k in SETTINGS:
        if k in cfg:
            lines.append(f"# {HELP[k]}")
            lines.append(f"{k}: {json.dumps(cfg[k])}")  # JSON values are valid YAML flow scalars
    atomic_write_text(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------- validation
# Every setting is checked here, once, before a run writes or allocates anything: the CLI's argument
# converters call ``check_setting`` and runs call ``validate_config`` (which also checks the settings
# from config files). Numbers must be finite; batch sizes have absolute caps, and
# ``check_batches_for_data`` bounds the memory of one batch of the actual data set.

MAX_BATCH = 4096  # search_batch, latency_batches
MAX_TRAIN_BATCH = 65536  # batch_size (per process)
MAX_IMAGE_SIZE = 2048
MAX_COUNT = 1_000_000  # episodes, epochs, repeats
MAX_THREADS = 4096
MAX_BATCH_BYTES = 2 << 30  # one batch of inputs (float32) for the search or a latency measurement

def flag_of(key: str) -> str:
    """The command-line flag of setting ``key``."""
    return SETTINGS[key].flag or "--" + key.replace("_", "-")


class SettingError(ValueError):
    """A setting with a bad value; ``detail`` is "expected ..., got ..." (without the setting's name)."""

    def __init__(self, key: str, detail: str):
        self.key, self.detail = key, detail
        super().__init__(f"{key} ({flag_of(key)}): {detail}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_range(lo: int, hi: Optional[int], what: str):
    def check(key, v):
        if not _is_int(v) or v < lo or (hi is not None and v > hi):
            bound = f" (at most {hi})" if hi is not None else ""
            raise SettingError(key, f"expected {what}{bound}, got {v!r}")
        return v
    return check


def _number(ok: Callable[[float], bool], what: str):
    def check(key, v):
        if not _is_num(v) or not ok(v):
            raise SettingError(key, f"expected {what}, got {v!r}")
        return float(v) if isinstance(v, float) else v
    return check


def _choice(options):
    def check(key, v):
        if v not in options:
            raise SettingError(key, f"expected one of {', '.join(map(repr, options))}, got {v!r}")
        return v
    return check


def _optional(inner):
    def check(key, v):
        return None if v is None else inner(key, v)
    return check


def _string(key, v):
    if not isinstance(v, str) or not v:
        raise SettingError(key, f"expected a non-empty string, got {v!r}")
    return v


def _run_name(key, v):
    """A run folder name: one plain path component (nothing that leaves ``runs_dir``)."""
    if v is None:
        return v
    bad = (not isinstance(v, str) or not v or v in (".", "..") or "/" in v or "\\" in v or "\0" in v
           or os.path.isabs(v) or os.path.basename(v) != v or (os.altsep and os.altsep in v) or ":" in v and os.name == "nt")
    if bad:
        raise SettingError(key, f"expected a plain folder name (one path component, no '/', '..' or absolute path), got {v!r}")
    return v


def _model(key, v):
    if not isinstance(v, str) or not v:
        raise SettingError(key, f"expected a built-in name or 'package.module:factory', got {v!r}")
    if ":" not in v:
        from .models import MODEL_NAMES

        if v not in MODEL_NAMES:
            raise SettingError(key, f"unknown model {v!r}; expected one of {', '.join(MODEL_NAMES)} or 'package.module:factory'")
    else:
        module_name, _, attr = v.partition(":")
        if not module_name or not attr:
            raise SettingError(key, f"expected 'package.module:factory', got {v!r}")
    return v


def _mapping(key, v):
    v = {} if v is None else v
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise SettingError(key, f"expected a mapping of argument names to values, got {v!r}")
    return v


def _data(key, v):
    from .data import parse_data_spec

    try:
        parse_data_spec(v)
    except ValueError as e:
        msg = str(e)
        raise SettingError(key, msg[len("data: "):] if msg.startswith("data: ") else msg) from None
    return v


def _weights(key, v):
    if v is None:
        return v
    if not isinstance(v, str) or not v:
        raise SettingError(key, f"expected a file path, got {v!r}")
    if not os.path.isfile(v):
        raise FileNotFoundError(f"weights: file {v!r} does not exist")
    return v


def _batches(key, v):
    if not isinstance(v, (list, tuple)) or not v or not all(_is_int(b) and 1 <= b <= MAX_BATCH for b in v):
        raise SettingError(key, f"expected a list of positive integers (each at most {MAX_BATCH}), got {v!r}")
    return list(v)


def _bool(key, v):
    if not isinstance(v, bool):
        raise SettingError(key, f"expected true or false, got {v!r}")
    return v


def _device_spec(key, v):
    import torch

    try:
        dev = torch.device(v)
    except (RuntimeError, TypeError, ValueError):
        raise SettingError(key, f"expected 'cpu', 'cuda' or 'cuda:N', got {v!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise SettingError(key, f"expected 'cpu', 'cuda' or 'cuda:N', got {v!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SettingError(key, "CUDA was requested but no CUDA GPU is usable here")
    return v


_CHECKS: Dict[str, Callable[[str, Any], Any]] = {
    "model": _model,
    "model_args": _mapping,
    "weights": _weights,
    "data": _data,
    "image_size": _int_range(1, MAX_IMAGE_SIZE, "a positive integer"),
    "seed": _int_range(-(2 ** 63), 2 ** 63 - 1, "an integer"),
    "target_speedup": _optional(_number(lambda v: v > 1, "a finite number > 1 (e.g. 2.0 for twice as fast)")),
    "target_latency_ms": _optional(_number(lambda v: v > 0, "a finite positive number of milliseconds")),
    "target_flops_ratio": _optional(_number(lambda v: 0 < v < 1, "a fraction in (0, 1) of FLOPs to remove")),
    "margin": _number(lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    "episodes": _optional(_int_range(1, MAX_COUNT, "a positive integer")),
    "dense_epochs": _int_range(1, MAX_COUNT, "a positive integer"),
    "finetune_epochs": _int_range(1, MAX_COUNT, "a positive integer"),
    "lr": _number(lambda v: v > 0, "a finite positive number"),
    "dense_lr": _number(lambda v: v > 0, "a finite positive number"),
    "batch_size": _int_range(1, MAX_TRAIN_BATCH, "a positive integer"),
    "weight_decay": _number(lambda v: v >= 0, "a finite number >= 0"),
    "momentum": _number(lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "search_batch": _int_range(1, MAX_BATCH, "a positive integer"),
    "latency_cache": _choice(SETTINGS["latency_cache"].choices),
    "latency_batches": _batches,
    "latency_reps": _int_range(1, MAX_COUNT, "a positive integer"),
    "threads": _optional(_int_range(1, MAX_THREADS, "a positive integer")),
    "device": _device_spec,
    "backend": _choice(SETTINGS["backend"].choices),
    "runs_dir": _string,
    "name": _run_name,
    "progress": _bool,
}
assert set(_CHECKS) == set(SETTINGS)


def check_setting(key: str, value: Any) -> Any:
    """Checks one setting; returns it (normalised) or raises :class:`SettingError` (a ValueError)."""
    return _CHECKS[key](key, value)


def validate_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Checks every setting of a resolved configuration, before anything is written or allocated.
    Raises ValueError naming the setting, its flag and what was expected; returns ``cfg``."""
    unknown = [k for k in cfg if k not in SETTINGS]
    if unknown:
        raise ValueError(f"config: unknown setting {unknown[0]!r}")
    for key in SETTINGS:
        if key in cfg:
            cfg[key] = check_setting(key, cfg[key])
    budgets = [k for k in BUDGET_KEYS if cfg.get(k) is not None]
    if len(budgets) > 1:
        raise ValueError(f"config: give one speed budget, got {', '.join(budgets)}")
    return cfg


def check_batches_for_data(cfg: Dict[str, Any], input_shape) -> None:
    """Bounds the batches a run builds from the data set (the search batch, the latency batches) by
    their memory, before they are allocated."""
    import math

    per_sample = 4 * math.prod(int(d) for d in input_shape)  # float32
    for key, sizes in (("search_batch", [cfg.get("search_batch") or 1]), ("latency_batches", cfg.get("latency_batches") or [])):
        for b in sizes:
            if b * per_sample > MAX_BATCH_BYTES:
                limit = max(1, MAX_BATCH_BYTES // per_sample)
                raise SettingError(key, f"expected at most {limit} for inputs of shape {tuple(input_shape)} "
                                        f"({MAX_BATCH_BYTES >> 30} GiB per batch), got {b}")


def check_output_file(path: str, what: str) -> str:
    """Checks that ``path`` can be written as a file (not a folder, parent not a file, writable)
    before any work that would write it; raises ValueError naming ``what`` (e.g. "--out")."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"{what}: expected a file path, got {path!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{what}: {path!r} is a folder; expected a file path (e.g. {os.path.join(path, 'model.pt')!r})")
    parent = os.path.dirname(os.path.abspath(path))
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{what}: cannot write {path!r}: {probe!r} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: cannot write {path!r}: folder {probe!r} is not writable")
    return path
