"""Finds AutoSculpt's Triton kernels, installed or in a source checkout, without importing triton early.

Installed, the top-level ``triton_kernels/`` directory is the package ``autosculpt.triton_kernels``
(setup.py ``package_dir``). In a source checkout used through ``PYTHONPATH=<repo>`` that package does
not exist under ``autosculpt/``, so :func:`kernels` loads ``<repo>/triton_kernels`` under the same
name. Only :func:`kernels` imports triton (through the kernel module it loads).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACKAGE = "autosculpt.triton_kernels"


def _package() -> ModuleType:
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    try:
        return importlib.import_module(PACKAGE)
    except ModuleNotFoundError as exc:
        if exc.name != PACKAGE:
            raise
    source_dir = Path(__file__).resolve().parent.parent / "triton_kernels"
    init = source_dir / "__init__.py"
    if not init.is_file():
        raise ImportError(
            f"{PACKAGE} is not installed and no source checkout was found at {source_dir}; "
            "reinstall autosculpt (pip install .)"
        )
    spec = importlib.util.spec_from_file_location(PACKAGE, init, submodule_search_locations=[str(source_dir)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACKAGE]
        raise
    import autosculpt

    autosculpt.triton_kernels = module  # same attribute an installed subpackage would get
    return module


def kernels(name: str) -> ModuleType:
    """The Triton kernel module ``autosculpt.triton_kernels.<name>`` (imports triton).

    Raises ImportError with an install hint when triton is missing.
    """
    if importlib.util.find_spec("triton") is None:
        raise ImportError("the Triton kernels need the triton package (pip install triton)")
    _package()
    return importlib.import_module(f"{PACKAGE}.{name}")
