"""Build script: setuptools drives CMake to build the torch-free pybind11 extension.

Environment variables (read at build time, echoed in the build log):
  AUTOSCULPT_CUDA        auto (default) | 0 | 1   build the CUDA kernels when nvcc is found / never / always
  AUTOSCULPT_CUDA_ARCHS  CMake CUDA architectures, default "80;90"
  AUTOSCULPT_BUILD_TYPE  CMake build type, default Release
  AUTOSCULPT_JOBS        parallel build jobs, default: number of CPUs
"""
import os
import shutil
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
        generator, make_program = _generator()
        if generator:
            args += ["-G", generator]
        if make_program:
            args.append(f"-DCMAKE_MAKE_PROGRAM={make_program}")
        cmake = shutil.which("cmake") or "cmake"
        _drop_stale_cache(build_dir, {
            "CMAKE_COMMAND": _cmake_binary(cmake, build_dir),
            "CMAKE_GENERATOR": generator or "Unix Makefiles",
            "CMAKE_MAKE_PROGRAM": make_program,
            "Python_EXECUTABLE": sys.executable,
            "pybind11_DIR": pybind11.get_cmake_dir(),
        })
        print(f"[autosculpt build] AUTOSCULPT_CUDA={cuda} CUDA_ARCHS={archs} build_type={build_type}", flush=True)
        subprocess.run([cmake, str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


def _generator():
    """(CMake generator, its build program): Ninja when the ninja package or a ninja on PATH exists."""
    try:
        import ninja

        exe = Path(ninja.BIN_DIR) / "ninja"
        if exe.exists():
            return "Ninja", str(exe)
    except ImportError:
        pass
    exe = shutil.which("ninja")
    if exe:
        return "Ninja", exe
    return None, None


def _cache_entry(text: str, key: str):
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return line.partition("=")[2].strip()
    return None


def _cmake_binary(cmake: str, build_dir: Path) -> str:
    """The cmake executable behind ``cmake`` (a pip-installed cmake runs through a wrapper script)."""
    script = build_dir / "_which_cmake.cmake"
    script.write_text("message(\"${CMAKE_COMMAND}\")\n")
    try:
        res = subprocess.run([cmake, "-P", str(script)], capture_output=True, text=True, check=False)
    finally:
        script.unlink()
    return res.stderr.strip().splitlines()[-1] if res.stderr.strip() else cmake


def _drop_stale_cache(build_dir: Path, expected: dict) -> None:
    """Deletes the CMake cache when it records another cmake, generator, build program, Python or
    pybind11 than this build uses, or a build program that no longer exists: pip builds each time in a
    fresh, then deleted, environment, whose cmake/ninja the cache of the previous ``pip install .`` from
    the same folder would still name."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.exists():
        return
    text = cache.read_text(errors="replace")
    changed = [k for k, v in expected.items() if v is not None and _cache_entry(text, k) not in (None, v)]
    program = _cache_entry(text, "CMAKE_MAKE_PROGRAM")
    if program and not os.path.exists(program):
        changed.append("CMAKE_MAKE_PROGRAM (gone)")
    if changed:
        print(f"[autosculpt build] fresh CMake configure in {build_dir}: the cache names another {', '.join(changed)}",
              flush=True)
        cache.unlink()
        shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)


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
