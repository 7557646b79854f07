"""Saving and loading pruned models: plan (JSON) + ``state_dict`` + versions, in one file.

A model file is a ``torch.save`` archive of plain data only — strings, numbers and tensors — read
back with ``torch.load(weights_only=True)``. The plan travels as JSON text and is validated before
use, so loading a file from a stranger cannot execute code: no pickled classes or functions are
ever reconstructed, and a model spec stored in the file is honoured only if it names a built-in
model (a user factory must be passed by the caller).

The model is rebuilt as ``sparsify(model_factory(), plan)`` and the weights are loaded strictly. A
channel-pruned model (a version-2 plan, :mod:`autosculpt.plan`) is rebuilt the same way: the dense
model is built, its channel groups are found from its fx graph (traced on ``example_input``, by
default zeros of the shape the channel plan records) and shrunk to the plan's kept channels, then the
pattern layers are applied; the smaller architecture comes from the dense model's code and the plan's
data, never from code or pickled modules in the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
from torch import nn

from ._atomic import atomic_torch_save
from ._version import __version__
from .plan import channel_plan_of, make_plan, plan_channels, sparsify, validate_plan

__all__ = ["save", "load", "read", "SavedModel", "plan_from_model", "FORMAT", "FORMAT_VERSION", "atomic_torch_save"]

FORMAT = "autosculpt-model"
#: the newest file format this release reads and writes: 2 holds a version-2 plan (channel removal), which
#: releases that read format 1 only cannot rebuild; files with a version-1 plan are still written as format 1
FORMAT_VERSION = 2


@dataclass
class SavedModel:
    """The contents of a model file: ``plan`` (None for a dense model), ``state_dict``, ``meta``
    (free-form JSON data, e.g. the model name and accuracy) and the writer's ``versions``."""

    plan: Optional[dict]
    state_dict: dict
    meta: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    extra_state: dict = field(default_factory=dict)


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (the checksum stored per tensor in model files)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def plan_from_model(model: nn.Module) -> dict:
    """Reconstructs a plan from a sparsified model: every pattern layer (``PatternConv2d``,
    ``PatternLinear``, ``PatternAttention``: any submodule with a ``layer_plan()``) contributes the layer
    plan that rebuilds it from its dense module, so ``sparsify`` with the returned plan reproduces it
    (for a conv: its distinct tap masks as the pattern set, the exact masks). A model whose channels
    were removed by a :class:`~autosculpt.plan.ChannelPlan` (:func:`autosculpt.plan.channel_plan_of`)
    gives a version-2 plan with that channel plan; otherwise the plan is version 1.
    """
    layers = {}
    for name, m in model.named_modules():
        layer_plan = getattr(m, "layer_plan", None)
        if m is model or not callable(layer_plan):
            continue
        try:
            layers[name] = layer_plan()
        except ValueError as e:
            raise ValueError(f"plan: cannot reconstruct the plan of {name!r} ({type(m).__name__}: {e}); "
                             "pass plan= to save()") from None
    try:
        channels = channel_plan_of(model)
    except ValueError as e:
        raise ValueError(f"plan: {e}; pass plan= to save()") from None
    return make_plan(layers, channels)


def save(model: nn.Module, path: str, plan: Optional[dict] = None, *, meta: Optional[dict] = None) -> str:
    """Writes ``model`` to ``path``: its plan, ``state_dict`` (on CPU) and the library versions.

    Args:
        model: a dense or sparsified model (the unwrapped module, not DDP).
        path: the file to write (atomically).
        plan: the plan the model was sparsified with (version 2 for a channel-pruned model: its layers
            named as in the channel-pruned model); if None it is reconstructed from the model's pattern
            layers and recorded channel plan (:func:`plan_from_model`; None for a dense model).
        meta: extra JSON-able data stored beside it (e.g. ``{"model": "resnet20", "model_args": {...}}``).
    Returns the path.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    if plan is None:
        plan = plan_from_model(model)
        if not plan["layers"] and plan_channels(plan) is None:
            plan = None
    if plan is not None:
        validate_plan(plan)
    try:
        plan_json = json.dumps(plan)
        meta_json = json.dumps(meta or {})
    except TypeError as e:
        raise TypeError(f"plan/meta: must be JSON-serialisable ({e})") from None
    state, extra = {}, {}
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            state[k] = v.detach().cpu().clone()
            continue
        # Module extra state (e.g. PatternAttention's head patterns) travels as JSON, never pickled.
        try:
            extra[k] = json.loads(json.dumps(v))
        except (TypeError, ValueError):
            raise TypeError(f"state_dict entry {k!r} is a {type(v).__name__} that is not JSON data; "
                            "only tensors and JSON-able extra state can be saved safely") from None
    plan_version = 1 if plan is None else plan["version"]
    payload = {
        "format": FORMAT,
        # format 1 when the plan is version 1: such files stay readable by releases before plans v2
        "format_version": 1 if plan_version < 2 else FORMAT_VERSION,
        "versions": {"autosculpt": str(__version__), "torch": str(torch.__version__), "plan": plan_version},
        "plan_json": plan_json,
        "meta_json": meta_json,
        "state_dict": state,
        "extra_state_json": json.dumps(extra),
        # verified by read(): a bit flip in the file is an error, not silently different weights
        "checksums_json": json.dumps({"algorithm": "sha256", "tensors": {k: tensor_sha256(v) for k, v in state.items()}}),
    }
    atomic_torch_save(payload, path)
    return os.fspath(path)


def read(path: str, map_location="cpu") -> SavedModel:
    """Reads and validates a model file without building a model (never unpickles objects)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {path!r} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln or "WeightsUnpickler" in ln]
        first = lines[0] if lines else type(e).__name__
        raise ValueError(f"{path!r} is not a safe AutoSculpt model file (it holds objects other than tensors and plain data: {first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path!r} is corrupt or not a model file ({first})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not an AutoSculpt model file (no '{FORMAT}' header)")
    fv = payload.get("format_version")
    if not isinstance(fv, int) or fv > FORMAT_VERSION:
        raise ValueError(f"{path!r} has file format {fv!r}; this autosculpt {__version__} reads format <= {FORMAT_VERSION} (upgrade autosculpt)")
    try:
        plan = json.loads(payload["plan_json"])
        meta = json.loads(payload.get("meta_json") or "{}")
        extra = json.loads(payload.get("extra_state_json") or "{}")
        state = payload["state_dict"]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path!r} is corrupt: {type(e).__name__}: {e}") from None
    if plan is not None:
        try:
            validate_plan(plan)
        except ValueError as e:
            raise ValueError(f"{path!r} holds an invalid plan: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{path!r} is corrupt: state_dict must map names to tensors")
    if not isinstance(extra, dict):
        raise ValueError(f"{path!r} is corrupt: extra state must be a JSON object")
    _verify_checksums(payload, state, path)
    return SavedModel(plan, state, meta if isinstance(meta, dict) else {}, payload.get("versions") or {}, extra)


def _verify_checksums(payload: dict, state: dict, path: str) -> None:
    """Checks the per-tensor SHA-256 sums written by :func:`save` (files written before there were
    checksums have none, and load unchecked)."""
    text = payload.get("checksums_json")
    if text is None:
        return
    try:
        sums = json.loads(text)
        algorithm, tensors = sums["algorithm"], sums["tensors"]
    except (TypeError, KeyError, json.JSONDecodeError):
        raise ValueError(f"{path!r} is corrupt: its checksum record is unreadable") from None
    if algorithm != "sha256" or not isinstance(tensors, dict):
        raise ValueError(f"{path!r} is corrupt: unknown checksum record {algorithm!r}")
    if set(tensors) != set(state):
        diff = sorted(set(tensors) ^ set(state))
        raise ValueError(f"{path!r} is corrupt: its tensors and checksums disagree (e.g. {diff[0]!r})")
    for k, v in state.items():
        if tensor_sha256(v) != tensors[k]:
            raise ValueError(f"{path!r} is corrupt: checksum mismatch for tensor {k!r} (the file was changed or "
                             "damaged after it was written)")


# A model the file's metadata asks for may be at most this much larger than the file's tensors (pruned
# layers can hold fewer elements than the dense ones they replace, e.g. attention without some heads).
_SIZE_SLACK_FACTOR, _SIZE_SLACK_ELEMENTS = 4, 1 << 20


def _check_sizes_before_building(build: Callable[[], nn.Module], saved: SavedModel, path: str,
                                  example_input=None) -> None:
    """Builds the model on the ``meta`` device (no memory is allocated) and compares its size with the
    file's tensors, so a small file whose metadata asks for a huge model is refused before anything
    is allocated. A plan's channel removal is applied to the ghost too (on the meta device) when it
    can be, so a heavily channel-pruned model is compared at its own size; where it cannot, the dense
    ghost is compared. The exact shapes are compared by the strict load after building. Factories that
    cannot build on the meta device are not checked here."""
    import math

    try:
        with torch.device("meta"):
            ghost = build()
        sizes = {k: math.prod(v.shape) for k, v in ghost.state_dict().items() if isinstance(v, torch.Tensor)}
    except Exception:  # noqa: BLE001 - the factory does not support the meta device
        return
    channels = plan_channels(saved.plan) if saved.plan is not None else None
    if channels is not None:
        try:
            x = None if not isinstance(example_input, torch.Tensor) else example_input.to("meta")
            small = channels.apply(ghost, x)
            sizes = {k: math.prod(v.shape) for k, v in small.state_dict().items() if isinstance(v, torch.Tensor)}
        except Exception:  # noqa: BLE001 - e.g. an op without a meta kernel: the dense ghost bounds it
            pass
    wanted = sum(sizes.values())
    held = sum(v.numel() for v in saved.state_dict.values())
    if wanted > _SIZE_SLACK_FACTOR * held + _SIZE_SLACK_ELEMENTS:
        biggest = max(sizes, key=sizes.get)
        raise ValueError(f"{path!r} does not match the model it describes: the model would hold {wanted:,} "
                         f"elements (e.g. {biggest} {sizes[biggest]:,}) but the file's tensors hold {held:,}; "
                         "refused before building it")


def _factory_from_meta(meta: dict, path: str) -> Callable[[], nn.Module]:
    from .models import MODEL_NAMES, get_model

    name = meta.get("model")
    if name not in MODEL_NAMES:
        raise ValueError(
            f"model_factory: {path!r} was saved from model {name!r}, which is not built in; pass the "
            "function that builds it (files never name code to import, for safety)"
        )
    kwargs = meta.get("model_args") or {}
    return lambda: get_model(name, **kwargs)


def load(path: str, model_factory: Union[Callable[[], nn.Module], nn.Module, str, None] = None, *,
         map_location="cpu", backend: str = "auto", example_input=None) -> nn.Module:
    """Rebuilds a saved model: ``sparsify(model_factory(), plan)`` then the saved weights, strictly.

    Args:
        path: a file written by :func:`save`.
        model_factory: a callable returning the *dense* model (same architecture), or such a model
            instance (deep-copied), or a built-in model name; None uses the built-in model named in
            the file's metadata.
        map_location: where tensors are loaded.
        backend: kernel backend of the sparse layers.
        example_input: for a plan that removes channels, the input the dense model is traced on to find
            its channel groups (default: zeros of the shape the channel plan records; pass one for a
            model whose input is not a float tensor). Unused otherwise.
    Raises ValueError (naming the file) if the file is corrupt or does not match the model.
    """
    import copy

    path = os.fspath(path)
    saved = read(path, map_location=map_location)
    if model_factory is None:
        model_factory = _factory_from_meta(saved.meta, path)
    if isinstance(model_factory, str):
        from .models import get_model

        name, kwargs = model_factory, saved.meta.get("model_args") or {}
        _check_sizes_before_building(lambda: get_model(name, **kwargs), saved, path, example_input)
        model = get_model(name, **kwargs)
    elif isinstance(model_factory, nn.Module):
        model = copy.deepcopy(model_factory)
    elif callable(model_factory):
        _check_sizes_before_building(model_factory, saved, path, example_input)
        model = model_factory()
    else:
        raise TypeError(f"model_factory: expected a callable, an nn.Module or a model name, got {type(model_factory).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_factory: returned {type(model).__name__}, expected an nn.Module")
    if saved.plan is not None:
        # channel removal builds a new (smaller) model; the rest is applied in place
        inplace = plan_channels(saved.plan) is None
        try:
            model = sparsify(model, saved.plan, inplace=inplace, backend=backend, example_input=example_input)
        except (KeyError, ValueError, TypeError) as e:
            msg = e.args[0] if e.args else str(e)
            raise ValueError(f"{path!r} does not match the model: {msg}") from None
    expected_masks = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("tap_mask")}
    _load_state_strict(model, {**saved.state_dict, **saved.extra_state}, path)
    for k, m in expected_masks.items():
        if not torch.equal(model.state_dict()[k].cpu(), m.cpu()):
            raise ValueError(f"{path!r} is inconsistent: {k} in its weights disagrees with its plan")
    return model


def _load_state_strict(model: nn.Module, state: dict, path: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in state and isinstance(own[k], torch.Tensor) and isinstance(state[k], torch.Tensor)
              and tuple(own[k].shape) != tuple(state[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} entries (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected entries (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:2])})")
    if problems:
        raise ValueError(f"{path!r} does not match the model: " + "; ".join(problems))
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as e:  # e.g. extra state that disagrees with the plan
        raise ValueError(f"{path!r} does not match the model: {' '.join(str(e).split())[:300]}") from None
