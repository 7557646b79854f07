"""Loads the compiled kernels (``autosculpt._C``) once, and remembers why if it could not.

torch is imported first on purpose: torch ships its own ``libgomp.so.1`` and loading it before our
module makes the extension share torch's OpenMP runtime instead of starting a second one.
"""
from __future__ import annotations

import importlib
from typing import Any, Optional

import torch  # noqa: F401  (see module docstring)

_module: Optional[Any] = None
_error: Optional[str] = None
_tried = False


def extension() -> Optional[Any]:
    """The compiled module, or None when it is not built (see :func:`load_error`)."""
    global _module, _error, _tried
    if not _tried:
        _tried = True
        try:
            _module = importlib.import_module("autosculpt._C")
        except ImportError as exc:  # not built, or built for another Python
            _error = f"{type(exc).__name__}: {exc}"
    return _module


def load_error() -> Optional[str]:
    """Why the compiled module could not be imported, or None."""
    extension()
    return _error


def require() -> Any:
    """The compiled module; raises RuntimeError with the import error when it is missing."""
    mod = extension()
    if mod is None:
        raise RuntimeError(
            "autosculpt's compiled extension is not available "
            f"({_error}). Reinstall with `pip install .` (needs a C++17 compiler and OpenMP)."
        )
    return mod


_signature: Optional[str] = None


def build_signature() -> str:
    """A short hash of the compiled extension's file ("none" when it is not built): measured kernel
    timings cached on disk are only valid for the build that produced them."""
    global _signature
    if _signature is None:
        mod = extension()
        path = getattr(mod, "__file__", None) if mod is not None else None
        if not path:
            _signature = "none"
        else:
            import hashlib

            with open(path, "rb") as f:
                _signature = hashlib.sha1(f.read()).hexdigest()[:12]
    return _signature
