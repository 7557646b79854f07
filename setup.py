"""Build script: setuptools drives CMake to build the torch-free pybind11 extension.

Environment variables (read at build time, echoed in the build log):
  AUTOSCULPT_CUDA        auto (default) | 0 | 1   build the CUDA kernels when nvcc is found / never / always
  AUTOSCULPT_CUDA_ARCHS  CMake CUDA architectures, default "80;90"
  AUTOSCULPT_BUILD_TYPE  CMake build type, default Release
  AUTOSCULPT_JOBS        parallel build jobs, default: number of CPUs
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("AUTOSCULPT_CUDA", "auto").lower()
        if cuda not in ("auto", "0", "1"):
            raise SystemExit(f"AUTOSCULPT_CUDA must be auto, 0 or 1, got {cuda!r}")
        archs = os.environ.get("AUTOSCULPT_CUDA_ARCHS", "80;90")
        build_type = os.environ.get("AUTOSCULPT_BUILD_TYPE", "Release")
        jobs = os.environ.get("AUTOSCULPT_JOBS", str(os.cpu_count() or 2))
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DAUTOSCULPT_CUDA={cuda}",
            f"-DAUTOSCULPT_CUDA_ARCHS={archs}",
            f"-DAUTOSCULPT_VERSION={_version()}",
        ]
        try:
            import ninja  # noqa: F401

            args += ["-G", "Ninja"]
        except ImportError:
            pass
        print(f"[autosculpt build] AUTOSCULPT_CUDA={cuda} CUDA_ARCHS={archs} build_type={build_type}", flush=True)
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


def _version() -> str:
    ns: dict = {}
    exec((ROOT / "autosculpt" / "_version.py").read_text(), ns)
    return ns["__version__"]


setup(
    packages=[
        "autosculpt",
        "autosculpt.ops",
        "autosculpt.nn",
        "autosculpt.runtime",
        "autosculpt.graph",
        "autosculpt.rl",
        "autosculpt.models",
        "autosculpt.data",
        "autosculpt.triton_kernels",
    ],
    # The Triton kernels live at the top of the repository (triton_kernels/) and are
    # installed inside the package so they never clash with other distributions.
    package_dir={"autosculpt.triton_kernels": "triton_kernels"},
    ext_modules=[CMakeExtension("autosculpt._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
