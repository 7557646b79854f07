"""Whole models on the CPU: AutoSculpt's deployed form against the best existing inference engines.

For each (model, batch, threads) every provider below is built, warmed up and timed in ONE process,
interleaved (R rounds, each round times every provider once, the order rotating from round to round;
each timing repeats the call until ~``--min-time`` passed), and reported as median and IQR in ms:

- ``eager``: the dense torch model under ``torch.no_grad()``.
- ``onnxruntime``: ``torch.onnx.export`` of the dense model, ``ORT_ENABLE_ALL`` graph optimizations,
  ``intra_op_num_threads = threads``, one inter-op thread, sequential execution.
- ``openvino``: ``openvino.convert_model`` of the same ONNX file, compiled for ``CPU`` with
  ``INFERENCE_NUM_THREADS = threads``, ``PERFORMANCE_HINT: LATENCY``, ``INFERENCE_PRECISION_HINT: f32``
  (no silent bf16 on CPUs that have it).
- ``inductor``: ``torch.compile`` (inductor, ``torch._inductor.config.freezing = True``), model and
  input channels_last, under ``torch.no_grad()``, compiled per (batch, threads).
- ``autosculpt dense``: the dense model in AutoSculpt's deployed form
  (``autosculpt.optimize_for_inference`` over the quick routes: ``autosculpt``, ``autosculpt_channels_last``, ``autosculpt_graph``).
- ``autosculpt N×``: ``autosculpt.sparsify`` with a uniform PAPER6 plan keeping 1/N of the prunable
  3×3 taps (``autosculpt.plan.uniform_plan``, pattern counts in whole kernel blocks), through the
  same deployed form; its output is checked against the sparsified eager model (max abs error).
- ``autosculpt channels N×`` (``--cuts chN``): ``autosculpt.plan.plan_for_mac_cut`` — channel groups
  found in the fx graph, magnitude importance, one keep ratio — physically shrinking the model until
  its whole-model MACs are 1/N; a plain smaller dense model, through the same deployed form.

"best engine" = the fastest of onnxruntime, openvino and inductor on that line. ideal = dense MACs ÷
pruned MACs (``autosculpt.flops.count_macs``). GFLOP/s = 2 × executed MACs ÷ time (pruned layers that
run their dense fallback execute their dense MACs); % of peak is against the FMA peak measured for that
thread count (``bench.fma_peak``). A provider that cannot be built or run is a "failed: <reason>" row.

    python -m bench.bench_engines                                  # everything (long)
    python -m bench.bench_engines --quick                          # smoke test: resnet20, batch 1, 1 thread
    python -m bench.bench_engines --models resnet18 --batches 1 --threads 1 --repeats 5
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

TORCHVISION_MODELS = ["resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "efficientnet_b0"]  # 3×224×224, 1000 classes
BUILTIN_MODELS = ["resnet20", "resnet56", "vgg16"]  # autosculpt.models, 3×32×32, 10 classes
MODELS = TORCHVISION_MODELS + BUILTIN_MODELS
ENGINES = ["onnxruntime", "openvino", "inductor"]  # "best dense engine" = the fastest of these
DENSE_PROVIDERS = ["eager"] + ENGINES + ["autosculpt dense"]
CUTS = ["2", "3"]  # "N": patterns keeping 1/N of the 3×3 taps; "chN": channels, whole-model MACs ÷ N


#: ``--plan MODEL:LABEL=FILE``: plan files (e.g. found by the search) timed as the cut "plan:LABEL"
PLAN_FILES: Dict[tuple, Path] = {}


def cut_kind(cut: str) -> str:
    """``"patterns"``, ``"channels"`` (a ``ch`` prefix) or ``"search"`` (``plan:LABEL``, a plan file)."""
    cut = str(cut)
    return "search" if cut.startswith("plan:") else ("channels" if cut.startswith("ch") else "patterns")


def cut_value(cut) -> float:
    return float(str(cut).removeprefix("ch"))


def pruned_name(cut) -> str:
    if cut_kind(cut) == "search":
        return f"autosculpt plan {str(cut).removeprefix('plan:')}"
    return f"autosculpt {'channels ' if cut_kind(cut) == 'channels' else ''}{cut_value(cut):g}×"


# --------------------------------------------------------------------------- models and plans


def build_model(name: str) -> tuple:
    """(eval-mode model with random weights, input resolution). BatchNorm running statistics are set
    from one random batch, so activations keep their scale through the depth (with the default
    statistics MobileNetV2's logits are ~1e-9 and the error checks would compare noise)."""
    torch.manual_seed(0)
    if name in TORCHVISION_MODELS:
        from .tv import models as tv_models

        model, res = getattr(tv_models(), name)(weights=None), 224
    else:
        from autosculpt.models import get_model

        model, res = get_model(name, num_classes=10, in_chans=3), 32
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: after one batch, the batch's statistics
    if bns:
        model.train()
        with torch.no_grad():
            model(torch.randn(4, 3, res, res))
        for bn in bns:
            bn.momentum = 0.1
    return model.eval(), res


def make_pruned(model: nn.Module, x: torch.Tensor, cut, plan_file: Optional[Path] = None) -> tuple:
    """(pruned eval model, description). Patterns (``"N"``): a uniform PAPER6 plan keeping 1/N of the
    prunable 3×3 taps. Channels (``"chN"``): ``autosculpt.plan.plan_for_mac_cut`` (channel groups from
    the fx graph, magnitude importance, uniform keep ratio) cutting the whole model's MACs by N.
    ``"plan:LABEL"``: the plan in ``plan_file`` (JSON, e.g. the search's ``plan.json``)."""
    import autosculpt as asc
    import autosculpt.plan as asc_plan
    from autosculpt.patterns import PAPER6

    if cut_kind(cut) == "search":
        if plan_file is None:
            raise ValueError(f"cut {cut!r}: no plan file for this model (--plan MODEL:LABEL=FILE)")
        plan = json.loads(Path(plan_file).read_text())
        return asc.sparsify(model, plan, example_input=x).eval(), f"plan file {Path(plan_file).name}"
    v = cut_value(cut)
    if cut_kind(cut) == "channels":
        plan = asc_plan.plan_for_mac_cut(model, x, v)
        return plan.apply(model, x).eval(), f"channels: plan_for_mac_cut({v:g}), whole-model MACs"
    plan = asc_plan.uniform_plan(model, PAPER6, 1.0 / v)
    return asc.sparsify(model, plan).eval(), f"uniform PAPER6, kept {1 / v:.3f} of the 3×3 taps"


def deployed(model: nn.Module, x: torch.Tensor) -> tuple:
    """(model in AutoSculpt's deployed form, the function's name)."""
    import autosculpt as asc
    from autosculpt.deploy import QUICK_ROUTES

    # AutoSculpt's own forms (NCHW and channels_last modules, the graph executor); inductor is its own
    # column (compiling it again inside optimize_for_inference would double the run time).
    d = asc.optimize_for_inference(model, x, routes=QUICK_ROUTES)
    return d, f"optimize_for_inference -> {d.route}"


def executed_macs(fused: nn.Module, x: torch.Tensor) -> tuple:
    """(MACs the deployed model executes on ``x`` counting dense-fallback layers densely, layers on the
    fallback, pattern layers)."""
    from autosculpt.flops import count_macs
    from autosculpt.nn import PatternConv2d

    layers = count_macs(fused, x)["layers"]
    total, n_fb, n_pc = float(sum(layers.values())), 0, 0
    for name, m in fused.named_modules():
        if not isinstance(m, PatternConv2d):
            continue
        n_pc += 1
        if m.active_path(x) == "dense":
            n_fb += 1
            kept = float(m.tap_mask.sum())
            if kept > 0 and name in layers:
                total += layers[name] * (m.tap_mask.numel() / kept - 1.0)
    return total, n_fb, n_pc


# --------------------------------------------------------------------------- engines


def export_onnx(model: nn.Module, x: torch.Tensor, path: Path) -> str:
    """Exports ``model`` at ``x``'s shape; returns which exporter worked."""
    errors = []
    for dynamo in (True, False):
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                kw = dict(dynamo=dynamo, input_names=["x"], output_names=["y"])
                if dynamo:
                    kw["external_data"] = False
                torch.onnx.export(model, (x,), str(path), **kw)
            return "dynamo" if dynamo else "torchscript"
        except Exception as exc:  # noqa: BLE001 - try the other exporter, report both
            errors.append(f"{'dynamo' if dynamo else 'torchscript'}: {type(exc).__name__}: {str(exc)[:200]}")
    raise RuntimeError("torch.onnx.export failed (" + "; ".join(errors) + ")")


def ort_provider(onnx_path: Path, x: torch.Tensor, threads: int) -> tuple:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    xn = x.numpy()

    def call():
        return sess.run(None, {name: xn})[0]

    return call, lambda: torch.from_numpy(call())


def openvino_provider(onnx_path: Path, x: torch.Tensor, threads: int) -> tuple:
    import openvino as ov

    core = ov.Core()
    model = ov.convert_model(str(onnx_path))
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                 "INFERENCE_PRECISION_HINT": "f32"})
    got = compiled.get_property("INFERENCE_PRECISION_HINT")
    if "32" not in str(got):
        raise RuntimeError(f"OpenVINO runs at {got}, not f32")
    req = compiled.create_infer_request()
    xn = x.numpy()

    def call():
        req.infer({0: xn}, share_inputs=True)
        return req.get_output_tensor(0).data

    return call, lambda: torch.from_numpy(call().copy())


def inductor_provider(model: nn.Module, x: torch.Tensor) -> tuple:
    import torch._dynamo
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    torch._dynamo.reset()  # a fresh compile for this (batch, threads): thread counts are baked in
    m = copy.deepcopy(model).to(memory_format=torch.channels_last).eval()
    xc = x.contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(m, backend="inductor", dynamic=False)
    with torch.no_grad():
        compiled(xc)  # compiles here, not inside the timing

    def call():
        with torch.no_grad():
            return compiled(xc)

    return call, call


def torch_provider(model: nn.Module, x: torch.Tensor) -> tuple:
    def call():
        with torch.no_grad():
            return model(x)

    return call, call


# --------------------------------------------------------------------------- timing


def time_interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 2, min_time: float = 0.02,
                     log=print) -> Dict[str, dict]:
    """Per provider: {"median_ms", "q1_ms", "q3_ms", "iqr_ms", "calls_per_timing", "samples_ms"} or
    {"failed": reason}. Warm-up, then ``repeats`` rounds; round r times every provider once, starting at
    provider r mod n, each timing repeating the call until ``min_time`` seconds passed (count fixed once)."""
    out: Dict[str, dict] = {}
    live: Dict[str, Callable] = {}
    inner: Dict[str, int] = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            t0 = time.perf_counter()
            fn()
            one = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - one failing provider must not stop the others
            out[name] = {"failed": f"{type(exc).__name__}: {str(exc)[:200]}"}
            log(f"  {name}: failed while warming up: {out[name]['failed']}")
            continue
        live[name], inner[name] = fn, max(1, int(math.ceil(min_time / max(one, 1e-9))))
    samples: Dict[str, List[float]] = {n: [] for n in live}
    names = list(live)
    for r in range(repeats):
        k = r % max(1, len(names))
        for name in names[k:] + names[:k]:
            if name in out:
                continue
            fn, n = live[name], inner[name]
            try:
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                samples[name].append((time.perf_counter() - t0) / n * 1e3)
            except Exception as exc:  # noqa: BLE001
                out[name] = {"failed": f"{type(exc).__name__}: {str(exc)[:200]}"}
    for name in names:
        if name in out:
            continue
        s = sorted(samples[name])
        q = statistics.quantiles(s, n=4, method="inclusive") if len(s) >= 2 else [s[0], s[0], s[0]]
        out[name] = {"median_ms": statistics.median(s), "q1_ms": q[0], "q3_ms": q[2], "iqr_ms": q[2] - q[0],
                     "calls_per_timing": inner[name], "samples_ms": s}
    return {n: out[n] for n in fns}


# --------------------------------------------------------------------------- machine


def machine_info() -> dict:
    name = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("onnxruntime", "openvino", "onnx", "onnxscript"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - missing or broken: recorded as such
            versions[mod] = None
    try:
        from .tv import version as tv_version

        versions["torchvision"] = tv_version()
    except Exception:  # noqa: BLE001
        versions["torchvision"] = None
    try:
        import autosculpt

        versions["autosculpt"] = getattr(autosculpt, "__version__", None)
    except Exception:  # noqa: BLE001
        pass
    return {"cpu": name, "cores": os.cpu_count(), "versions": versions}


def _loadavg():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# --------------------------------------------------------------------------- the run


def _err(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.detach().float(), b.detach().float()
    e = float((a - b).abs().max())
    return {"max_abs_err": e, "rel_err": e / max(float(b.abs().max()), 1e-30)}


def run_line(name: str, model: nn.Module, res: int, batch: int, threads: int, prepared: dict, repeats: int,
             min_time: float, peak: Optional[float], cuts, log=print) -> List[dict]:
    """Builds and times every provider for one (model, batch, threads); returns one record per provider."""
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    x = torch.randn(batch, 3, res, res)
    records, fns, refs, builders = [], {}, {}, {}
    with torch.no_grad():
        ref_dense = model(x)
    builders["eager"] = lambda: torch_provider(model, x)
    onnx_path = prepared["onnx"].get(batch)
    if isinstance(onnx_path, Path):
        builders["onnxruntime"] = lambda: ort_provider(onnx_path, x, threads)
        builders["openvino"] = lambda: openvino_provider(onnx_path, x, threads)
    builders["inductor"] = lambda: inductor_provider(model, x)

    def ours_dense():
        d, how = deployed(model, x)
        prepared["deploy_fn"] = how
        return torch_provider(d, x)

    builders["autosculpt dense"] = ours_dense
    fused_pruned = {}
    cuts = [c for c in cuts if c in prepared["pruned"]]  # (a plan file given for other models only)
    for cut in cuts:
        def ours_pruned(cut=cut):
            p = prepared["pruned"][cut]
            if isinstance(p, str):
                raise RuntimeError(p)
            d, how = deployed(p, x)
            prepared.setdefault("pruned_deploy_fn", {})[cut] = how
            fused_pruned[cut] = d
            return torch_provider(d, x)

        builders[pruned_name(cut)] = ours_pruned
    failures = {}
    for prov in DENSE_PROVIDERS + [pruned_name(c) for c in cuts]:
        if prov not in builders:
            failures[prov] = prepared["onnx"].get(batch, "not built")
            continue
        t0 = time.perf_counter()
        try:
            call, output = builders[prov]()
            out = output()
            fns[prov] = call
            refs[prov] = out
            log(f"  built {prov} in {time.perf_counter() - t0:.1f} s")
        except Exception as exc:  # noqa: BLE001 - a failure is a table row, not a crash
            failures[prov] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            log(f"  {prov}: failed: {failures[prov]}")
    timings = time_interleaved(fns, repeats=repeats, min_time=min_time, log=log)
    best = [timings[p]["median_ms"] for p in ENGINES if p in timings and "median_ms" in timings[p]]
    best_ms = min(best) if best else None
    best_name = next((p for p in ENGINES if p in timings and timings[p].get("median_ms") == best_ms), None)
    for prov in DENSE_PROVIDERS + [pruned_name(c) for c in cuts]:
        rec = dict(model=name, batch=batch, threads=threads, provider=prov, resolution=res)
        cut = next((c for c in cuts if prov == pruned_name(c)), None)
        if cut is not None:
            rec.update(cut=cut, plan=prepared["plan_how"].get(cut))
        t = timings.get(prov) or {"failed": failures.get(prov, "not built")}
        if "failed" in t:
            rec["failed"] = t["failed"]
            records.append(rec)
            continue
        rec.update({k: v for k, v in t.items()})
        dense_macs = prepared["dense_macs"] * batch
        if cut is None:
            rec["ideal"] = 1.0
            rec["executed_macs"] = dense_macs
            rec.update(_err(refs[prov], ref_dense))
            if prov == "autosculpt dense":
                rec["deploy_fn"] = prepared.get("deploy_fn")
        else:
            pm = prepared["pruned_macs"][cut] * batch
            rec["ideal"] = dense_macs / pm
            with torch.no_grad():
                ref_pruned = prepared["pruned"][cut](x)
            rec.update(_err(refs[prov], ref_pruned))
            rec["err_vs_dense_eager"] = _err(refs[prov], ref_dense)["max_abs_err"]
            d = fused_pruned[cut]
            source, xin = getattr(d, "source", d), x
            if getattr(d, "channels_last", False):
                xin = x.contiguous(memory_format=torch.channels_last)  # the layout its path decisions used
            ex, n_fb, n_pc = executed_macs(source, xin)
            rec["deploy_fn"] = prepared.get("pruned_deploy_fn", {}).get(cut)
            rec.update(executed_macs=ex, fallback_layers=n_fb, pattern_layers=n_pc)
            log(f"  {prov}: deployed vs sparsify eager max abs err {rec['max_abs_err']:.3g} (rel {rec['rel_err']:.2g})")
        ms = rec["median_ms"]
        rec["best_engine"], rec["best_engine_ms"] = best_name, best_ms
        rec["speedup_vs_best_engine"] = best_ms / ms if best_ms else None
        rec["of_ideal"] = rec["speedup_vs_best_engine"] / rec["ideal"] if best_ms else None
        rec["gflops"] = 2.0 * rec["executed_macs"] / (ms * 1e-3) / 1e9
        rec["pct_peak"] = 100.0 * rec["gflops"] / peak if peak else None
        records.append(rec)
    return records


def prepare_model(name: str, batches, cuts, workdir: Path, log=print) -> tuple:
    """Builds the dense model, its ONNX exports (per batch), the pruned models and their MACs."""
    from autosculpt.flops import count_macs

    model, res = build_model(name)
    x1 = torch.randn(1, 3, res, res)
    prep = {"onnx": {}, "pruned": {}, "pruned_macs": {}, "plan_how": {}}
    prep["dense_macs"] = float(count_macs(model, x1)["total"])
    for b in batches:
        path = workdir / f"{name}_b{b}.onnx"
        t0 = time.perf_counter()
        try:
            how = export_onnx(model, torch.randn(b, 3, res, res), path)
            prep["onnx"][b] = path
            log(f"  exported {name} b{b} to ONNX ({how}) in {time.perf_counter() - t0:.1f} s")
        except Exception as exc:  # noqa: BLE001
            prep["onnx"][b] = f"ONNX export: {str(exc)[:300]}"
            log(f"  {prep['onnx'][b]}")
    for cut in cuts:
        if cut_kind(cut) == "search" and (name, str(cut)) not in PLAN_FILES:
            continue  # a plan file given for other models only
        try:
            pruned, how = make_pruned(model, x1, cut, PLAN_FILES.get((name, str(cut))))
            prep["pruned"][cut] = pruned
            prep["plan_how"][cut] = how
            prep["pruned_macs"][cut] = float(count_macs(pruned, x1)["total"])
        except Exception as exc:  # noqa: BLE001
            prep["pruned"][cut] = f"pruning: {type(exc).__name__}: {str(exc)[:200]}"
            log(f"  {name} {pruned_name(cut)}: {prep['pruned'][cut]}")
    return model, res, prep


def run(models, batches, threads, repeats: int, out_path: Optional[Path], cuts=CUTS, min_time: float = 0.02,
        peak_seconds: float = 0.15, log=print) -> dict:
    """Times every (model, batch, threads) line; writes ``out_path`` (markdown) and its .json twin when
    given; returns the JSON-able result."""
    from .fma_peak import fma_peak

    start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = _loadavg()
    info = machine_info()
    peak = fma_peak(sorted(set(threads)), seconds=peak_seconds, log=log)
    log(f"FMA peak ({peak['method']}): " + ", ".join(f"{t} thr {g:.1f} GFLOP/s" for t, g in peak["gflops"].items()))
    peak_start = dict(peak["gflops"])
    records: List[dict] = []
    prev_threads = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
            for name in models:
                log(f"{name}:")
                model, res, prep = prepare_model(name, batches, cuts, Path(tmp), log=log)
                for b in batches:
                    for t in threads:
                        log(f" {name} batch {b}, {t} thread(s)")
                        recs = run_line(name, model, res, b, t, prep, repeats, min_time, peak["gflops"].get(t), cuts,
                                        log=log)
                        for r in recs:
                            log("  " + _row(r))
                        records.extend(recs)
                for p in Path(tmp).glob(f"{name}_b*"):
                    p.unlink()
    finally:
        torch.set_num_threads(prev_threads)
    # a busy machine lowers any single measurement: the peak is the better of the start and end runs
    peak_end = fma_peak(sorted(set(threads)), seconds=peak_seconds, log=log)["gflops"]
    peak["gflops"] = {t: max(peak_start[t], peak_end.get(t, 0.0)) for t in peak_start}
    for r in records:
        if r.get("gflops") is not None and peak["gflops"].get(r["threads"]):
            r["pct_peak"] = 100.0 * r["gflops"] / peak["gflops"][r["threads"]]
    result = {"started": start, "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": info, "fma_peak": {"method": peak["method"], "gflops": {str(k): v for k, v in peak["gflops"].items()},
                           "start": {str(k): v for k, v in peak_start.items()},
                           "end": {str(k): v for k, v in peak_end.items()}},
              "loadavg_start": load_start, "loadavg_end": _loadavg(), "repeats": repeats, "min_time_s": min_time,
              "cuts": list(cuts), "summary": summarize(records), "records": records}
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(markdown(result))
        out_path.with_suffix(".json").write_text(json.dumps(result, indent=1))
        log(f"wrote {out_path} and {out_path.with_suffix('.json').name}")
    return result


# --------------------------------------------------------------------------- report


def summarize(records: List[dict]) -> List[dict]:
    """Per (batch, threads): pruned ÷ ideal against the best dense engine (median, worst) and the dense
    deployed form against the best engine (median, worst)."""
    out = []
    kinds = sorted({cut_kind(r["cut"]) for r in records if "cut" in r}) or ["patterns"]
    for (b, t), kind in itertools.product(sorted({(r["batch"], r["threads"]) for r in records}), kinds):
        line = [r for r in records if r["batch"] == b and r["threads"] == t and "failed" not in r]
        pr = sorted(r["of_ideal"] for r in line
                    if "cut" in r and cut_kind(r["cut"]) == kind and r.get("of_ideal") is not None)
        dn = sorted(r["speedup_vs_best_engine"] for r in line
                    if r["provider"] == "autosculpt dense" and r.get("speedup_vs_best_engine") is not None)
        out.append(dict(batch=b, threads=t, plans=kind, pruned_of_ideal_median=statistics.median(pr) if pr else None,
                        pruned_of_ideal_worst=pr[0] if pr else None, pruned_rows=len(pr),
                        dense_vs_best_median=statistics.median(dn) if dn else None,
                        dense_vs_best_worst=dn[0] if dn else None, dense_rows=len(dn)))
    return out


def _f(v, fmt="{:.2f}") -> str:
    return "—" if v is None else fmt.format(v)


def _row(r: dict) -> str:
    route = (r.get("deploy_fn") or "").partition("-> ")[2]
    head = f"| {r['model']} | {r['batch']} | {r['threads']} | {r['provider']}{f' [{route}]' if route else ''} |"
    if "failed" in r:
        return head + f" failed: {r['failed'].replace('|', '/')} | | | | | | | |"
    pruned = "cut" in r
    return (head + f" {r['median_ms']:.3f} | {r['iqr_ms']:.3f} | {_f(r['speedup_vs_best_engine'])} "
            f"| {_f(r['ideal']) if pruned else '1'} | {_f(r['of_ideal']) if pruned else '—'} | {r['gflops']:.1f} "
            f"| {_f(r['pct_peak'], '{:.0f}%')} | {r['max_abs_err']:.2g} |")


def markdown(res: dict) -> str:
    m, peak = res["machine"], res["fma_peak"]
    la0, la1 = res["loadavg_start"], res["loadavg_end"]
    v = m["versions"]
    deploy = next((r.get("deploy_fn") for r in res["records"] if r.get("deploy_fn")), "fuse_for_inference")
    lines = [
        "# Whole models on the CPU: AutoSculpt vs inference engines", "",
        f"Machine: {m['cpu']}, {m['cores']} cores. {res['started']} – {res['finished']}. "
        f"Load average (1/5/15 min) at start {_f(la0 and la0[0], '{:.1f}')}/{_f(la0 and la0[1], '{:.1f}')}/"
        f"{_f(la0 and la0[2], '{:.1f}')}, at end {_f(la1 and la1[0], '{:.1f}')}/{_f(la1 and la1[1], '{:.1f}')}/"
        f"{_f(la1 and la1[2], '{:.1f}')}." + ("".join(f" Run started {st}: load {a and a[0]:.1f} at start, {b and b[0]:.1f} at end."
                                                   for st, a, b in res.get("loadavg_runs", []))),
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".",
        "",
        "FMA peak (fp32): " + ", ".join(f"{t} thread(s) {g:.1f} GFLOP/s" for t, g in peak["gflops"].items())
        + f" ({peak['method']}; the better of a run at the start and one at the end: "
        + ", ".join(f"{t} thr {peak['start'][t]:.0f} / {peak['end'][t]:.0f}" for t in peak["start"]) + ").",
        "",
        f"Timing: per (model, batch, threads) all providers in one process, {res['repeats']} interleaved rounds "
        f"(rotating order), each timing ≥ {res['min_time_s'] * 1e3:.0f} ms of repeated calls; median and IQR in ms. "
        "best engine = fastest of ONNX Runtime, OpenVINO, inductor on that line. ideal = dense MACs ÷ pruned MACs; "
        "÷ ideal = (speedup vs best engine) ÷ ideal. GFLOP/s = 2 × executed MACs ÷ median time "
        "(dense-fallback layers counted dense). err = max abs error vs the dense eager model (pruned rows: vs "
        f"the sparsified eager model). Our deployed form: `autosculpt.{deploy}`. Pruned plans: "
        + ", ".join(sorted({f"{pruned_name(r['cut'])}: {r['plan']}" for r in res["records"] if r.get("plan")})) + ".",
        "", "## Summary", "",
        "| batch | threads | plans | pruned ÷ ideal vs best engine: median | worst | rows | our dense vs best engine: median | worst |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in res["summary"]:
        lines.append(f"| {s['batch']} | {s['threads']} | {s.get('plans', 'patterns')} | {_f(s['pruned_of_ideal_median'])} | "
                     f"{_f(s['pruned_of_ideal_worst'])} | {s['pruned_rows']} | {_f(s['dense_vs_best_median'])} | "
                     f"{_f(s['dense_vs_best_worst'])} |")
    lines += ["", "## All rows", "",
              "| model | batch | threads | provider / plan | ms (median) | IQR | speedup vs best engine | ideal "
              "| ÷ ideal | GFLOP/s | % of FMA peak | err |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(r) for r in res["records"]]
    lines += ["", "Reproduce: `python -m bench.bench_engines` (see `--help` for subsets).", ""]
    return "\n".join(lines)


def merge(paths: List[Path], out_path: Path) -> dict:
    """One result from several runs' JSON files (e.g. 1 thread and 2 threads run one after the other):
    records concatenated, the FMA peaks of every thread count, the first start and the last end."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    res = dict(parts[0])
    res["records"] = [r for part in parts for r in part["records"]]
    for key in ("gflops", "start", "end"):
        res["fma_peak"][key] = {k: v for part in parts for k, v in part["fma_peak"][key].items()}
    res["finished"], res["loadavg_end"] = parts[-1]["finished"], parts[-1]["loadavg_end"]
    res["loadavg_runs"] = [(part["started"], part["loadavg_start"], part["loadavg_end"]) for part in parts]
    res["summary"] = summarize(res["records"])
    out_path.write_text(markdown(res))
    out_path.with_suffix(".json").write_text(json.dumps(res, indent=1))
    return res


def _cut(text: str) -> str:
    """A ``--cuts`` value: ``N`` or ``chN`` with N > 1."""
    try:
        ok = cut_value(text) > 1
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"expected N or chN with N > 1 (e.g. 2, 3, ch2), got {text!r}")
    return text


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None, help=f"default: {' '.join(MODELS)}")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 8")
    ap.add_argument("--threads", type=int, nargs="+", default=None, help="default: 1 2")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 15, --quick 3)")
    ap.add_argument("--min-time", type=float, default=0.02, help="seconds of repeated calls per timing (default 0.02)")
    ap.add_argument("--cuts", type=_cut, nargs="+", default=CUTS,
                    help="pruned models: N = patterns keeping 1/N of the 3×3 taps, chN = channel pruning cutting "
                    "the whole model's MACs by N (default 2 3)")
    ap.add_argument("--plan", action="append", default=[], metavar="MODEL:LABEL=FILE",
                    help="also time MODEL pruned by the plan in FILE (JSON, e.g. a search's plan.json) as "
                    "'autosculpt plan LABEL' (repeatable)")
    ap.add_argument("--quick", action="store_true", help="smoke test: resnet20, batch 1, 1 thread, 3 repeats")
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/engines-cpu.md (.json beside it); "
                    "--quick: engines-cpu-quick.md in the temp folder")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                    help="instead of measuring: merge these results' JSON files into --out")
    args = ap.parse_args(argv)
    if args.merge:
        merge(args.merge, args.out or REPO / "bench" / "results" / "engines-cpu.md")
        return 0
    unknown = [m for m in (args.models or []) if m not in MODELS]
    if unknown:
        ap.error(f"--models: unknown {unknown}; choose from {MODELS}")
    for flag, vals in (("--batches", args.batches), ("--threads", args.threads)):
        if vals and any(v < 1 for v in vals):
            ap.error(f"{flag}: expected positive integers")
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats: expected >= 1")
    cuts = list(args.cuts)
    for spec in args.plan:
        head, sep, file = spec.partition("=")
        model_name, sep2, label = head.partition(":")
        if not (sep and sep2 and label and file) or model_name not in MODELS:
            ap.error(f"--plan: expected MODEL:LABEL=FILE with MODEL one of {MODELS}, got {spec!r}")
        if not Path(file).is_file():
            ap.error(f"--plan: {file!r} is not a file")
        PLAN_FILES[(model_name, f"plan:{label}")] = Path(file)
        if f"plan:{label}" not in cuts:
            cuts.append(f"plan:{label}")
    models = args.models or (["resnet20"] if args.quick else MODELS)
    batches = args.batches or ([1] if args.quick else [1, 8])
    threads = args.threads or ([1] if args.quick else [1, 2])
    repeats = args.repeats or (3 if args.quick else 15)
    out = args.out or (Path(tempfile.gettempdir()) / "engines-cpu-quick.md" if args.quick
                       else REPO / "bench" / "results" / "engines-cpu.md")
    res = run(models, batches, threads, repeats, out, cuts=cuts, min_time=args.min_time)
    for s in res["summary"]:
        print(f"batch {s['batch']} threads {s['threads']}: pruned ÷ ideal median {_f(s['pruned_of_ideal_median'])} "
              f"worst {_f(s['pruned_of_ideal_worst'])}; our dense vs best engine median "
              f"{_f(s['dense_vs_best_median'])} worst {_f(s['dense_vs_best_worst'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
