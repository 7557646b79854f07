"""Installs that always work (hardening items 12 and 13): the sdist builds a wheel, ``pip install .``
works twice from one folder, the core imports with only torch and numpy, missing extras are named,
and the CLI's closing hint loads the saved model it names."""
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import autosculpt as asc

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = ("torch_geometric", "sklearn", "tqdm", "yaml", "scipy", "matplotlib", "triton")

# Makes the optional packages look not installed (import fails, importlib.util.find_spec says None).
HIDE = textwrap.dedent(f"""
    import importlib.machinery as _m
    _HIDDEN = {set(OPTIONAL)!r}
    _find = _m.PathFinder.find_spec
    def _hidden(name, path=None, target=None):
        if name.partition(".")[0] in _HIDDEN:
            return None
        return _find(name, path, target)
    _m.PathFinder.find_spec = staticmethod(_hidden)
""")


def _build_env(**extra):
    env = dict(os.environ, AUTOSCULPT_CUDA="0", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    env.pop("PYTHONPATH", None)
    return env


def _run(cmd, cwd, timeout=900, **env):
    res = subprocess.run(cmd, cwd=cwd, env=_build_env(**env), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res


def _copy_source(dest: Path) -> Path:
    """The repository's files (tracked and new, not ignored ones such as build/ or .venv/) copied to ``dest``."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                             capture_output=True).stdout.decode()
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = None
    if files is None:  # not a git checkout (e.g. an unpacked sdist)
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "*.so",
                                                                   "__pycache__", "runs", ".pytest_cache"))
        return dest
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


def _build_sdist(src: Path, out: Path) -> Path:
    try:
        import build  # noqa: F401

        _run([sys.executable, "-m", "build", "--sdist", "--outdir", str(out), str(src)], cwd=src)
    except ImportError:  # the 'build' frontend is in the test extra; setuptools alone can write an sdist too
        _run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(out)], cwd=src)
    (sdist,) = out.glob("autosculpt-*.tar.gz")
    return sdist


# --------------------------------------------------------------------------- item 12: packaging


@pytest.mark.slow
def test_item12_sdist_builds_wheel(tmp_path):
    src = _copy_source(tmp_path / "src")
    sdist = _build_sdist(src, tmp_path / "dist")
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for needed in ("CMakeLists.txt", "LICENSE", "setup.py", "pyproject.toml", "autosculpt/py.typed",
                   "csrc/bindings.cpp", "triton_kernels/__init__.py"):
        assert needed in names, f"sdist lacks {needed}"
    assert any(n.startswith("csrc/cpu/") and n.endswith(".cpp") for n in names)
    assert not any(n.endswith((".so", ".pyc")) for n in names), "sdist carries build outputs"

    # A wheel built from the unpacked sdist alone (no repository around it), with build isolation:
    # torch is not a build requirement, so this downloads only setuptools/pybind11/cmake/ninja.
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), str(sdist)], cwd=tmp_path)
    (wheel,) = wheels.glob("autosculpt-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = zf.read(meta_name).decode()
    assert any(n.startswith("autosculpt/_C.") and n.endswith(".so") for n in names), "wheel lacks the compiled _C"
    assert "autosculpt/py.typed" in names
    assert "autosculpt/triton_kernels/pattern_conv.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in meta
    assert "Project-URL: Homepage, https://github.com/autosculpt/autosculpt" in meta
    # The core install is torch + numpy; everything else sits behind an extra.
    core = [line.split(":", 1)[1].strip() for line in meta.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert sorted(r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in core) == ["numpy", "torch"]
    for extra in ("search", "report", "export", "bench", "all", "test"):
        assert f"Provides-Extra: {extra}" in meta


@pytest.mark.slow
def test_item12_reinstall_same_folder(tmp_path):
    """The second ``pip install .`` reuses the folder's build/ whose CMake cache names the ninja of the
    first, deleted, isolated build environment; it must configure afresh instead of failing."""
    src = _copy_source(tmp_path / "src")
    for i in (1, 2):
        target = tmp_path / f"site{i}"
        _run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), "."], cwd=src)
        assert list((target / "autosculpt").glob("_C.*.so")), f"install {i} has no compiled extension"
        assert (target / "autosculpt" / "py.typed").exists()
    assert list((src / "build").rglob("CMakeCache.txt")), "pip no longer builds in the source folder (test is moot)"


# --------------------------------------------------------------------------- item 12: lean core


def _run_hidden(code: str, cwd, timeout=600):
    return subprocess.run([sys.executable, "-c", HIDE + textwrap.dedent(code)], cwd=cwd, env=_build_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_item12_lean_core_import(tmp_path):
    res = _run_hidden(f"""
        import sys
        import torch
        import autosculpt, autosculpt.nn, autosculpt.ops, autosculpt.plan, autosculpt.io, autosculpt.fuse
        import autosculpt.patterns
        assert autosculpt.nn.PatternConv2d and autosculpt.sparsify and autosculpt.io.load
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.Conv2d(8, 8, 3, padding=1)).eval()
        plan = {{"version": 1, "layers": {{"2": autosculpt.plan.conv_layer_plan(autosculpt.patterns.PAPER6,
                                                                         [1, 2, 3, 4, 5, 1, 2, 3])}}}}
        pruned = autosculpt.sparsify(model, plan).eval()
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            y = pruned(x)
            autosculpt.save(pruned, "m.pt", plan=plan)
            again = autosculpt.load("m.pt", model)
            torch.testing.assert_close(again(x), y)
            torch.testing.assert_close(autosculpt.fuse_for_inference(pruned, x)(x), y, rtol=1e-4, atol=1e-4)
        leaked = sorted(m for m in sys.modules if m.partition(".")[0] in {set(OPTIONAL)!r})
        assert not leaked, leaked
        try:
            autosculpt.search(model, None, None, example_input=x)
        except ImportError as e:
            print("SEARCH:", e)
        try:
            autosculpt.plan.uniform_plan(model, autosculpt.patterns.PAPER6, 0.5)
        except ImportError as e:
            print("UNIFORM:", e)
    """, tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "SEARCH: autosculpt.search needs the 'search' extra: pip install 'autosculpt[search]'" in res.stdout
    assert "UNIFORM:" in res.stdout and "pip install 'autosculpt[search]'" in res.stdout

    # The CLI: 'prune' names the extras in one line (no traceback); 'info' works without them.
    res = _run_hidden("""
        import sys
        from autosculpt.cli import main
        sys.exit(main(["prune", "--episodes", "1", "--runs-dir", "runs"]))
    """, tmp_path)
    assert res.returncode == 2, res.stderr[-4000:]
    assert "Traceback" not in res.stderr
    assert "autosculpt prune needs the 'search' and 'report' extras: pip install 'autosculpt[search,report]'" in res.stderr
    assert not (tmp_path / "runs").exists()
    res = _run_hidden("""
        import sys
        from autosculpt.cli import main
        sys.exit(main(["info"]))
    """, tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "triton" in res.stdout


def test_item12_missing_extra_message(monkeypatch, capsys):
    from autosculpt import _optional
    from autosculpt.cli import main

    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # import fails as if scipy were not installed
    with pytest.raises(_optional.MissingExtraError, match=r"autosculpt.patterns.assign needs the 'search' extra: "
                                                          r"pip install 'autosculpt\[search\]'"):
        asc.patterns.assign(torch.randn(4, 2, 3, 3), asc.patterns.PAPER6, [0, 0, 0, 0, 0, 4])
    monkeypatch.setitem(sys.modules, "torch_geometric", None)
    assert main(["prune", "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autosculpt: error: autosculpt prune needs the 'search' extra: "
                          "pip install 'autosculpt[search]'"), err
    assert "Traceback" not in err
    # Any other command that reaches a missing optional package also gets the extra, not a traceback.
    assert _optional.from_error(ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib"),
                                "autosculpt report") == \
        "autosculpt report needs the 'report' extra: pip install 'autosculpt[report]' (missing: matplotlib)"
    assert _optional.from_error(ModuleNotFoundError("No module named 'foo'", name="foo"), "x") is None


def test_item12_progress_bars_without_tqdm(monkeypatch):
    from autosculpt import _optional

    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    bar = _optional.tqdm(total=3, desc="x")
    bar.update(2)
    bar.set_postfix(loss=1.0)
    bar.close()
    assert list(_optional.tqdm([1, 2, 3], desc="y")) == [1, 2, 3]


def test_item12_py_typed_and_license_present():
    assert (ROOT / "autosculpt" / "py.typed").exists()
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0" in text and "The AutoSculpt authors" in text


# --------------------------------------------------------------------------- item 13: the load hint


def test_item13_load_hint_user_model(tmp_path, monkeypatch):
    from autosculpt.cli import _load_hint
    from autosculpt.models.pretrained import resolve_model
    from autosculpt.patterns import PAPER6
    from autosculpt.plan import conv_layer_plan

    (tmp_path / "my_nets.py").write_text(
        "import torch.nn as nn\n"
        "def make(num_classes=10, in_chans=1, width=8):\n"
        "    return nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU(),\n"
        "                         nn.Conv2d(width, width, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(width, num_classes))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_nets", raising=False)  # another test's my_nets must not be reused
    factory, meta = resolve_model("my_nets:make", 7, (3, 8, 8), {"width": 4})
    model = factory()
    x = torch.randn(2, 3, 8, 8)
    plan = {"version": 1, "layers": {"2": conv_layer_plan(PAPER6, [1, 2, 3, 4])}}
    pruned = asc.sparsify(model, plan).eval()
    path = str(tmp_path / "model.pt")
    asc.save(pruned, path, plan=plan, meta={**meta, "input_shape": [3, 8, 8], "num_classes": 7})

    with pytest.raises(ValueError, match="not built in"):
        asc.load(path)  # the hint 'autosculpt.load(path)' alone does not work for a user model
    hint = _load_hint(path)
    assert hint == "import my_nets; autosculpt.load(path, my_nets.make(num_classes=7, in_chans=3, width=4))", hint
    ns = {"autosculpt": asc, "path": path}
    exec(hint.replace("autosculpt.load(", "model = autosculpt.load(", 1), ns)  # the hint, run as printed
    loaded = ns["model"].eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned(x))

    # a built-in model needs nothing more than the path
    from autosculpt.models import get_model

    builtin = get_model("digits_cnn")
    asc.save(builtin, str(tmp_path / "b.pt"), meta={"model": "digits_cnn", "model_args": {}})
    assert _load_hint(str(tmp_path / "b.pt")) == "autosculpt.load(path)"
    asc.load(str(tmp_path / "b.pt"))
