"""The latency model's disk cache: measured milliseconds by key, in one JSON file shared by runs.

``{"format": 1, "entries": {key: ms}}``, written atomically (temp file + ``os.replace``). A corrupt
file is reported with a warning and rebuilt; invalid entries (NaN, Inf, negative, not a number) are
dropped with a warning, so they are measured again. :meth:`LatencyCache.save` merges into the file
under an exclusive lock (``<cache>.lock``), so runs that share the cache keep each other's entries.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Dict, Optional

from .._atomic import atomic_write_text

__all__ = ["CACHE_FORMAT", "LatencyCache", "valid_ms"]

CACHE_FORMAT = 1


def valid_ms(v) -> bool:
    """A usable cached time: a finite number of ms >= 0 (not NaN, Inf, negative, bool or text)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


class _file_lock:
    """An exclusive ``fcntl.flock`` on ``path`` (created if needed) for a read-merge-write; where
    ``fcntl`` does not exist (Windows) no lock is taken."""

    def __init__(self, path: str):
        self.path, self._fd = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            import fcntl

            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
        return False


class LatencyCache:
    """Measured times (ms) by key: ``entries`` in memory, loaded from and merged into ``path`` (None:
    in memory only)."""

    def __init__(self, path: Optional[str] = None):
        self.path = os.fspath(path) if path is not None else None
        self.entries: Dict[str, float] = self.read_file() if self.path is not None else {}

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __getitem__(self, key: str) -> float:
        return self.entries[key]

    def __setitem__(self, key: str, ms: float) -> None:
        self.entries[key] = ms

    def read_file(self, warn: bool = True) -> Dict[str, float]:
        """The valid entries of the file (none if it is missing or corrupt), with warnings for a corrupt
        file and for invalid entries (unless ``warn`` is false)."""
        if self.path is None or not os.path.exists(self.path):
            return {}
        try:
            with open(self.path) as f:
                data = json.load(f)
            if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
                raise ValueError("unexpected structure")
        except (OSError, ValueError, TypeError) as exc:
            if warn:
                warnings.warn(f"latency cache {self.path} is corrupt ({exc}); it will be rebuilt", RuntimeWarning)
            return {}
        entries, bad = {}, []
        for k, v in data["entries"].items():
            if valid_ms(v):
                entries[str(k)] = float(v)
            else:
                bad.append(f"{k}={v!r}")
        if bad and warn:
            warnings.warn(f"latency cache {self.path}: {len(bad)} invalid entries (not a finite number of "
                          f"ms >= 0, e.g. {bad[0]}) are ignored and measured again", RuntimeWarning)
        return entries

    def save(self) -> None:
        """Merges the entries into the file: under an exclusive lock on ``<cache>.lock`` the file is
        read, merged (entries here win) and written atomically (temp file in the same folder, then
        ``os.replace``); what other runs wrote meanwhile is then reused here too."""
        if self.path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with _file_lock(self.path + ".lock"):
            merged = self.read_file(warn=False)  # reported when this cache read it
            merged.update({k: v for k, v in self.entries.items() if valid_ms(v)})
            atomic_write_text(self.path, json.dumps({"format": CACHE_FORMAT, "entries": merged}, indent=0, sort_keys=True))
        for k, v in merged.items():
            self.entries.setdefault(k, v)
