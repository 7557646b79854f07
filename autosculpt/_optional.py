"""Optional dependencies: which extra provides which package, and one clear error when it is missing.

The core install (kernels, ops, nn modules, plans, save/load, fuse) needs torch and numpy only.
Everything else comes from an extra (``pip install 'autosculpt[search]'`` ...); code that needs such a
package imports it through :func:`require` (locally, inside the function), so the error names the
extra instead of being a bare ``ModuleNotFoundError``.
"""
from __future__ import annotations

import importlib
from typing import Iterable, Optional

__all__ = ["EXTRA_OF", "MissingExtraError", "require", "ensure", "extra_message", "from_error", "tqdm"]

# top-level import name -> the extra that installs it
EXTRA_OF = {
    "torch_geometric": "search",
    "sklearn": "search",
    "tqdm": "search",
    "yaml": "search",
    "scipy": "search",
    "matplotlib": "report",
    "onnx": "export",
    "onnxscript": "export",
    "torch_pruning": "bench",
    "openvino": "bench",
    "onnxruntime": "bench",
    "triton": "triton",
}


class MissingExtraError(ImportError):
    """An optional package is missing; the message names the extra that installs it."""


def extra_message(what: str, extras: Iterable[str], missing: Iterable[str] = ()) -> str:
    """``"<what> needs the 'search' extra: pip install 'autosculpt[search]'"`` (several extras joined)."""
    extras = sorted(set(extras), key=list(dict.fromkeys(EXTRA_OF.values())).index)
    names = " and ".join(f"'{e}'" for e in extras)
    missing = sorted(set(missing))
    tail = f" (missing: {', '.join(missing)})" if missing else ""
    return (f"{what} needs the {names} extra{'s' if len(extras) > 1 else ''}: "
            f"pip install 'autosculpt[{','.join(extras)}]'{tail}")


def _missing_top(err: ImportError) -> Optional[str]:
    name = getattr(err, "name", None)
    return name.partition(".")[0] if name else None


def require(module: str, extra: Optional[str] = None, what: Optional[str] = None):
    """Imports and returns ``module``; raises :class:`MissingExtraError` naming ``extra`` if it is missing.

    ``extra`` defaults to the one listed in :data:`EXTRA_OF`; ``what`` names the feature in the message.
    """
    top = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if _missing_top(e) != top:  # the package is there but itself lacks something: not ours to rename
            raise
        extra = extra or EXTRA_OF.get(top, "all")
        raise MissingExtraError(extra_message(what or f"autosculpt ({module})", [extra], [top]), name=top) from None


def ensure(what: str, *modules: str) -> None:
    """Checks up front that all ``modules`` are importable (no import); one error naming every missing extra."""
    import importlib.util

    missing = []
    for m in modules:
        try:
            found = importlib.util.find_spec(m) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(m.partition(".")[0])
    if missing:
        raise MissingExtraError(extra_message(what, [EXTRA_OF.get(m, "all") for m in missing], missing),
                                name=missing[0])


def from_error(err: ImportError, what: str) -> Optional[str]:
    """The extra message for an ImportError of an optional package (None for any other ImportError)."""
    if isinstance(err, MissingExtraError):
        return str(err)
    top = _missing_top(err)
    if isinstance(err, ModuleNotFoundError) and top in EXTRA_OF:
        return extra_message(what, [EXTRA_OF[top]], [top])
    return None


class _NoBar:
    """Stands in for a tqdm bar when tqdm is not installed: iterates, counts nothing, prints nothing."""

    def __init__(self, iterable=None, *args, **kwargs):
        self._it = iterable

    def __iter__(self):
        return iter(self._it if self._it is not None else ())

    def __len__(self):
        return len(self._it)

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def set_description(self, *args, **kwargs):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def tqdm(*args, **kwargs):
    """``tqdm.auto.tqdm(...)`` when tqdm is installed, else a silent stand-in (progress bars are optional)."""
    try:
        from tqdm.auto import tqdm as _tqdm
    except ModuleNotFoundError as e:
        if _missing_top(e) != "tqdm":
            raise
        return _NoBar(*args, **kwargs)
    return _tqdm(*args, **kwargs)
