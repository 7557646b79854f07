"""Exporting pruned models for deployment.

- ``deployed.pt2``: a ``torch.export`` program of the model's deployed form
  (:func:`autosculpt.fuse_for_inference`: BatchNorm folded, epilogues fused, fast max-pool) with a
  dynamic batch dimension. Its pattern layers are the ``autosculpt::pattern_conv2d`` custom op, so it
  runs AutoSculpt's kernels (``import autosculpt`` then ``torch.export.load``).
  :func:`autosculpt.load_deployed` runs it at graph-executor speed (the program translated back into
  AutoSculpt's modules and run as one C++ call, :mod:`autosculpt.program`); ``export_model`` checks
  that route against the eager model too and says in ``notes`` whether it covers the program.
- ``deployed_aoti.pt2`` (``aoti=True``): the same program compiled ahead of time by AOTInductor, a
  package that runs without the Python model class: ``torch._inductor.aoti_load_package(path)`` after
  ``import autosculpt`` (which registers the op its kernels are called through).
- ``pruned.pt2``: the pruned model as it is (trainable layers, no fusion), also dynamic in the batch.
- ``dense_equivalent.pt2`` and ``dense_equivalent.onnx``: the same function with every pattern layer
  turned back into a standard layer whose dropped weights are zeros — for engines that know nothing
  of AutoSculpt (they compute the zeros, so they are not faster, but the numbers match).

The ONNX file needs the ``onnx`` and ``onnxscript`` packages (``pip install autosculpt[export]``);
without them ``export`` says so and still writes the ``.pt2`` files. Every program is checked against
the eager model, at the example's batch and at another batch size, before it is kept.
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Tuple

import torch
from torch import nn

from .plan import set_submodule

__all__ = ["ExportPaths", "dense_equivalent", "export_model", "onnx_available"]


class ExportPaths(dict):
    """``{kind: path}`` of the files :func:`export_model` wrote; ``notes`` (a list of str) says what
    else it found; ``executor_ok`` is True when ``autosculpt.load_deployed`` runs ``deployed.pt2``
    through the graph executor with the model's outputs (checked at two batch sizes)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.notes = []
        self.executor_ok = False


def dense_equivalent(model: nn.Module) -> nn.Module:
    """A copy of ``model`` where every module with ``to_dense()`` (pattern layers) is replaced by the
    standard layer it returns (same outputs; dropped weights stored as zeros). A channel-pruned model
    (a version-2 plan) keeps its smaller architecture: channel removal is physical, so its dense
    equivalent is the channel-pruned model, pattern-free."""
    out = copy.deepcopy(model)
    replace = [(n, m) for n, m in out.named_modules() if n and callable(getattr(m, "to_dense", None))]
    for name, m in replace:
        set_submodule(out, name, m.to_dense())
    return out


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def export_model(model: nn.Module, example_input: torch.Tensor, out_dir: str, *, onnx: bool = True,
                 opset: int = 18, aoti: bool = False, max_batch: int = 4096) -> "ExportPaths":
    """Writes ``deployed.pt2``, ``pruned.pt2``, ``dense_equivalent.pt2``, (if ``aoti``)
    ``deployed_aoti.pt2`` and (if ``onnx``) ``dense_equivalent.onnx``; batch sizes 1..``max_batch``.

    Each program is checked against the eager model on ``example_input`` (and on a batch of another
    size) before it is kept, and so is the graph-executor route of ``deployed.pt2``
    (:func:`autosculpt.load_deployed`; its outcome in the result's ``notes``, never an error). Returns
    {kind: path} (an :class:`ExportPaths`). Raises RuntimeError with a clear message if ONNX
    export is impossible here.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input: expected a tensor, got {type(example_input).__name__}")
    os.makedirs(out_dir, exist_ok=True)
    model = model.eval()
    from .deploy import fold_empty_filters_exactly
    from .fuse import fuse_for_inference

    dense = dense_equivalent(model).eval()
    # (empty filters removed as channels where exact, as in every deployed form; checked below)
    deployed = fuse_for_inference(fold_empty_filters_exactly(model, example_input), example_input)
    other = torch.randn(example_input.shape[0] % max_batch + 1, *example_input.shape[1:],
                        dtype=example_input.dtype, device=example_input.device)
    paths = ExportPaths()
    with torch.no_grad(), warnings.catch_warnings():
        # torch.export's own pytree deprecation notices say nothing about the user's model.
        warnings.filterwarnings("ignore", category=FutureWarning)
        want = {id(example_input): model(example_input), id(other): model(other)}
        for kind, m in (("deployed", deployed), ("pruned", model), ("dense_equivalent", dense)):
            ep = _export_dynamic_batch(m, example_input, max_batch)
            _check_program(kind, ep.module(), (example_input, other), want)
            path = os.path.join(out_dir, f"{kind}.pt2")
            torch.export.save(ep, path)
            paths[f"{kind}_pt2"] = path
            if kind == "deployed":
                paths.executor_ok, note = _check_executor(ep, (example_input, other), want)
                paths.notes.append(note)
            if kind == "deployed" and aoti:
                path = os.path.join(out_dir, "deployed_aoti.pt2")
                torch._inductor.aoti_compile_and_package(ep, package_path=path)
                _check_program("deployed_aoti", torch._inductor.aoti_load_package(path), (example_input, other), want)
                paths["deployed_aoti_pt2"] = path
    if onnx:
        if not onnx_available():
            raise RuntimeError("export: ONNX export needs the 'onnx' and 'onnxscript' packages "
                               "(pip install 'autosculpt[export]'); the .pt2 files were written to " + out_dir)
        import logging

        # The exporter logs one warning per torchvision op it cannot find; irrelevant here.
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        path = os.path.join(out_dir, "dense_equivalent.onnx")
        arg = _forward_arg(dense)  # the batch dimension of the ONNX input stays dynamic
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            prog = torch.onnx.export(dense, (example_input,), dynamo=True, opset_version=opset,
                                     input_names=["input"], output_names=["logits"],
                                     dynamic_shapes={arg: {0: torch.export.Dim("batch", min=1, max=4096)}}
                                     if arg else None, verbose=False)
        prog.save(path)
        import onnx as _onnx

        _onnx.checker.check_model(path)
        paths["dense_equivalent_onnx"] = path
    return paths


def _export_dynamic_batch(model: nn.Module, example_input: torch.Tensor, max_batch: int):
    """``torch.export`` with the batch dimension dynamic (1..max_batch); static when the model's
    code specialises on the batch size."""
    arg = _forward_arg(model)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    try:
        return torch.export.export(model, (example_input,), dynamic_shapes={arg: {0: batch}} if arg else None)
    except Exception:  # noqa: BLE001 - e.g. a reshape that bakes in the batch: export it static
        return torch.export.export(model, (example_input,))


def _check_executor(ep, inputs, want) -> Tuple[bool, str]:
    """(whether it equals the model, a note) on the graph-executor route of the deployed program (:func:`autosculpt.load_deployed`):
    equal to the model on ``inputs``, not covered (the reason), or (with a warning) different."""
    from .executor import UnsupportedGraph
    from .program import executor_from_program

    x = inputs[0]
    if x.ndim != 4 or x.dtype != torch.float32 or not x.is_cpu:
        return False, "load_deployed: the graph executor runs float32 CPU (N, C, H, W) inputs only; not checked"
    try:
        run = executor_from_program(ep, x)
        for xb in inputs:
            got, ref = run(xb), want[id(xb)]
            if got.shape != ref.shape or not torch.allclose(got, ref, rtol=1e-4, atol=1e-4):
                diff = float((got - ref).abs().max()) if got.shape == ref.shape else float("nan")
                msg = (f"load_deployed: the graph executor built from deployed.pt2 differs from the model "
                       f"(max abs diff {diff:.3g}, batch {xb.shape[0]}); run the program with torch.export.load")
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
                return False, msg
    except UnsupportedGraph as exc:
        return False, f"load_deployed: not covered by the graph executor ({exc}); torch.export.load runs it"
    except Exception as exc:  # noqa: BLE001 - the .pt2 is written and checked: this route is only reported
        return False, (f"load_deployed: the graph executor could not be built ({type(exc).__name__}: {exc}); "
                "torch.export.load runs it")
    sizes = " and ".join(str(int(xb.shape[0])) for xb in inputs)
    return True, f"load_deployed: the graph executor built from deployed.pt2 equals the model (batch {sizes})"


def _check_program(kind: str, program, inputs, want) -> None:
    for x in inputs:
        try:
            got = program(x)
        except Exception as exc:  # noqa: BLE001 - a static program rejects the other batch size
            if x is inputs[0]:
                raise
            warnings.warn(f"export: the {kind} program has a static batch size ({type(exc).__name__})")
            continue
        ref = want[id(x)]
        if not torch.allclose(got, ref, rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"export: the exported {kind} program differs from the model "
                               f"(max abs diff {float((got - ref).abs().max()):.3g}, batch {x.shape[0]})")


def _forward_arg(model: nn.Module) -> str:
    import inspect

    params = [p for p in inspect.signature(model.forward).parameters.values()]
    return params[0].name if params else ""
