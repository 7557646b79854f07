"""The ``autosculpt`` command end to end on a tiny budget, config precedence, resume, bad arguments.

Every test points the cache at a temporary folder (AUTOSCULPT_CACHE) and writes runs under tmp."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import autosculpt as asc
import autosculpt.finetune as ft
import autosculpt.pipeline as pipeline
from autosculpt.cli import build_parser, main
from autosculpt.data import get_dataset
from autosculpt.deploy import QUICK_ROUTES
from autosculpt.finetune import evaluate
from autosculpt.nn import PatternConv2d
from autosculpt.report import PLOTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model-arg", "channels=[8,16,16,8]", "--dense-epochs", "1", "--episodes", "2", "--finetune-epochs", "1",
        "--latency-reps", "3", "--no-progress", "--threads", "1"]


@pytest.fixture(autouse=True)
def keep_thread_count():
    # `--threads` sets torch's global thread count; other tests in this process keep theirs. Tiny
    # models run on one thread (on a loaded 2-core machine OpenMP barriers make 2 threads 10x slower).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("AUTOSCULPT_CACHE")
    os.environ["AUTOSCULPT_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("AUTOSCULPT_CACHE", None)
    else:
        os.environ["AUTOSCULPT_CACHE"] = old


@pytest.fixture(scope="module")
def tiny_run(cache, tmp_path_factory):
    """One tiny `autosculpt prune` run shared by the tests that inspect its outputs."""
    root = tmp_path_factory.mktemp("runs")
    cfg = root / "run.yaml"
    cfg.write_text(yaml.safe_dump({"seed": 1, "finetune_epochs": 3, "latency_batches": [1, 2], "search_batch": 4}))
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    n = torch.get_num_threads()
    with redirect_stdout(buf):
        rc = main(["prune", "--config", str(cfg), *TINY, "--runs-dir", str(root), "--name", "tiny"])
    torch.set_num_threads(n)
    return {"rc": rc, "out": buf.getvalue(), "dir": root / "tiny", "cache": cache}


def test_prune_end_to_end(tiny_run):
    assert tiny_run["rc"] == 0, tiny_run["out"]
    run = tiny_run["dir"]
    for name in ("config.yaml", "summary.json", "search_result.json", "plan.json", "layer_latency.json", "model.pt",
                 "report.md", "finetune.json"):
        assert (run / name).is_file(), name
    for name in PLOTS:
        assert (run / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    out = tiny_run["out"]
    for row in ("validation accuracy", "test accuracy", "FLOPs", "parameters", "latency, batch 1", "latency, batch 2",
                f"run folder: {run}"):
        assert row in out, row
    # The dense model was cached in the temporary cache, not the user's.
    assert list((tiny_run["cache"] / "models").glob("digits_cnn-digits-seed1-*.pt"))


def test_config_file_and_flags_precedence_in_the_run(tiny_run):
    saved = yaml.safe_load((tiny_run["dir"] / "config.yaml").read_text())
    assert saved["seed"] == 1  # from the file (default 0)
    assert saved["finetune_epochs"] == 1  # the flag beats the file's 3
    assert saved["latency_batches"] == [1, 2] and saved["search_batch"] == 4
    assert saved["lr"] == 0.01 and saved["target_speedup"] == 2.0  # defaults
    summary = json.loads((tiny_run["dir"] / "summary.json").read_text())
    assert set(summary["latency_ms"]) == {"1", "2", "4"}  # the summary's batches and the search batch
    assert summary["finetune"]["epochs"] == 1


def test_summary_says_whether_the_final_measurement_meets_the_budget(tiny_run):
    summary = json.loads((tiny_run["dir"] / "summary.json").read_text())
    final, lat = summary["met_budget_final"], summary["latency_ms"]["4"]
    assert final["measured"] == lat["speedup"] and final["target"] == 2.0
    assert final["met"] == (lat["speedup"] >= 2.0)
    for b in summary["latency_ms"].values():  # medians with their spread, route and the load
        assert b["dense_iqr"] >= 0 and b["pruned_iqr"] >= 0 and b["load_average"] >= 0
        assert b["dense_route"] in QUICK_ROUTES + ("eager",)
    verdict = "NOT met in the final measurement" if not final["met"] else ": met in the final measurement"
    assert verdict in tiny_run["out"]
    assert ("WARNING: the pruned model does NOT meet the budget" in tiny_run["out"]) == (not final["met"])
    report = (tiny_run["dir"] / "report.md").read_text()
    assert ("**NOT met**" in report) == (not final["met"])


def test_saved_model_loads_and_reproduces_the_summary(tiny_run):
    run = tiny_run["dir"]
    summary = json.loads((run / "summary.json").read_text())
    plan = json.loads((run / "plan.json").read_text())
    model = asc.load(run / "model.pt").eval()  # built-in model named in the file
    layers = [m for m in model.modules() if isinstance(m, PatternConv2d)]
    assert len(layers) == len(plan["layers"])
    for m in layers:
        assert torch.count_nonzero(m.weight * ~m.tap_mask[:, None]) == 0
    _, val, test = get_dataset("digits", seed=1)
    assert evaluate(model, test) == summary["pruned"]["test_acc"]
    assert evaluate(model, val) == summary["pruned"]["val_acc"]
    assert summary["pruned"]["flops"] <= summary["dense"]["flops"]
    for b, lat in summary["latency_ms"].items():
        assert lat["dense"] > 0 and lat["pruned"] > 0 and abs(lat["speedup"] - lat["dense"] / lat["pruned"]) < 1e-9


def test_report_rerenders_from_the_run_folder(tiny_run, capsys):
    run = tiny_run["dir"]
    for name in PLOTS:
        (run / "plots" / name).unlink()
    (run / "report.md").unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "report.md").is_file()
    assert all((run / "plots" / n).stat().st_size > 1000 for n in PLOTS)


def test_export_and_bench_model(tiny_run, tmp_path, capsys):
    model_file = str(tiny_run["dir"] / "model.pt")
    assert main(["export", model_file, "--out", str(tmp_path / "exp"), "--batch", "2"]) == 0
    model = asc.load(model_file).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        want = model(x)
        for name in ("pruned.pt2", "dense_equivalent.pt2"):
            prog = torch.export.load(str(tmp_path / "exp" / name))
            got = prog.module()(x[:2])
            assert torch.allclose(got, want[:2], atol=1e-4), name
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    sess = ReferenceEvaluator(onnx.load(str(tmp_path / "exp" / "dense_equivalent.onnx")))
    got = sess.run(None, {sess.input_names[0]: x.numpy()})[0]  # another batch size than exported
    assert abs(torch.from_numpy(got) - want).max() < 1e-4
    capsys.readouterr()
    assert main(["bench", "model", model_file, "--batches", "1", "--reps", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "latency, batch 1" in out and "FLOPs" in out


def test_resume_after_interruptions(cache, tmp_path, monkeypatch, capsys):
    args = ["prune", *TINY, "--runs-dir", str(tmp_path), "--name", "r", "--latency-cache", "run"]
    run = tmp_path / "r"
    real_search = pipeline._search_fn()

    def search_interrupted_after_first_episode(*a, **k):
        def stop(episode, record):
            if episode == 0:
                raise KeyboardInterrupt
        return real_search(*a, callback=stop, **k)

    monkeypatch.setattr(pipeline, "_search_fn", lambda: search_interrupted_after_first_episode)
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "search interrupted" in err and "--resume" in err
    assert (run / "search").is_dir() and not (run / "search_result.json").exists()

    monkeypatch.setattr(pipeline, "_search_fn", lambda: real_search)
    real_collate, calls = ft._collate, {"n": 0}

    def collate_interrupted_at_third_step(data, idx):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_collate(data, idx)

    monkeypatch.setattr(ft, "_collate", collate_interrupted_at_third_step)
    assert main(["prune", "--resume", str(run), "--no-progress"]) == 130
    assert "fine-tuning interrupted" in capsys.readouterr().err
    result = json.loads((run / "search_result.json").read_text())
    assert len(result["episode_rewards"]) == 2  # the search finished both episodes across the two runs
    assert (run / "finetune_checkpoint.pt").is_file() and not (run / "model.pt").exists()

    monkeypatch.setattr(ft, "_collate", real_collate)
    assert main(["prune", "--resume", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "search: done before" in out
    assert (run / "search" / "latency_cache.json").is_file()  # measured afresh, kept in the run folder
    assert json.loads((run / "finetune.json").read_text())["resumed_from"] == {"epoch": 0, "step": 2}
    assert (run / "report.md").is_file()


def test_parser_precedence_yaml_and_toml(tmp_path):
    from autosculpt.cli import _resolve

    (tmp_path / "a.yaml").write_text("seed: 4\nlr: 0.2\ntarget-latency-ms: 3.5\n")
    (tmp_path / "b.toml").write_text('seed = 5\ndata = "cifar10:/x"\nmodel_args = { width_mult = 0.5 }\n')
    p = build_parser()
    cfg = _resolve(p.parse_args(["prune", "--config", str(tmp_path / "a.yaml"), "--lr", "0.3"]))
    assert (cfg["seed"], cfg["lr"], cfg["target_latency_ms"], cfg["target_speedup"]) == (4, 0.3, 3.5, None)
    # A budget flag replaces the file's budget of another kind.
    cfg = _resolve(p.parse_args(["prune", "--config", str(tmp_path / "a.yaml"), "--target-speedup", "1.5"]))
    assert (cfg["target_speedup"], cfg["target_latency_ms"]) == (1.5, None)
    cfg = _resolve(p.parse_args(["prune", "--config", str(tmp_path / "b.toml"), "--model-arg", "width_mult=0.25"]))
    assert (cfg["seed"], cfg["data"], cfg["model_args"]) == (5, "cifar10:/x", {"width_mult": 0.25})
    assert cfg["target_speedup"] == 2.0  # the default budget


@pytest.fixture
def user_model_module(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(
        "import torch.nn as nn\n"
        "class Branchy(nn.Module):\n"
        "    def __init__(self, num_classes=10, in_chans=1, width=8):\n"
        "        super().__init__()\n"
        "        self.a = nn.Conv2d(in_chans, width, 3, padding=1)\n"
        "        self.b = nn.Conv2d(width, width, 3, padding=1)\n"
        "        self.c = nn.Conv2d(width, width, 3, padding=1)\n"
        "        self.head = nn.Linear(width, num_classes)\n"
        "    def forward(self, x):\n"
        "        x = self.a(x).relu()\n"
        "        x = self.b(x).relu() + self.c(x).relu()\n"
        "        return self.head(x.mean((2, 3)))\n"
        "def make(num_classes=10, in_chans=1, width=8):\n"
        "    return Branchy(num_classes, in_chans, width)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_nets:make"


def test_user_model_spec_builds_and_round_trips(user_model_module, tmp_path):
    from autosculpt.models.pretrained import resolve_model
    from autosculpt.patterns import PAPER6
    from autosculpt.plan import conv_layer_plan

    factory, meta = resolve_model(user_model_module, 7, (3, 8, 8), {"width": 4})
    model = factory()
    assert model.head.out_features == 7 and model.a.in_channels == 3 and model.b.out_channels == 4
    assert meta == {"model": "my_nets:make", "model_args": {"num_classes": 7, "in_chans": 3, "width": 4}}
    plan = {"version": 1, "layers": {"b": conv_layer_plan(PAPER6, [1, 2, 3, 4])}}
    pruned = asc.sparsify(model, plan).eval()
    asc.save(pruned, tmp_path / "u.pt", plan=plan, meta=meta)
    with pytest.raises(ValueError, match="not built in"):
        asc.load(tmp_path / "u.pt")  # a file never makes us import code
    loaded = asc.load(tmp_path / "u.pt", factory).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    with pytest.raises(ValueError, match="cannot import 'no_such_pkg.mod'"):
        resolve_model("no_such_pkg.mod:make", 10, (1, 8, 8))
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        resolve_model("my_nets:nope", 10, (1, 8, 8))


BAD = [
    (["prune", "--episodes", "0"], "expected a positive integer"),
    (["prune", "--target-speedup", "2", "--target-latency-ms", "3"], "not allowed with argument"),
    (["prune", "--target-flops-ratio", "1.5"], "fraction in (0, 1)"),
    (["prune", "--data", "mnist:/x"], "unknown kind 'mnist'"),
    (["prune", "--model", "resnet21"], "unknown model 'resnet21'"),
    (["prune", "--config", "/nonexistent/run.yaml"], "does not exist"),
    (["prune", "--resume"], "--resume needs the run folder"),
    (["prune", "--weights", "/nonexistent.pt"], "weights: file"),
    (["prune", "--device", "cuda:7"], "device"),
    (["report", "/nonexistent/run"], "does not exist"),
    (["finetune", "/nonexistent/model.pt"], "does not exist"),
    (["export", "/nonexistent/model.pt"], "does not exist"),
    (["bench", "model"], "needs a MODEL_FILE"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_one_line_error(argv, message, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("autosculpt: error:"), captured.err
    assert message in lines[0]
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_unknown_config_key_message(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("episods: 3\n")
    assert main(["prune", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "unknown setting 'episods'" in err and "did you mean 'episodes'" in err


def test_console_entry_point_in_a_subprocess(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "AUTOSCULPT_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([sys.executable, "-m", "autosculpt", "prune", "--episodes", "zero"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "expected a positive integer" in bad.stderr
    helped = subprocess.run([sys.executable, "-m", "autosculpt", "prune", "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0
    for flag in ("--target-speedup", "--data", "--model", "--config", "--resume", "--episodes", "examples:"):
        assert flag in helped.stdout


def test_finetune_command_uses_the_files_data_and_resolution(cache, tmp_path, monkeypatch, capsys):
    from PIL import Image

    import autosculpt.data as data_mod
    from autosculpt.patterns import PAPER6
    from autosculpt.plan import conv_layer_plan

    for c in range(3):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (12, 12), (80 * c, 10 * i, 0)).save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    args = {"channels": [4, 8, 8, 4], "num_classes": 3, "in_chans": 3}
    from autosculpt.models import get_model

    dense = get_model("digits_cnn", **args)
    plan = {"version": 1, "layers": {"features.1.0": conv_layer_plan(PAPER6, [1, 2, 3, 4, 5, 5, 5, 0])}}
    asc.save(asc.sparsify(dense, plan), "m.pt", plan=plan,
             meta={"model": "digits_cnn", "model_args": args, "data": "imagefolder:imgs", "input_shape": [3, 8, 8]})
    seen = []
    real = data_mod.get_dataset
    monkeypatch.setattr(data_mod, "get_dataset", lambda spec, seed=0, **kw: seen.append((spec, kw)) or real(spec, seed, **kw))
    assert main(["finetune", "m.pt", "--finetune-epochs", "1", "--batch-size", "8", "--no-progress", "--threads", "1"]) == 0
    assert seen == [("imagefolder:imgs", {"image_size": 8})]  # the data and resolution recorded in the file
    out = capsys.readouterr().out
    assert "fine-tuned on imagefolder:imgs with 1 process(es)" in out
    tuned = asc.io.read(tmp_path / "m-finetuned.pt")
    assert tuned.plan == plan and tuned.meta["data"] == "imagefolder:imgs"


def test_real_ctrl_c_saves_a_checkpoint_and_resume_finishes(tiny_run, tmp_path):
    """SIGINT to a running `autosculpt prune` (in fine-tuning), then `--resume` finishes the run."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": REPO, "AUTOSCULPT_CACHE": str(tiny_run["cache"]), "OMP_NUM_THREADS": "1"}
    # Same model, data, seed and dense settings as the shared run: the dense model comes from the cache.
    # Batch 8 makes an epoch last long enough to be interrupted in the middle of one.
    args = [sys.executable, "-m", "autosculpt", "prune", *TINY, "--seed", "1", "--search-batch", "4",
            "--finetune-epochs", "4", "--batch-size", "8", "--runs-dir", str(tmp_path), "--name", "sig"]
    # A shell that started the test run in the background ignores SIGINT, and children inherit that
    # (Python then installs no KeyboardInterrupt handler): restore the default in the child.
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpt = tmp_path / "sig" / "finetune_checkpoint.pt"
    deadline = time.time() + 150
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "fine-tuning interrupted; checkpoint saved" in last and f"--resume {tmp_path / 'sig'}" in last
    saved = torch.load(ckpt, weights_only=True)
    assert 1 <= saved["epoch"] < 4 and not (tmp_path / "sig" / "model.pt").exists()
    done = subprocess.run([sys.executable, "-m", "autosculpt", "prune", "--resume", str(tmp_path / "sig"), "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = json.loads((tmp_path / "sig" / "finetune.json").read_text())
    assert resumed["resumed_from"] == {"epoch": saved["epoch"], "step": saved["step"]}
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4]
    assert (tmp_path / "sig" / "model.pt").is_file()


def _one_error_line(capsys):
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("autosculpt: error:") and "Traceback" not in captured.err, captured.err
    return lines[0]


ITEM6_FLAGS = [
    (["--target-speedup", "inf"], "--target-speedup: expected a finite number > 1"),
    (["--target-speedup", "nan"], "--target-speedup: expected a finite number > 1"),
    (["--target-speedup", "0.5"], "--target-speedup: expected a finite number > 1"),
    (["--target-latency-ms", "inf"], "--target-latency-ms: expected a finite positive number"),
    (["--search-batch", "200000"], "--search-batch: expected a positive integer (at most 4096)"),
    (["--latency-batches", "1", "100000"], "--latency-batches: expected a list of positive integers (each at most 4096)"),
    (["--batch-size", "100000000"], "--batch-size: expected a positive integer (at most 65536)"),
    (["--lr", "inf"], "--lr: expected a finite positive number"),
    (["--margin", "nan"], "--margin: expected a fraction in [0, 1)"),
]
ITEM6_FILES = [
    ("target_speedup: .inf\n", "target_speedup (--target-speedup): expected a finite number > 1"),
    ("target_speedup: 0.5\n", "target_speedup (--target-speedup): expected a finite number > 1"),
    ("search_batch: 200000\n", "search_batch (--search-batch): expected a positive integer (at most 4096)"),
    ("weight_decay: .nan\n", "weight_decay (--weight-decay): expected a finite number >= 0"),
    ("episodes: 2.5\n", "episodes (--episodes): expected a positive integer"),
    ("progress: 3\n", "progress (--no-progress): expected true or false"),
]


@pytest.mark.parametrize("flags,message", ITEM6_FLAGS, ids=[" ".join(f) for f, _ in ITEM6_FLAGS])
def test_item6_bad_flags_fail_before_anything_is_written_or_allocated(flags, message, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "_batch", lambda *a: pytest.fail("a batch was built"))
    monkeypatch.setattr(pipeline, "run_prune", lambda *a, **k: pytest.fail("the run started"))
    assert main(["prune", *flags, "--runs-dir", str(tmp_path / "runs")]) == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text,message", ITEM6_FILES, ids=[t.strip() for t, _ in ITEM6_FILES])
def test_item6_bad_config_file_values_fail_before_the_run_folder(text, message, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(text)
    monkeypatch.setattr(pipeline, "run_prune", lambda *a, **k: pytest.fail("the run started"))
    assert main(["prune", "--config", str(tmp_path / "c.yaml"), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_item6_batches_are_checked_against_the_data_before_allocation(cache, tmp_path, monkeypatch, capsys):
    import autosculpt.data as data_mod
    from autosculpt.config import MAX_BATCH, check_batches_for_data

    class Huge(list):  # a data set of 2048x2048 RGB images; its samples must never be read
        def __getitem__(self, i):
            pytest.fail("a sample was read to build a batch")

    huge = data_mod.DataSplits(Huge([0] * 10), Huge([0] * 10), Huge([0] * 10), 2, (3, 2048, 2048), "digits")
    monkeypatch.setattr(data_mod, "get_dataset", lambda *a, **k: huge)
    monkeypatch.chdir(tmp_path)
    assert main(["prune", "--search-batch", str(MAX_BATCH), "--runs-dir", str(tmp_path / "runs"), "--name", "h",
                 "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert "search_batch (--search-batch): expected at most 42 for inputs of shape (3, 2048, 2048)" in line
    assert not (tmp_path / "runs").exists()  # checked before the run folder is created
    check_batches_for_data({"search_batch": 8, "latency_batches": [1, 8]}, (3, 32, 32))  # the usual sizes pass


@pytest.fixture
def evil_run(tmp_path):
    marker = tmp_path / "PWNED"
    run = tmp_path / "runs" / "evil"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f'model: "os:system"\nmodel_args: {{"command": "touch {marker}"}}\n')
    return run, marker


def test_item8_resume_needs_consent_to_import_a_config_factory(evil_run, cache, tmp_path, monkeypatch, capsys):
    run, marker = evil_run
    monkeypatch.chdir(tmp_path)
    assert main(["prune", "--resume", str(run), "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert "'os:system'" in line and "config.yaml" in line and "--trust-config-factory" in line
    assert not marker.exists()
    # consent allows importing a model factory only: a built-in function is refused before any call
    assert main(["prune", "--resume", str(run), "--no-progress", "--trust-config-factory"]) == 2
    assert "not a model factory" in _one_error_line(capsys)
    assert not marker.exists()
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]  # nothing ran, nothing written
    # the same for a --config file of a fresh run
    (tmp_path / "c.yaml").write_text((run / "config.yaml").read_text())
    assert main(["prune", "--config", str(tmp_path / "c.yaml"), "--runs-dir", str(tmp_path / "new")]) == 2
    assert "--trust-config-factory" in _one_error_line(capsys)
    assert not marker.exists() and not (tmp_path / "new").exists()


def test_item8_a_trusted_factory_must_return_a_module(tmp_path, monkeypatch):
    from autosculpt.models.pretrained import import_factory, resolve_model

    (tmp_path / "not_models.py").write_text("import subprocess\nclass Thing:\n    pass\n"
                                            "def make(num_classes=10):\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    build, _ = resolve_model("not_models:make", 10, (1, 8, 8))
    with pytest.raises(TypeError, match="returned int, expected an nn.Module"):
        build()
    for spec in ("not_models:Thing", "not_models:subprocess", "os:system", "builtins:eval", "subprocess:Popen"):
        with pytest.raises(ValueError, match="not a model factory|no callable"):
            import_factory(spec)
    with pytest.raises(ValueError, match="expected 'package.module:factory'"):
        import_factory("os:path.join")


def test_item11_run_names_stay_inside_the_runs_folder(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "run_prune", lambda *a, **k: pytest.fail("the run started"))
    for name in ("../x", str(tmp_path / "abs"), "a/b", "..", "."):
        assert main(["prune", "--runs-dir", str(tmp_path / "runs"), "--name", name]) == 2
        assert "--name: expected a plain folder name" in _one_error_line(capsys)
        assert main(["prune", "--runs-dir", str(tmp_path / "runs"), "--name", name, "--resume"]) == 2
        assert "--name: expected a plain folder name" in _one_error_line(capsys)
    (tmp_path / "c.yaml").write_text("name: ../x\n")
    assert main(["prune", "--config", str(tmp_path / "c.yaml"), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "name (--name): expected a plain folder name" in _one_error_line(capsys)
    assert not (tmp_path / "x").exists() and not (tmp_path / "abs").exists() and not (tmp_path / "runs").exists()


def test_item11_finetune_out_is_checked_before_training(cache, tmp_path, monkeypatch, capsys):
    from autosculpt.models import get_model

    monkeypatch.chdir(tmp_path)
    args = {"channels": [4, 8, 8, 4]}
    asc.save(get_model("digits_cnn", **args), "m.pt",
             meta={"model": "digits_cnn", "model_args": args, "data": "digits", "input_shape": [1, 8, 8]})
    monkeypatch.setattr(ft, "finetune", lambda *a, **k: pytest.fail("training started"))
    (tmp_path / "outdir").mkdir()
    assert main(["finetune", "m.pt", "--out", "outdir", "--no-progress"]) == 2
    assert "--out: 'outdir' is a folder; expected a file path" in _one_error_line(capsys)
    (tmp_path / "afile").write_text("")
    assert main(["finetune", "m.pt", "--out", "afile/m.pt", "--no-progress"]) == 2
    assert "--out: cannot write 'afile/m.pt'" in _one_error_line(capsys)
    assert main(["finetune", "m.pt", "--checkpoint", "outdir", "--no-progress"]) == 2
    assert "--checkpoint: 'outdir' is a folder" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "m.pt", "outdir"]  # no checkpoint left behind


def test_item6_finetune_config_file_is_validated_before_training(cache, tmp_path, monkeypatch, capsys):
    from autosculpt.models import get_model

    monkeypatch.chdir(tmp_path)
    asc.save(get_model("digits_cnn", channels=(4, 8, 8, 4)), "m.pt",
             meta={"model": "digits_cnn", "model_args": {"channels": [4, 8, 8, 4]}, "data": "digits", "input_shape": [1, 8, 8]})
    monkeypatch.setattr(ft, "finetune", lambda *a, **k: pytest.fail("training started"))
    (tmp_path / "c.yaml").write_text("lr: .inf\n")
    assert main(["finetune", "m.pt", "--config", "c.yaml", "--no-progress"]) == 2
    assert "lr (--lr): expected a finite positive number" in _one_error_line(capsys)
    assert main(["finetune", "m.pt", "--batch-size", "1e9", "--no-progress"]) == 2
    assert "--batch-size: expected a positive integer" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "m.pt"]


def test_a_model_without_prunable_convs_fails_before_training(cache, tmp_path, monkeypatch, capsys):
    """``--model vit_tiny``: the search chooses 3×3 conv pattern mixes only, so the run stops with one
    error line saying so (and what to use instead) before a dense model is trained or a folder made."""
    import autosculpt.models.pretrained as pretrained

    monkeypatch.setattr(pretrained, "dense_model", lambda *a, **k: pytest.fail("the dense model was trained"))
    monkeypatch.chdir(tmp_path)
    assert main(["prune", "--model", "vit_tiny", "--runs-dir", str(tmp_path / "runs"), "--name", "v",
                 "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert "vit_tiny (VisionTransformer) has no prunable 3×3 conv" in line and "plan_for_mac_cut" in line
    assert not (tmp_path / "runs").exists()
