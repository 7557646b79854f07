"""torchvision model definitions beside a CPU-only torch that its compiled ops do not match.

``torchvision`` (installed with ``--no-deps``) registers fake kernels for its C++ ops in
``torchvision._meta_registrations`` at import; beside a torch it was not built for, those ops do not
exist and the import fails (``operator torchvision::nms does not exist``). The model definitions need
none of them, so this shim stubs that one module before importing. Benchmarks only: the package never
imports torchvision.
"""
from __future__ import annotations

import sys
import types


def models():
    """``torchvision.models``, imported with the meta registrations stubbed when needed."""
    if "torchvision.models" not in sys.modules:
        sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torchvision.models as tvm

    return tvm


def version() -> str:
    models()
    import torchvision

    return torchvision.__version__
