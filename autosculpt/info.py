"""``python -m autosculpt.info``: version, built and usable backends, SIMD level, threads."""
from __future__ import annotations

import platform

import torch


def report() -> str:
    """A human-readable summary of the installation."""
    from .ops.backends import available_backends, build_info

    info = build_info()
    usable = available_backends()
    lines = [
        f"autosculpt {info['version']}  (torch {torch.__version__}, python {platform.python_version()})",
        f"  C++ CPU kernels built : {info['cpu_built']}" + (f"  [{info['extension_error']}]" if info["extension_error"] else ""),
        f"  CUDA kernels built    : {info['cuda_built']}" + (f" (archs {info['cuda_archs']})" if info["cuda_built"] else ""),
        f"  triton installed      : {info['triton_available']}",
        f"  SIMD level            : {info['simd']}",
        f"  threads               : {info['threads']}",
        "  usable backends       : " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in usable.items()),
    ]
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
