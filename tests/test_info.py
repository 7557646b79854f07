"""Installation facts: lean import, `python -m autosculpt.info`, build_info / available_backends."""
import os
import subprocess
import sys

import autosculpt as asc


def test_import_is_lean():
    code = (
        "import sys, torch, autosculpt, autosculpt.nn, autosculpt.ops;"
        "print('triton' in sys.modules, torch.cuda.is_initialized())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_info_command_reports_backends():
    out = subprocess.run([sys.executable, "-m", "autosculpt.info"], capture_output=True, text=True, check=True).stdout
    assert "autosculpt " + asc.__version__ in out
    assert "usable backends" in out and "SIMD level" in out


def test_build_info_and_available_backends():
    info = asc.runtime.build_info()
    for key in ("cpu_built", "cuda_built", "cuda_archs", "triton_available", "simd", "version"):
        assert key in info
    usable = asc.runtime.available_backends()
    assert set(usable) == {"cpu", "cuda", "triton", "torch"} and usable["torch"] is True
    if os.environ.get("CI") == "true":
        assert info["cpu_built"] and usable["cpu"], info["extension_error"]
