"""Model specs for the CLI, and dense models trained on first use and cached.

``resolve_model(spec, num_classes, input_shape, model_args)`` turns ``"resnet20"`` or
``"package.module:factory"`` into a zero-argument factory. ``dense_model(...)`` returns trained dense
weights: from a file the user gives, or trained once with :func:`autosculpt.finetune.finetune` and
cached in the user cache folder (``$AUTOSCULPT_CACHE``, ``$XDG_CACHE_HOME/autosculpt`` or
``~/.cache/autosculpt``), keyed by model, model arguments, data, seed, training settings and the
library version. The cache file is an :func:`autosculpt.save` file (safe to load).
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import sys
from typing import Callable, Optional, Tuple

import torch
from torch import nn

__all__ = ["resolve_model", "import_factory", "dense_model", "load_dense_weights", "dense_cache_path"]


def _accepted(fn: Callable, candidates: dict) -> dict:
    """The subset of ``candidates`` that ``fn`` accepts by name (none if it only takes **kwargs,
    where passing unknown names could break it)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in candidates.items() if k in params and params[k].kind != inspect.Parameter.VAR_KEYWORD}


def import_factory(spec: str) -> Callable[..., nn.Module]:
    """Imports the model factory named by ``'package.module:factory'`` and checks that it can be one:
    a Python function (or an nn.Module class); anything else is refused before it is called. (What it
    returns is checked when it is called.) The current folder is importable, as with ``python -m``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or not attr.isidentifier() or not all(p.isidentifier() for p in module_name.split(".")):
        raise ValueError(f"model: expected 'package.module:factory', got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model: cannot import {module_name!r} ({e})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"model: {module_name!r} has no callable {attr!r}")
    # Only a Python function (or an nn.Module class) counts as a model factory: built-in functions
    # (os.system, eval, ...) and other classes never build a model, and are refused before any call.
    is_module_class = inspect.isclass(factory) and issubclass(factory, nn.Module)
    if not is_module_class and not (inspect.isfunction(factory) or inspect.ismethod(factory)):
        raise ValueError(f"model: {spec!r} is a {type(factory).__name__}, not a model factory; expected a Python "
                         "function that returns an nn.Module, or an nn.Module class")
    return factory


def resolve_model(spec: str, num_classes: int, input_shape: Tuple[int, ...], model_args: Optional[dict] = None
                  ) -> Tuple[Callable[[], nn.Module], dict]:
    """A factory for the model named by ``spec`` and the metadata saved with it.

    Built-in names get ``num_classes`` and ``in_chans`` (and ``image_size`` where they take one) from
    the data set (model_args override);
    ``package.module:factory`` is imported and called with ``model_args`` (plus ``num_classes`` /
    ``in_chans`` if its signature names them). The current folder is importable, as with ``python -m``.
    """
    from . import MODEL_NAMES, get_model

    model_args = dict(model_args or {})
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model: expected a built-in name ({', '.join(MODEL_NAMES)}) or 'package.module:factory', got {spec!r}")
    auto = {"num_classes": num_classes, "in_chans": input_shape[0]}
    if ":" not in spec:
        if spec not in MODEL_NAMES:
            raise ValueError(f"model: unknown model {spec!r}; expected one of {', '.join(MODEL_NAMES)} or 'package.module:factory'")
        from . import _REGISTRY

        # a model built for a resolution (ViT: its patch grid) gets the data's image size
        sized = _accepted(_REGISTRY[spec], {"image_size": int(input_shape[-1])}) if len(input_shape) == 3 else {}
        kwargs = {**auto, **sized, **model_args}
        return (lambda: get_model(spec, **kwargs)), {"model": spec, "model_args": kwargs}
    factory = import_factory(spec)
    kwargs = {**_accepted(factory, auto), **model_args}

    def build() -> nn.Module:
        m = factory(**kwargs)
        if not isinstance(m, nn.Module):
            raise TypeError(f"model: {spec} returned {type(m).__name__}, expected an nn.Module")
        return m

    return build, {"model": spec, "model_args": kwargs}


def load_dense_weights(model: nn.Module, path: str) -> nn.Module:
    """Loads dense weights from a plain ``state_dict`` file, a ``{"state_dict"|"model": ...}``
    checkpoint, or an :func:`autosculpt.save` file of a dense model (always ``weights_only``)."""
    from ..io import FORMAT, read

    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights: file {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unsafe or corrupt: both unusable
        raise ValueError(f"weights: cannot read {path!r} safely ({type(e).__name__}); expected a state_dict of tensors") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        saved = read(path)
        if saved.plan is not None:
            raise ValueError(f"weights: {path!r} holds a pruned model; give dense weights")
        state = saved.state_dict
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        state = obj["model"]
    else:
        state = obj
    if not isinstance(state, dict):
        raise ValueError(f"weights: {path!r} does not hold a state_dict")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}  # DDP prefixes
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ValueError(f"weights: {path!r} does not match the model: {' '.join(s.strip() for s in first[:3])[:300]}") from None
    return model


def dense_cache_path(meta: dict, data_spec: str, seed: int, train_settings: dict, architecture: str = "") -> str:
    """Cache file of a trained dense model (the key covers everything that changes the weights,
    including ``architecture``: a fingerprint of the model's parameter names and shapes)."""
    from .._version import __version__
    from ..config import cache_dir

    kind, _, path = data_spec.partition(":")
    key = json.dumps({"model": meta, "data": kind, "data_path": os.path.abspath(path) if path else "", "seed": seed,
                      "train": train_settings, "version": __version__, "architecture": architecture},
                     sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    name = meta["model"].replace(":", "_").replace("/", "_").replace(".", "_")
    return os.path.join(cache_dir(), "models", f"{name}-{kind}-seed{seed}-v{__version__}-{digest}.pt")


def dense_model(factory: Callable[[], nn.Module], meta: dict, splits, seed: int, *, epochs: int = 30, lr: float = 0.05,
                batch_size: int = 64, weights: Optional[str] = None, device="cpu", progress: bool = True,
                log: Callable[[str], None] = print) -> Tuple[nn.Module, str]:
    """The trained dense model and where its weights came from (a path).

    With ``weights`` the file is loaded; otherwise the cached model is used, or the model is trained
    (best epoch on validation) and cached atomically.
    """
    from ..finetune import finetune, is_main_process
    from ..io import read, save

    model = factory().to(device)
    if weights:
        return load_dense_weights(model, weights), os.path.abspath(weights)
    settings = {"epochs": epochs, "lr": lr, "batch_size": batch_size}
    arch = hashlib.sha256(repr([(k, tuple(v.shape)) for k, v in model.state_dict().items()]).encode()).hexdigest()[:16]
    path = dense_cache_path(meta, splits.spec, seed, settings, arch)
    if os.path.exists(path):
        try:
            model.load_state_dict(read(path).state_dict)
            log(f"dense model: cached {path}")
            return model, path
        except (ValueError, RuntimeError) as e:
            log(f"dense model: ignoring unusable cache file {path} ({e}); training again")
    log(f"dense model: training {meta['model']} on {splits.spec} for {epochs} epochs (first use; cached afterwards)")
    torch.manual_seed(seed)
    model = factory().to(device)
    res = finetune(model, splits.train, splits.val, None, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                   progress=progress, desc="dense training")
    if is_main_process():  # (under torchrun every rank trained the same weights; one writes them)
        save(model, path, meta={**meta, "data": splits.spec, "seed": seed, "val_acc": res.best_val_acc, "train": settings})
    log(f"dense model: val acc {res.best_val_acc:.4f}, cached in {path}")
    return model, path
